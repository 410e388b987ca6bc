"""DSL's networks: the central mask-conditioned generator and a site's PatchGAN discriminator.

Both follow pix2pix (Isola et al. 2017) as used by Chang et al. (2023):

* :class:`MaskToImageGenerator` — the ResNet encoder-decoder: a 7×7 convolution, two stride-2
  3×3 convolutions, ``n_blocks`` (default 9) residual blocks, two stride-2 transposed
  convolutions and a 7×7 output convolution; BatchNorm + ReLU; reflection padding; dropout
  inside the residual blocks is the generator's only randomness (there is no noise input), and it
  stays on when sampling. Input: a one-hot segmentation mask; output: ``3·M`` channels in [0, 1],
  one RGB group per modality (``M = 1`` for plain DSL, ``M > 1`` for MM-DSL).
* :class:`PatchDiscriminator` — the 70×70 PatchGAN (``n_layers = 3``): 4×4 convolutions with
  stride 2, then stride 1, BatchNorm + LeakyReLU(0.2), one logit per patch; conditioned on the
  mask by concatenating its one-hot map to the image. One per site (per modality per site in
  MM-DSL); it never leaves its site.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskToImageGenerator", "PatchDiscriminator", "one_hot_mask"]


def one_hot_mask(mask: Tensor, num_classes: int) -> Tensor:
    """``(B, H, W)`` integer labels → ``(B, num_classes, H, W)`` float one-hot (a float ``(B, C, H, W)``
    passes through)."""
    if mask.ndim == 4:
        if mask.shape[1] != num_classes:
            raise ValueError(f"one-hot mask has {mask.shape[1]} channels, expected {num_classes}")
        return mask.float()
    if mask.ndim != 3:
        raise ValueError(
            f"mask must be (B, H, W) labels or (B, C, H, W) one-hot, got shape {tuple(mask.shape)}"
        )
    return F.one_hot(mask.long(), num_classes).permute(0, 3, 1, 2).float()


def _positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _ResidualBlock(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.BatchNorm2d(dim)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class MaskToImageGenerator(nn.Module):
    """pix2pix ResNet generator: one-hot mask ``(B, C, H, W)`` → images ``(B, 3·M, H, W)`` in [0, 1].

    Args:
        num_classes: mask classes ``C``.
        modalities: ``M``, the number of 3-channel image groups produced (one per stain/modality).
        ngf: width of the first layer (pix2pix: 64).
        n_blocks: residual blocks at the bottleneck (pix2pix: 9).
        dropout: dropout probability in the residual blocks (the source of randomness).

    ``H`` and ``W`` must be multiples of 4.
    """

    def __init__(
        self,
        num_classes: int = 4,
        modalities: int = 1,
        *,
        ngf: int = 64,
        n_blocks: int = 9,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _positive(num_classes=num_classes, modalities=modalities, ngf=ngf)
        if int(n_blocks) != n_blocks or n_blocks < 0:
            raise ValueError(f"n_blocks must be a non-negative integer, got {n_blocks!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes, self.modalities = int(num_classes), int(modalities)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(num_classes, ngf, 7, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
        ]
        for mult in (1, 2):
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [_ResidualBlock(ngf * 4, dropout) for _ in range(int(n_blocks))]
        for mult in (4, 2):
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=False
                ),
                nn.BatchNorm2d(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3 * self.modalities, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, mask: Tensor) -> Tensor:
        """Images ``(B, 3·M, H, W)`` in [0, 1] for masks ``(B, H, W)`` (labels) or ``(B, C, H, W)``
        (one-hot)."""
        x = one_hot_mask(mask, self.num_classes).to(next(self.parameters()).dtype)
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"mask height and width must be multiples of 4, got {tuple(x.shape[-2:])}")
        return (self.net(x) + 1) / 2


class PatchDiscriminator(nn.Module):
    """Mask-conditioned PatchGAN: ``(image (B, 3, H, W), mask) → patch logits (B, 1, h, w)``.

    Args:
        num_classes: mask classes (concatenated to the image as one-hot channels).
        image_channels: channels of the judged image (3: one modality).
        ndf: width of the first layer (pix2pix: 64).
        n_layers: stride-2 layers (3 gives the 70×70 receptive field).
    """

    def __init__(
        self, num_classes: int = 4, image_channels: int = 3, *, ndf: int = 64, n_layers: int = 3
    ) -> None:
        super().__init__()
        _positive(num_classes=num_classes, image_channels=image_channels, ndf=ndf, n_layers=n_layers)
        self.num_classes = int(num_classes)
        layers: list[nn.Module] = [
            nn.Conv2d(image_channels + num_classes, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, int(n_layers) + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        """Patch logits ``(B, 1, h, w)`` that ``image`` is a real image for ``mask``."""
        return self.net(torch.cat([image, one_hot_mask(mask, self.num_classes).to(image.dtype)], dim=1))
