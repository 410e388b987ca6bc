"""Joint image/mask augmentation for segmentation (the DHUnet recipe: flips, 90° rotations, HSV jitter).

Built on ``torchvision.transforms.v2``: the image is wrapped as :class:`tv_tensors.Image` and the
mask as :class:`tv_tensors.Mask`, so every geometric op (flips, rotations) moves both the same way
and the colour op (``ColorJitter``) touches the image only. Rotations are exact multiples of 90°
(``torch.rot90``, no interpolation), so masks keep their exact integer labels.

Randomness: every draw comes from torch's global RNG (``torch.rand`` / ``torch.randint`` inside the
transforms). Seed it with ``torch.manual_seed`` for reproducible draws; the FL client seeds it per
(seed, round, client). Passing ``generator=`` instead draws one seed from that generator and runs
the augmentation under a forked global RNG, so the caller's global RNG state is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["Augment", "AugmentedDataset", "JointAugment", "RandomRot90", "dhunet_augment"]

Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Per-sample joint augmentation ``(image 3×H×W, mask H×W) -> (image, mask)`` drawing from torch's
global RNG, which the trainers seed per (seed, round, client)."""


class AugmentedDataset(Dataset):
    """``data`` with ``augment`` applied to every ``(image, mask)`` pair as it is read."""

    def __init__(self, data: Dataset, augment: Augment):
        self.data, self.augment = data, augment

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return self.augment(*self.data[i])


class RandomRot90(v2.Transform):
    """Rotate image and mask together by ``k · 90°`` with ``k`` uniform in {0, 1, 2, 3} (exact, no
    interpolation). Acts on :class:`tv_tensors.Image` and :class:`tv_tensors.Mask` over the last two
    dimensions; boxes and keypoints are not supported (raises ``TypeError``)."""

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        """Refuse tv_tensors other than images and masks (boxes or keypoints would need rotating too)."""
        for inpt in flat_inputs:
            if isinstance(inpt, tv_tensors.TVTensor) and not isinstance(inpt, self._transformed_types):
                raise TypeError(
                    "RandomRot90 supports only tv_tensors.Image and tv_tensors.Mask, got "
                    f"{type(inpt).__name__}"
                )

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        k = params["k"]
        if k == 0:
            return inpt
        out = torch.rot90(inpt.as_subclass(torch.Tensor), k, dims=(-2, -1))
        return tv_tensors.wrap(out, like=inpt)


class JointAugment:
    """Random flips, random 90° rotations and HSV jitter, applied jointly to an image and its mask.

    - ``hflip`` / ``vflip``: probability of a horizontal / vertical flip (both image and mask);
    - ``rot90``: rotate both by 0, 90, 180 or 270 degrees, each with probability 1/4 (exact; needs
      square inputs: a non-square input raises ``ValueError`` at call time);
    - ``hsv = (h, s, v)``: on the image only, hue shift uniform in ±h (fraction of the hue circle,
      h ≤ 0.5), saturation and value (brightness) scaled by factors uniform in 1 ± s and 1 ± v
      (``v2.ColorJitter``, which applies the three in random order). ``(0, 0, 0)`` disables it.

    Call: ``aug(image, mask) -> (image, mask)`` with ``image`` a float ``(3, H, W)`` tensor in [0, 1]
    and ``mask`` an integer ``(H, W)`` tensor; returns plain tensors: the image clamped to [0, 1] in
    its input dtype, the mask as int64 with the same label values. Batches ``(B, 3, H, W)`` /
    ``(B, H, W)`` are accepted too, each sample drawing its own augmentation, so an instance also
    fits :class:`privfl.fl.client.Client`'s ``augment(images, masks, generator)`` hook.

    Randomness comes from torch's global RNG (seed it with ``torch.manual_seed``) unless a
    ``generator`` is passed, see the module docstring.
    """

    def __init__(
        self,
        hflip: float = 0.5,
        vflip: float = 0.5,
        rot90: bool = True,
        hsv: tuple[float, float, float] = (0.05, 0.2, 0.2),
    ):
        for name, p in (("hflip", hflip), ("vflip", vflip)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if len(hsv) != 3:
            raise ValueError(f"hsv must be (hue, saturation, value), got {hsv!r}")
        hue, sat, val = (float(x) for x in hsv)
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue jitter hsv[0] must be in [0, 0.5], got {hue}")
        for name, x in (("saturation hsv[1]", sat), ("value hsv[2]", val)):
            if not 0.0 <= x < 1.0:
                raise ValueError(f"{name} jitter must be in [0, 1), got {x}")
        self.hflip = float(hflip)
        self.vflip = float(vflip)
        self.rot90 = bool(rot90)
        self.hsv = (hue, sat, val)
        ops: list[v2.Transform] = []
        if self.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(self.hflip))
        if self.vflip > 0:
            ops.append(v2.RandomVerticalFlip(self.vflip))
        if self.rot90:
            ops.append(RandomRot90())
        if any(self.hsv):
            # ColorJitter transforms tv_tensors.Image and passes tv_tensors.Mask through unchanged.
            ops.append(v2.ColorJitter(brightness=val, saturation=sat, hue=hue))
        self.transform = v2.Compose(ops) if ops else None

    def __repr__(self) -> str:
        return f"JointAugment(hflip={self.hflip}, vflip={self.vflip}, rot90={self.rot90}, hsv={self.hsv})"

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(image, mask)
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (), generator=generator).item())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._apply(image, mask)
        return self._apply(image, mask)

    def _check(self, image: torch.Tensor, mask: torch.Tensor) -> None:
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"image must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"image must be a float tensor in [0, 1], got {image.dtype}")
        if mask.is_floating_point() or mask.dtype == torch.bool:
            raise TypeError(f"mask must be an integer label tensor, got {mask.dtype}")
        if tuple(mask.shape) != tuple(image.shape[:-3]) + tuple(image.shape[-2:]):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}"
            )
        h, w = image.shape[-2:]
        if self.rot90 and h != w:
            raise ValueError(
                f"rot90=True needs square images (a 90° rotation would swap height and width), got {h}×{w}; "
                f"crop to a square or build JointAugment(rot90=False)"
            )

    def _apply(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim == 4:
            pairs = [self._apply_one(i, m) for i, m in zip(image, mask)]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return self._apply_one(image, mask)

    def _apply_one(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transform is not None:
            img, msk = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
            image, mask = img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor)
        return image.clamp(0.0, 1.0), mask.to(torch.int64)


def dhunet_augment() -> JointAugment:
    """The DHUnet training recipe: horizontal and vertical flips (p = 0.5 each), random 90° rotations
    and HSV jitter (hue ± 0.05, saturation and value × 1 ± 0.2) on the image."""
    return JointAugment(hflip=0.5, vflip=0.5, rot90=True, hsv=(0.05, 0.2, 0.2))
