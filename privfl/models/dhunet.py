"""DHU-Net: dual-branch hierarchical global-local fusion network (the FedDP paper's model).

Architecture as measured from the public DHUnet reference implementation:

- global branch: timm Swin Transformer (patch 4, C=96, depths 2,2,2,2, heads 3,6,12,24, window 7,
  mlp ratio 4, drop path 0.2, no absolute position embedding, no final norm);
- local branch: timm ConvNeXt (depths 3,3,3,3, dims 96..768, drop path 0.1, layer scale 1e-6);
- GLFusion per stage: global + local maps, concat the previous decoder output (not at the deepest
  stage), 3×3 conv (no bias) → BatchNorm → ReLU → Cross-scale Expand Layer;
- Cross-scale Expand ×2: BatchNorm, transposed convs (k2 p0 and k4 p1, stride 2, dim/4 channels
  each) concatenated to dim/2 channels at twice the resolution;
- final Cross-scale Expand ×4: BatchNorm, four stride-4 transposed convs (kernels 4/8/16/32,
  paddings 0/2/6/14) with dim/2, dim/4, dim/8, dim/8 channels (48/24/12/12 at C=96);
- head: 1×1 conv to the classes; deep-supervision heads: 3×3 convs on the decoder maps at 1/16,
  1/8 and 1/4 resolution, upsampled bilinearly to full size.

Both encoders come from timm with ``pretrained=False``; nothing is downloaded. Pretrained weights
load only from a local file (:func:`privfl.models.pretrained.load_pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import timm
import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from privfl.data.augment import dhunet_augment
from privfl.models.losses import DHUNetLoss
from privfl.models.registry import register_model


@dataclass(frozen=True)
class DHUNetConfig:
    """Widths and depths of both branches. ``embed_dim`` is C, the first-stage width of both."""

    embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 2, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    convnext_depths: tuple[int, ...] = (3, 3, 3, 3)
    swin_drop_path: float = 0.2
    convnext_drop_path: float = 0.1
    layer_scale: float = 1e-6

    @property
    def dims(self) -> tuple[int, int, int, int]:
        c = self.embed_dim
        return (c, 2 * c, 4 * c, 8 * c)


PAPER = DHUNetConfig()
TINY = DHUNetConfig(embed_dim=16, swin_heads=(1, 2, 4, 8), window_size=4, convnext_depths=(2, 2, 2, 2))


class CrossScaleExpand(nn.Module):
    """Upsample ×``factor`` with parallel transposed convs of different kernel sizes, concatenated.

    Each branch maps ``(B, dim, H, W)`` to ``(B, c_i, factor·H, factor·W)``: stride = factor,
    padding = (kernel − factor) / 2, so every kernel size lands on the same grid.
    """

    def __init__(self, dim: int, factor: int, kernels: tuple[int, ...], channels: tuple[int, ...]):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.branches = nn.ModuleList(
            nn.ConvTranspose2d(dim, c, k, stride=factor, padding=(k - factor) // 2)
            for k, c in zip(kernels, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return torch.cat([b(x) for b in self.branches], dim=1)


class GLFusion(nn.Module):
    """Fuse one stage: (global + local) ⊕ previous decoder map → 3×3 conv → BN → ReLU → expand."""

    def __init__(self, dim: int, with_previous: bool, expand: CrossScaleExpand):
        super().__init__()
        cin = 2 * dim if with_previous else dim
        self.conv = nn.Sequential(
            nn.Conv2d(cin, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)
        )
        self.expand = expand

    def forward(
        self, g: torch.Tensor, local: torch.Tensor, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = g + local
        if previous is not None:
            x = torch.cat([x, previous], dim=1)
        return self.expand(self.conv(x))


class DHUNet(nn.Module):
    """DHU-Net for ``img_size`` × ``img_size`` inputs (a multiple of 32).

    Input: ``(B, 3, H, W)`` float images. Output in eval mode: logits ``(B, num_classes, H, W)``.
    In training mode: ``(logits, (deep_1/4, deep_1/8, deep_1/16))``, each deep-supervision map
    upsampled to ``(B, num_classes, H, W)``; :class:`DHUNetLoss` combines them.
    """

    def __init__(
        self, num_classes: int = 4, img_size: int = 224, config: DHUNetConfig = PAPER, in_chans: int = 3
    ):
        super().__init__()
        if img_size % 32 or img_size < 32:
            raise ValueError(
                f"DHU-Net needs an input size that is a multiple of 32 (patch 4 × 3 merges), got {img_size}"
            )
        self.img_size = img_size
        self.config = config
        c1, c2, c3, c4 = config.dims
        self.global_branch = timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            in_chans=in_chans,
            embed_dim=config.embed_dim,
            depths=config.swin_depths,
            num_heads=config.swin_heads,
            window_size=config.window_size,
            mlp_ratio=4.0,
            drop_path_rate=config.swin_drop_path,
        )
        self.global_branch.norm = nn.Identity()  # no final norm: the decoder reads un-normalised stage maps
        self.local_branch = timm.create_model(
            "convnext_tiny",
            pretrained=False,
            num_classes=0,
            in_chans=in_chans,
            dims=config.dims,
            depths=config.convnext_depths,
            drop_path_rate=config.convnext_drop_path,
            ls_init_value=config.layer_scale,
        )
        self.local_branch.head = nn.Identity()
        self.local_branch.norm_pre = nn.Identity()

        def x2(dim: int) -> CrossScaleExpand:
            return CrossScaleExpand(dim, 2, (2, 4), (dim // 4, dim // 4))

        self.fuse4 = GLFusion(c4, False, x2(c4))  # 8C@1/32 → 4C@1/16
        self.fuse3 = GLFusion(c3, True, x2(c3))  # → 2C@1/8
        self.fuse2 = GLFusion(c2, True, x2(c2))  # → C@1/4
        self.fuse1 = GLFusion(
            c1, True, CrossScaleExpand(c1, 4, (4, 8, 16, 32), (c1 // 2, c1 // 4, c1 // 8, c1 // 8))
        )
        self.head = nn.Conv2d(c1, num_classes, 1)
        self.deep_heads = nn.ModuleList(nn.Conv2d(c, num_classes, 3, padding=1) for c in (c1, c2, c3))

    @staticmethod
    def default_loss() -> nn.Module:
        """The deep-supervised loss this model trains with (:class:`~privfl.models.losses.DHUNetLoss`)."""
        return DHUNetLoss()

    @staticmethod
    def default_augment():
        """The DHUnet recipe's joint augmentation (flips, ±90° rotations, HSV jitter on the image)."""
        return dhunet_augment()

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The four stage maps of each branch, NCHW, at 1/4, 1/8, 1/16, 1/32 resolution."""
        # timm.create_model is typed as a plain nn.Module; intermediates_only=True gives a list
        swin, convnext = cast(SwinTransformer, self.global_branch), cast(ConvNeXt, self.local_branch)
        g = cast(list[torch.Tensor], swin.forward_intermediates(x, intermediates_only=True))
        loc = cast(list[torch.Tensor], convnext.forward_intermediates(x, intermediates_only=True))
        return list(g), list(loc)

    def forward(self, x: torch.Tensor):
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"this DHU-Net was built for (B, 3, {self.img_size}, {self.img_size}) inputs, got "
                f"{tuple(x.shape)}; build it with img_size=<a multiple of 32> to match your data"
            )
        size = x.shape[-2:]
        g, loc = self.encode(x)
        d16 = self.fuse4(g[3], loc[3])
        d8 = self.fuse3(g[2], loc[2], d16)
        d4 = self.fuse2(g[1], loc[1], d8)
        logits = self.head(self.fuse1(g[0], loc[0], d4))
        if not self.training:
            return logits
        deep = tuple(
            F.interpolate(head(m), size=size, mode="bilinear", align_corners=False)
            for head, m in zip(self.deep_heads, (d4, d8, d16))
        )
        return logits, deep


@register_model("dhunet")
def dhunet(num_classes: int = 4, img_size: int = 224, **kwargs) -> DHUNet:
    """The paper configuration (about 55.4 M parameters at 4 classes)."""
    return DHUNet(num_classes=num_classes, img_size=img_size, config=PAPER, **kwargs)


@register_model("dhunet-tiny")
def dhunet_tiny(num_classes: int = 4, img_size: int = 64, **kwargs) -> DHUNet:
    """Same code path with C=16, two blocks per stage in both branches and window 4 (about 1.4 M
    parameters): CPU tests and the CPU demo."""
    return DHUNet(num_classes=num_classes, img_size=img_size, config=TINY, **kwargs)
