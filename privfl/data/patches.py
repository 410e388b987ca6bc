"""Patch-level classification datasets: one tissue label per image instead of a mask.

- `PatchClassification`: a view of a segmentation dataset (items ``(image, mask)``) whose item
  ``i`` is ``(image, label)``, the label being the patch's dominant tissue class, i.e. the most
  frequent non-background class of its mask (0 when the mask is all background).
- `ImageFolderPatches`: real labelled patches on disk, one sub-folder per class
  (``root/<class name>/*.png|jpg|tif``).

Both expose ``labels`` (int64 tensor), ``num_classes`` and ``class_counts()``, which is what the
embedding pipeline of :mod:`privfl.sharing` reads (docs/dpcvae.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from privfl.data.errors import DataError
from privfl.data.folder import SegmentationFolder
from privfl.data.synthetic import SyntheticHistology

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderPatches", "PatchClassification", "dominant_label"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""File suffixes (compared case-insensitively) that `ImageFolderPatches` reads."""


def dominant_label(mask: torch.Tensor | np.ndarray) -> int:
    """Most frequent non-background class (>= 1) of an integer mask; 0 if it is all background.

    Ties go to the smallest class (``argmax``). Negative mask values are an error.
    """
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    flat = arr.astype(np.int64, copy=False).ravel()
    if flat.size and flat.min() < 0:
        raise ValueError(f"mask values must be >= 0, got {int(flat.min())}")
    counts = np.bincount(flat, minlength=1)
    if counts.size < 2 or counts[1:].sum() == 0:
        return 0
    return int(np.argmax(counts[1:]) + 1)


def _resolve(base: Dataset, index: int) -> tuple[Dataset, int]:
    """Follow (nested) `Subset` s down to the underlying dataset and its index."""
    while isinstance(base, Subset):
        index = int(base.indices[index])
        base = base.dataset
    return base, index


def _root_attr(base: Dataset, name: str) -> object | None:
    while isinstance(base, Subset):
        base = base.dataset
    return getattr(base, name, None)


class _LabelledPatches(Dataset):
    """What both patch datasets share: ``labels``, ``class_counts()`` and the index check of
    ``__getitem__``. A subclass sets ``_labels`` (int64, one per item) and defines ``__len__`` and
    ``num_classes``."""

    _labels: torch.Tensor

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes of the label space."""
        raise NotImplementedError

    def _position(self, index: int) -> int:
        """``index`` (negative counts from the end) as a position in ``0..len(self) - 1``;
        ``IndexError`` when out of range."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of length {n}")
        return int(index) % n

    @property
    def labels(self) -> torch.Tensor:
        """Labels of all items, int64 tensor ``(len(self),)`` (a copy; no image is loaded)."""
        return self._labels.clone()

    def class_counts(self) -> torch.Tensor:
        """Number of items per class, int64 tensor ``(num_classes,)``."""
        return torch.bincount(self._labels, minlength=self.num_classes)


