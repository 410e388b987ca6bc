"""Segmentation datasets on disk in the DHUnet / WSSS4LUAD folder layout.

Layout (all list entries are paths relative to ``root``, one per line)::

    root/images/<name>.jpg|png          RGB patches
    root/masks/<name>.png               index PNGs ('L' or 'P'), pixel value = class id
    root/lists/<list_name>/train_images.txt, train_masks.txt
    root/lists/<list_name>/test_images.txt,  test_masks.txt

Line ``k`` of ``<split>_images.txt`` pairs with line ``k`` of ``<split>_masks.txt``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from privfl.data.errors import DataError

__all__ = ["SegmentationFolder", "write_segmentation_folder", "list_paths"]

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def list_paths(root: str | Path, list_name: str, split: str) -> tuple[Path, Path]:
    """Paths of the image and mask list files of ``split`` in list ``list_name``."""
    base = Path(root) / "lists" / list_name
    return base / f"{split}_images.txt", base / f"{split}_masks.txt"


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"list file not found: {path}")
    with path.open("r", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image file {path}: {exc}") from exc
    return img


class SegmentationFolder(Dataset):
    """Image/mask pairs listed in ``root/lists/<list_name>/<split>_{images,masks}.txt``.

    Args:
        root: dataset root directory.
        list_name: sub-directory of ``root/lists``.
        split: ``"train"`` or ``"test"`` (any name with matching list files works).
        num_classes: masks must hold values in ``0..num_classes-1``.
        transform: optional callable ``(image, mask) -> (image, mask)`` applied after loading.
        size: if given, images are resized to ``size x size`` pixels (bilinear) and masks too
            (nearest neighbour, so labels are never mixed).

    ``ds[i]`` returns ``(image, mask)``: float32 ``3 x H x W`` in [0, 1] and int64 ``H x W``.
    Construction checks that the list files exist, have equal lengths and that every listed file
    exists; a mask value ``>= num_classes`` or an image/mask shape mismatch is reported when the
    sample is loaded. All failures raise `DataError` naming the file.
    """

    def __init__(
        self,
        root: str | Path,
        list_name: str,
        split: str = "train",
        num_classes: int = 4,
        transform: Transform | None = None,
        size: int | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1 pixel, got {size}")
        self.root = Path(root)
        self.list_name = list_name
        self.split = split
        self.num_classes = int(num_classes)
        self.transform = transform
        self.size = size
        images_list, masks_list = list_paths(self.root, list_name, split)
        images = _read_list(images_list)
        masks = _read_list(masks_list)
        if len(images) != len(masks):
            raise DataError(
                f"{images_list} lists {len(images)} images but {masks_list} lists {len(masks)} masks"
            )
        self.image_paths = [self.root / p for p in images]
        self.mask_paths = [self.root / p for p in masks]
        for path in (p for pair in zip(self.image_paths, self.mask_paths) for p in pair):
            if not path.is_file():
                raise DataError(f"listed file not found: {path}")

    def __len__(self) -> int:
        return len(self.image_paths)

    def load_mask(self, index: int) -> np.ndarray:
        """The mask of sample ``index`` as an integer ``H x W`` array (at the requested ``size``)."""
        path = self.mask_paths[index]
        img = _open(path)
        if len(img.getbands()) != 1:
            raise DataError(f"mask {path} has mode {img.mode!r}; expected a single-channel index PNG")
        if self.size is not None and img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.NEAREST)
        mask = np.asarray(img).astype(np.int64)
        if mask.size and (mask.min() < 0 or mask.max() >= self.num_classes):
            bad = int(mask.max()) if mask.max() >= self.num_classes else int(mask.min())
            raise DataError(f"mask {path} has value {bad}, outside 0..{self.num_classes - 1}")
        return mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset of length {len(self)}")
        index = index % len(self)
        path = self.image_paths[index]
        img = _open(path).convert("RGB")
        raw_size = img.size
        mask_img = _open(self.mask_paths[index])
        if mask_img.size != raw_size:
            raise DataError(
                f"image {path} is {raw_size[0]}x{raw_size[1]} but mask {self.mask_paths[index]} "
                f"is {mask_img.size[0]}x{mask_img.size[1]} (width x height)"
            )
        if self.size is not None and img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        mask = torch.from_numpy(self.load_mask(index))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask

    def class_histogram(self, index: int) -> np.ndarray:
        """Pixel fraction of each class in sample ``index`` (length ``num_classes``, sums to 1)."""
        counts = np.bincount(self.load_mask(index).ravel(), minlength=self.num_classes)
        return counts / max(counts.sum(), 1)

    def dominant_class(self, index: int) -> int:
        """Most frequent non-background class (>= 1) of sample ``index``; 0 if only background."""
        counts = np.bincount(self.load_mask(index).ravel(), minlength=self.num_classes)
        if counts[1:].sum() == 0:
            return 0
        return int(np.argmax(counts[1:]) + 1)


def _to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """CHW float in [0, 1] (tensor or array) or HWC uint8 -> HWC uint8."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8:
        if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = np.moveaxis(arr, 0, -1)
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    elif arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (3xHxW float or HxWx3 uint8), got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def write_segmentation_folder(
    root: str | Path,
    samples: Iterable[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]],
    list_name: str,
    split: str = "train",
    image_format: str = "jpg",
    quality: int = 95,
) -> int:
    """Write ``(image, mask)`` pairs to ``root`` in the `SegmentationFolder` layout.

    Images may be float ``3 x H x W`` in [0, 1] (tensor or array) or uint8 ``H x W x 3``; masks
    integer ``H x W`` with values in 0..255. Images are saved as ``images/<list>_<split>_<k>.jpg``
    (JPEG at ``quality``, no chroma subsampling) or ``.png`` (lossless) for
    ``image_format="png"``; masks as ``masks/<list>_<split>_<k>.png`` ('L' mode). The list files
    of ``split`` are (over)written. Returns the number of samples written.
    """
    fmt = image_format.lower().lstrip(".")
    if fmt not in ("jpg", "jpeg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    ext = "png" if fmt == "png" else "jpg"
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    images_list, masks_list = list_paths(root, list_name, split)
    images_list.parent.mkdir(parents=True, exist_ok=True)
    image_lines: list[str] = []
    mask_lines: list[str] = []
    for k, (image, mask) in enumerate(samples):
        rgb = _to_uint8_image(image)
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.ndim != 2 or m.shape != rgb.shape[:2]:
            raise ValueError(f"sample {k}: mask shape {m.shape} does not match image shape {rgb.shape[:2]}")
        if m.size and (m.min() < 0 or m.max() > 255):
            raise ValueError(f"sample {k}: mask values must lie in 0..255")
        stem = f"{list_name}_{split}_{k:05d}"
        image_rel = f"images/{stem}.{ext}"
        mask_rel = f"masks/{stem}.png"
        if ext == "jpg":
            Image.fromarray(rgb).save(root / image_rel, quality=quality, subsampling=0)
        else:
            Image.fromarray(rgb).save(root / image_rel)
        Image.fromarray(m.astype(np.uint8)).save(root / mask_rel)
        image_lines.append(image_rel)
        mask_lines.append(mask_rel)
    images_list.write_text("".join(f"{p}\n" for p in image_lines), encoding="utf-8")
    masks_list.write_text("".join(f"{p}\n" for p in mask_lines), encoding="utf-8")
    return len(image_lines)
