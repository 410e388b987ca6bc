"""A small U-Net baseline: fast enough for CPU tests, the CPU demo and attack experiments."""

from __future__ import annotations

import torch
from torch import nn

from privfl.models.registry import register_model


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with ``len(widths)`` resolution levels.

    Input ``(B, 3, H, W)`` with H and W multiples of ``2 ** (len(widths) - 1)``; output logits
    ``(B, num_classes, H, W)``.
    """

    def __init__(self, num_classes: int = 4, widths: tuple[int, ...] = (16, 32, 64), in_chans: int = 3):
        super().__init__()
        if len(widths) < 2:
            raise ValueError("UNet needs at least two levels")
        self.widths = tuple(widths)
        self.down = nn.ModuleList()
        cin = in_chans
        for w in widths:
            self.down.append(_conv_block(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w_skip, w_in in zip(reversed(widths[:-1]), reversed(widths[1:])):
            self.up.append(nn.ConvTranspose2d(w_in, w_skip, 2, stride=2))
            self.dec.append(_conv_block(2 * w_skip, w_skip))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @property
    def input_multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.input_multiple
        if x.ndim != 4 or x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"UNet expects (B, C, H, W) with H, W multiples of {m}, got {tuple(x.shape)}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


@register_model("unet")
def unet(num_classes: int = 4, widths: tuple[int, ...] = (16, 32, 64), **kwargs) -> UNet:
    """A small U-Net baseline (channels per level ``widths``)."""
    return UNet(num_classes=num_classes, widths=widths, **kwargs)


@register_model("unet-tiny")
def unet_tiny(num_classes: int = 4, **kwargs) -> UNet:
    """The smallest U-Net (widths 8, 16): for tests and quick runs."""
    return UNet(num_classes=num_classes, widths=(8, 16), **kwargs)


@register_model("unet-wide")
def unet_wide(num_classes: int = 4, **kwargs) -> UNet:
    """48 channels at full resolution: what a model with wide early layers leaks to gradient inversion
    (the attack-vs-dp cpu-quick preset; ``dhunet-tiny`` sees the image only through 4×4 patchify stems)."""
    return UNet(num_classes=num_classes, widths=(48, 96), **kwargs)