class PatchClassification(_LabelledPatches):
    """Patch-classification view of a segmentation dataset: item ``i`` is ``(image, label)``.

    Args:
        base: a dataset of ``(image, mask)`` pairs, e.g. `SyntheticHistology`,
            `SegmentationFolder`, or a (nested) ``torch.utils.data.Subset`` of one.
        num_classes: size of the label space. Default: the ``num_classes`` attribute of the
            underlying dataset (4 for `SyntheticHistology`), else the largest label + 1.
        drop_background: leave out patches whose label is 0 (masks that are all background).

    The label of a patch is its dominant tissue class: the most frequent non-background class of
    its mask, 0 if the mask is all background (ties: the smallest class). For `SyntheticHistology`
    and `SegmentationFolder` (also inside Subsets) labels come from their ``dominant_class``
    method, which reads masks only, so no image is rendered or decoded at construction; any other
    dataset is read once, item by item, at construction. Labels are those of the untransformed
    masks (a dataset ``transform`` that only flips or rotates does not change them).

    ``ds[i]`` returns ``(image, label)``: the base dataset's image (float ``3 x H x W``) and a
    Python ``int`` in ``0..num_classes-1``.
    """

    def __init__(
        self, base: Dataset, num_classes: int | None = None, *, drop_background: bool = True
    ) -> None:
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.base = base
        self.drop_background = bool(drop_background)
        n = len(base)  # type: ignore[arg-type]
        all_labels = np.fromiter((self._label_of(i) for i in range(n)), dtype=np.int64, count=n)
        if num_classes is None:
            attr = _root_attr(base, "num_classes")
            if isinstance(attr, int):
                num_classes = attr
            else:
                num_classes = int(all_labels.max()) + 1 if all_labels.size else 1
        if all_labels.size and all_labels.max() >= num_classes:
            bad = int(np.flatnonzero(all_labels >= num_classes)[0])
            raise ValueError(
                f"patch {bad} has label {int(all_labels[bad])}, outside 0..{num_classes - 1} "
                f"(num_classes={num_classes})"
            )
        self._num_classes = int(num_classes)
        keep = all_labels != 0 if self.drop_background else np.ones(n, dtype=bool)
        self.indices: np.ndarray = np.flatnonzero(keep).astype(np.int64)
        """Indices into ``base`` of the patches kept, in increasing order."""
        self._labels = torch.from_numpy(all_labels[keep].copy())

    def _label_of(self, index: int) -> int:
        root, j = _resolve(self.base, index)
        if isinstance(root, (SyntheticHistology, SegmentationFolder)):
            return int(root.dominant_class(j))
        item = self.base[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(
                f"PatchClassification needs a dataset of (image, mask) pairs; item {index} is "
                f"{type(item).__name__}"
            )
        return dominant_label(item[1])

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._position(index)
        image = self.base[int(self.indices[index])][0]
        return image, int(self._labels[index])

    # ------------------------------------------------------------------ label summaries
    # ``labels`` (the kept patches') and ``class_counts()``: from _LabelledPatches
    @property
    def num_classes(self) -> int:
        """Number of classes of the label space (including background 0, even when dropped)."""
        return self._num_classes


ImageTransform = Callable[[torch.Tensor], torch.Tensor]


class ImageFolderPatches(_LabelledPatches):
    """Labelled image patches on disk, one sub-folder per class: ``root/<class name>/<file>``.

    Args:
        root: directory whose sub-directories are the classes. Classes are the sub-directory
            names sorted alphabetically (hidden ones, starting with ``.``, are ignored); class
            ``k`` is ``classes[k]``. Files directly in ``root`` are ignored.
        size: images are resized (bilinear) to ``size x size`` pixels; non-square images are
            stretched.
        transform: optional callable applied to each image tensor after loading.
        extensions: file suffixes read (case-insensitive); other files are ignored.

    ``ds[i]`` returns ``(image, label)``: float32 ``3 x size x size`` in [0, 1] (RGB; grey or
    RGBA images are converted) and a Python ``int``. Construction raises `DataError` when ``root``
    is not a directory, has no class sub-directory, or a class sub-directory holds no image; a
    file that cannot be decoded raises `DataError` naming it when it is loaded.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 64,
        *,
        transform: ImageTransform | None = None,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1 pixel, got {size}")
        self.root = Path(root)
        self.size = int(size)
        self.transform = transform
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        if not self.root.is_dir():
            raise DataError(f"image folder not found (or not a directory): {self.root}")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{self.root} has no class sub-folders; expected root/<class name>/<image files>")
        self.classes: list[str] = [p.name for p in class_dirs]
        """Class names (sub-folder names), sorted; label ``k`` is ``classes[k]``."""
        self.paths: list[Path] = []
        """Image files, grouped by class and sorted by name within a class."""
        labels: list[int] = []
        for k, folder in enumerate(class_dirs):
            files = sorted(
                p
                for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
            )
            if not files:
                raise DataError(f"class folder {folder} holds no image files ({', '.join(exts)})")
            self.paths += files
            labels += [k] * len(files)
        self._labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._position(index)
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image file {path}: {exc}") from exc
        if rgb.size != (self.size, self.size):
            rgb = rgb.resize((self.size, self.size), Image.Resampling.BILINEAR)
        image = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self._labels[index])

    # ``labels`` and ``class_counts()`` (images per class): from _LabelledPatches
    @property
    def num_classes(self) -> int:
        """Number of classes (sub-folders)."""
        return len(self.classes)
