"""Sliding-window tiling of whole-slide images (WSIs) read with tiffslide.

Coordinates follow tiffslide/OpenSlide: ``(x, y)`` is (column, row), and a tile's ``x, y`` are in
level-0 pixels whatever level it was read at. ``window`` and ``stride`` are in pixels of the level
being read; only windows lying entirely inside the level are produced (row-major order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiffslide
from PIL import Image, UnidentifiedImageError

from privfl.data.errors import DataError

__all__ = ["Tile", "tile_wsi", "tissue_fraction"]


@dataclass(frozen=True)
class Tile:
    """One tile of a slide.

    Attributes:
        x, y: top-left corner of the window in level-0 pixels.
        image: uint8 ``size x size x 3`` RGB array.
        mask: uint8 ``size x size`` label array (nearest-neighbour resized), or None.
        tissue_fraction: fraction (0..1) of the tile's pixels that are tissue, see `tissue_fraction`.
    """

    x: int
    y: int
    image: np.ndarray
    mask: np.ndarray | None
    tissue_fraction: float


def tissue_fraction(rgb: np.ndarray, saturation: float = 0.07, grey: float = 0.8) -> float:
    """Fraction of pixels of a uint8 ``H x W x 3`` image that are tissue, not near-white glass.

    A pixel is tissue if its HSV saturation ``(max - min) / max`` exceeds ``saturation`` or its
    grey level (mean of R, G, B, in [0, 1]) is below ``grey``.
    """
    x = rgb[..., :3].astype(np.float32) / 255.0
    mx = x.max(axis=-1)
    sat = (mx - x.min(axis=-1)) / np.maximum(mx, 1e-6)
    tissue = (sat > saturation) | (x.mean(axis=-1) < grey)
    return float(tissue.mean())


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.rint(arr * 255.0), 0, 255)
        else:
            arr = np.clip(arr, 0, 255)
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


class _MaskReader:
    """Reads level-0 regions of a label image: a TIFF (via tiffslide) or any PIL-readable image."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._slide: tiffslide.TiffSlide | None = None
        self._array: np.ndarray | None = None
        if not path.is_file():
            raise DataError(f"mask file not found: {path}")
        if path.suffix.lower() in (".tif", ".tiff", ".svs", ".ndpi"):
            try:
                self._slide = tiffslide.TiffSlide(path)
            except Exception as exc:  # tiffslide raises many types for unreadable files
                raise DataError(f"cannot read mask {path}: {exc}") from exc
            self.dimensions = tuple(self._slide.dimensions)
        else:
            try:
                with Image.open(path) as img:
                    if len(img.getbands()) != 1:
                        raise DataError(
                            f"mask {path} has mode {img.mode!r}; expected a single-channel label image"
                        )
                    self._array = np.asarray(img)
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot read mask {path}: {exc}") from exc
            self.dimensions = (self._array.shape[1], self._array.shape[0])

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._slide is not None:
            try:
                arr = np.asarray(self._slide.read_region((x, y), 0, (w, h), as_array=True))
            except Exception as exc:
                raise DataError(
                    f"cannot read region ({x}, {y}, {w}, {h}) of mask {self.path}: {exc}"
                ) from exc
            if arr.ndim == 3:
                arr = arr[..., 0]
        else:
            assert self._array is not None
            arr = self._array[y : y + h, x : x + w]
        return np.ascontiguousarray(arr)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()


def tile_wsi(
    path: str | Path,
    window: int,
    stride: int,
    size: int,
    mask_path: str | Path | None = None,
    tissue_threshold: float = 0.1,
    level: int = 0,
) -> list[Tile]:
    """Cut a slide into ``size x size`` tiles with a sliding window, skipping background tiles.

    Args:
        path: slide readable by ``tiffslide.TiffSlide`` (pyramidal or plain TIFF, SVS, ...).
        window: window side in pixels of ``level`` (e.g. 1000 or 448).
        stride: step between windows in pixels of ``level`` (e.g. 500 or 224).
        size: output tile side in pixels (e.g. 224); images resized bilinearly.
        mask_path: optional label image with the slide's level-0 dimensions (TIFF read with
            tiffslide, or PNG); its windows are resized with nearest neighbour so labels stay in
            the label set.
        tissue_threshold: tiles whose tissue fraction (see `tissue_fraction`, measured on the
            resized tile) is below this fraction are skipped; 0 keeps every tile.
        level: pyramid level to read the image from.

    Returns:
        Tiles in row-major order of their windows.

    Raises:
        DataError: the slide or mask is missing/unreadable, or their dimensions disagree.
        ValueError: invalid ``window``, ``stride``, ``size``, ``tissue_threshold`` or ``level``.
    """
    for name, value in (("window", window), ("stride", stride), ("size", size)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= tissue_threshold <= 1.0:
        raise ValueError(f"tissue_threshold must be a fraction in [0, 1], got {tissue_threshold}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"slide file not found: {path}")
    try:
        slide = tiffslide.TiffSlide(path)
    except Exception as exc:  # tiffslide raises many types for unreadable files
        raise DataError(f"cannot read slide {path}: {exc}") from exc
    mask_reader: _MaskReader | None = None
    try:
        if not 0 <= level < slide.level_count:
            raise ValueError(f"level must be in 0..{slide.level_count - 1} for slide {path}, got {level}")
        width, height = slide.level_dimensions[level]
        downsample = float(slide.level_downsamples[level])
        if mask_path is not None:
            mask_reader = _MaskReader(Path(mask_path))
            if tuple(mask_reader.dimensions) != tuple(slide.dimensions):
                raise DataError(
                    f"mask {mask_path} is {mask_reader.dimensions[0]}x{mask_reader.dimensions[1]} but slide "
                    f"{path} is {slide.dimensions[0]}x{slide.dimensions[1]} at level 0 (width x height)"
                )
        window0 = max(1, int(round(window * downsample)))
        tiles: list[Tile] = []
        for ly in range(0, height - window + 1, stride):
            for lx in range(0, width - window + 1, stride):
                x0, y0 = int(round(lx * downsample)), int(round(ly * downsample))
                try:
                    region = slide.read_region((x0, y0), level, (window, window), as_array=True)
                except Exception as exc:
                    raise DataError(f"cannot read region at ({x0}, {y0}) of slide {path}: {exc}") from exc
                rgb = _as_rgb(np.asarray(region))
                if window != size:
                    rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
                frac = tissue_fraction(rgb)
                if frac < tissue_threshold:
                    continue
                mask = None
                if mask_reader is not None:
                    w0 = min(window0, slide.dimensions[0] - x0)
                    h0 = min(window0, slide.dimensions[1] - y0)
                    m = mask_reader.read(x0, y0, w0, h0)
                    if m.dtype != np.uint8:
                        if m.size and (m.min() < 0 or m.max() > 255):
                            raise DataError(f"mask {mask_path} has labels outside 0..255")
                        m = m.astype(np.uint8)
                    if m.shape != (size, size):
                        m = np.asarray(Image.fromarray(m).resize((size, size), Image.Resampling.NEAREST))
                    mask = m
                tiles.append(Tile(x=x0, y=y0, image=rgb, mask=mask, tissue_fraction=frac))
        return tiles
    finally:
        slide.close()
        if mask_reader is not None:
            mask_reader.close()
