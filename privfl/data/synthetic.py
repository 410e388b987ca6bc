"""Procedural H&E-like histology patches with exact segmentation masks.

`SyntheticHistology` is privfl's embedded default dataset: nothing is downloaded. Each sample is a
square RGB patch with a per-pixel label mask over the four WSSS4LUAD classes

    0 background (near-white glass), 1 normal tissue, 2 tumour-associated stroma, 3 tumour epithelium.

How a patch is made (all lengths in pixels, concentrations in skimage's HED units):

1. Layout: smooth random fields (low-resolution noise upsampled with a cubic spline, plus a finer
   field that roughens region boundaries). A quantile threshold of one field cuts out background;
   the argmax of three biased fields assigns the tissue classes. The mask is this exact integer map.
2. Texture: per-class haematoxylin / eosin / residual (DAB-channel) concentrations. Normal tissue
   is pale, mottled cytoplasm with sparse small round nuclei; stroma is oriented, wavy eosin fibres
   with sparse elongated nuclei aligned to the fibres; tumour epithelium is dense, large,
   irregular, dark nuclei on a slightly basophilic cytoplasm. Class textures are blended with
   slightly blurred class weights, so region boundaries are soft in the image but not in the mask.
3. Colour: concentrations are perturbed per image (brightness/stain amount) and per site (a fixed
   scale and offset of H and E, the "hospital" stain profile), converted with
   `skimage.color.hed2rgb`, lightly blurred and given pixel noise.

Stains (``stain=``, one of `STAINS`): ``"he"`` (default) is the H&E rendering above. ``"ihc"``
renders the *same* tissue (same mask, nuclei and textures: the random draws are identical, only
the concentration table differs) as a DAB immunostain with haematoxylin counterstain, like a
pan-cytokeratin IHC: pale blue nuclei (0.6x the H&E nuclear haematoxylin), almost no eosin, and
brown DAB (the third HED channel) strong in tumour epithelium cytoplasm, weak in normal tissue and
absent from stroma and background. The two renderings of a sample are pixel-aligned, which is
what a multi-modal dataset (`privfl.data.multistain.MultiStainHistology`) builds on.

Colour alone does not separate the classes well: the class identity is mostly in texture and
nuclear morphology, which is what a segmentation network has to learn.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from skimage.color import hed2rgb
from skimage.draw import ellipse
from torch.utils.data import Dataset

__all__ = ["STAINS", "SyntheticHistology", "site_stain"]

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Seed-independent constant that keys the per-site stain RNG (so site k looks the same in every
# dataset, whatever its `seed`).
_SITE_STAIN_KEY = 0x5EED_57A1

# Layout RNG and render RNG are separate streams so that masks can be produced without rendering.
_LAYOUT_STREAM = 0
_RENDER_STREAM = 1

#: Stains `SyntheticHistology` can render: H&E and a DAB (pan-cytokeratin-like) IHC.
STAINS = ("he", "ihc")


class _StainProfile(NamedTuple):
    """Rendering constants of one stain (concentrations in skimage's HED units)."""

    base: tuple[tuple[float, float, float], ...]  # (H, E, D) of classes 0..3 before texture
    nuclear_h: float  # factor on the nuclear haematoxylin concentration
    nuclear_e_cut: float  # fraction of eosin displaced where a nucleus covers the pixel
    nuclear_d_cut: float  # fraction of the D channel displaced by nuclei


_STAIN_PROFILES = {
    "he": _StainProfile(
        base=((0.002, 0.002, 0.002), (0.010, 0.020, 0.013), (0.004, 0.034, 0.024), (0.022, 0.017, 0.011)),
        nuclear_h=1.0,
        nuclear_e_cut=0.6,
        nuclear_d_cut=0.4,
    ),
    # DAB on the cytoplasm of epithelium (strong in tumour, weak in normal), none in stroma;
    # haematoxylin counterstain lighter than in H&E; eosin only as a trace.
    "ihc": _StainProfile(
        base=((0.002, 0.0005, 0.0), (0.006, 0.002, 0.012), (0.005, 0.002, 0.0), (0.007, 0.002, 0.060)),
        nuclear_h=0.6,
        nuclear_e_cut=0.6,
        nuclear_d_cut=0.8,
    ),
}


def site_stain(site: int, stain_strength: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Return the stain profile ``(scale, offset)`` of a site, each of shape ``(3,)`` over (H, E, D).

    Site 0 is the reference stain: scale 1, offset 0. For site k >= 1 the H and E scales are
    ``1 ± 4·s·u`` and the offsets ``± 0.2·s·v`` (HED units) with ``s = stain_strength`` and
    ``u, v`` drawn in [0.5, 1] with random signs from an RNG keyed by ``k`` only; the residual
    channel gets a smaller offset. The profile is independent of the dataset seed.
    """
    if site < 0:
        raise ValueError(f"site must be >= 0, got {site}")
    if site == 0 or stain_strength == 0:
        return np.ones(3), np.zeros(3)
    rng = np.random.default_rng([_SITE_STAIN_KEY, site])
    sign = rng.choice([-1.0, 1.0], size=(2, 3))
    mag = rng.uniform(0.5, 1.0, size=(2, 3))
    scale = 1.0 + 4.0 * stain_strength * sign[0] * mag[0]
    offset = 0.2 * stain_strength * sign[1] * mag[1]
    scale[2] = 1.0 + 2.0 * stain_strength * sign[0, 2] * mag[0, 2]
    offset[2] = 0.1 * stain_strength * sign[1, 2] * mag[1, 2]
    return np.maximum(scale, 0.05), offset


@lru_cache(maxsize=64)
def _basis(size: int, cells: int, width: float) -> np.ndarray:
    """Gaussian interpolation matrix (size x cells+4) mapping a coarse noise grid to pixels."""
    centres = (np.arange(size) + 0.5) * cells / size + 1.5  # pixel centres in grid units
    knots = np.arange(cells + 4)
    b = np.exp(-0.5 * ((centres[:, None] - knots[None, :]) / width) ** 2)
    return b / b.sum(axis=1, keepdims=True)


def _field(rng: np.random.Generator, size: int, cells: int, width: float = 0.9) -> np.ndarray:
    """A smooth zero-mean, unit-std random field (size x size) with about `cells` features per side.

    White noise on a (cells+4)^2 grid is interpolated separably with a Gaussian kernel of `width`
    grid cells (smaller width: rougher field).
    """
    b = _basis(size, cells, width)
    f = b @ rng.standard_normal((cells + 4, cells + 4)) @ b.T
    return (f - f.mean()) / (f.std() + 1e-8)


class SyntheticHistology(Dataset):
    """Deterministic procedural H&E-like patches with exact 4-class masks.

    Args:
        length: number of samples (>= 1).
        size: patch side in pixels (>= 32); patches are ``size x size``.
        seed: dataset seed; sample ``i`` is generated from an RNG keyed by ``(seed, i)`` only, so
            samples are deterministic and independent of access order.
        sites: number of stain profiles cycled over samples (sample ``i`` has site ``i % sites``).
        site: if given, every sample uses this stain profile (overrides ``sites``).
        stain_strength: magnitude of the per-site stain shift (see `site_stain`); 0 disables it.
        stain: ``"he"`` (H&E, default) or ``"ihc"`` (DAB immunostain with haematoxylin
            counterstain: brown tumour epithelium, pale blue nuclei). Both render the same tissue:
            for a given ``(seed, i)`` the mask, nuclei and textures are identical and the images
            pixel-aligned; only the colours differ. Site stain profiles apply to both.
        transform: optional callable ``(image, mask) -> (image, mask)`` applied on every access,
            after generation and caching.
        cache: keep generated samples (as uint8 arrays) in memory.

    ``ds[i]`` returns ``(image, mask)``: ``image`` float32 tensor ``3 x size x size`` in [0, 1],
    ``mask`` int64 tensor ``size x size`` with values in ``0..3``. The layout (hence the mask) of
    sample ``i`` depends on ``(seed, i)`` only, not on its site: two datasets differing only in
    ``site`` have identical masks and differently stained images.
    """

    num_classes = 4
    CLASS_NAMES = ("background", "normal", "stroma", "tumour")

    def __init__(
        self,
        length: int,
        size: int = 64,
        seed: int = 0,
        sites: int = 1,
        site: int | None = None,
        stain_strength: float = 0.05,
        transform: Transform | None = None,
        cache: bool = True,
        *,
        stain: str = "he",
    ) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if size < 32:
            raise ValueError(f"size must be >= 32 pixels, got {size}")
        if sites < 1:
            raise ValueError(f"sites must be >= 1, got {sites}")
        if site is not None and site < 0:
            raise ValueError(f"site must be >= 0, got {site}")
        if stain_strength < 0:
            raise ValueError(f"stain_strength must be >= 0, got {stain_strength}")
        if stain not in STAINS:
            raise ValueError(f"stain must be one of {STAINS}, got {stain!r}")
        self.length = int(length)
        self.size = int(size)
        self.seed = int(seed)
        self.sites = int(sites)
        self.site = site
        self.stain_strength = float(stain_strength)
        self.stain = stain
        self.transform = transform
        self.cache = cache
        if site is not None:
            self.sites_of = np.full(self.length, int(site), dtype=np.int64)
        else:
            self.sites_of = np.arange(self.length, dtype=np.int64) % self.sites
        self._samples: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._masks: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._check_index(index)
        rgb, mask = self._sample(i)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        target = torch.from_numpy(mask.astype(np.int64))
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    # ------------------------------------------------------------------ label summaries
    def mask(self, index: int) -> np.ndarray:
        """The exact read-only uint8 mask (size x size) of sample ``index``; cheap, no rendering."""
        i = self._check_index(index)
        if i in self._samples:
            return self._samples[i][1]
        if i not in self._masks:
            m = self._layout(np.random.default_rng([self.seed, i, _LAYOUT_STREAM]))
            m.flags.writeable = False  # shared with the cache
            if not self.cache:
                return m
            self._masks[i] = m
        return self._masks[i]

    def class_histogram(self, index: int) -> np.ndarray:
        """Pixel fraction of each class in sample ``index``, float64 array of length 4 summing to 1."""
        counts = np.bincount(self.mask(index).ravel(), minlength=self.num_classes)
        return counts / counts.sum()

    def dominant_class(self, index: int) -> int:
        """Most frequent non-background class (1..3) of sample ``index``; 0 if it is all background."""
        counts = np.bincount(self.mask(index).ravel(), minlength=self.num_classes)
        if counts[1:].sum() == 0:
            return 0
        return int(np.argmax(counts[1:]) + 1)

    # ------------------------------------------------------------------ generation
    def _check_index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {index} out of range for dataset of length {self.length}")
        return i

    def _sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._samples.get(i)
        if cached is not None:
            return cached
        mask = self.mask(i)
        rgb = self._render(mask, np.random.default_rng([self.seed, i, _RENDER_STREAM]), int(self.sites_of[i]))
        if self.cache:
            self._samples[i] = (rgb, mask)
            self._masks.pop(i, None)
        return rgb, mask

    def _layout(self, rng: np.random.Generator) -> np.ndarray:
        s = self.size
        detail_cells = max(8, s // 10)
        bg = _field(rng, s, 4) + 0.35 * _field(rng, s, detail_cells, width=0.6)
        bg_frac = float(np.clip(rng.uniform(-0.12, 0.45), 0.0, None))
        tissue = np.stack(
            [_field(rng, s, 5) + 0.3 * _field(rng, s, detail_cells, width=0.6) for _ in range(3)]
        )
        tissue += rng.normal(0.0, 0.35, size=(3, 1, 1))
        mask = (np.argmax(tissue, axis=0) + 1).astype(np.uint8)
        if bg_frac > 0:
            mask[bg > np.quantile(bg, 1.0 - bg_frac)] = 0
        return mask

    def _render(self, mask: np.ndarray, rng: np.random.Generator, site: int) -> np.ndarray:
        s = self.size
        k = (s / 64.0) ** 0.5  # morphology scale: nuclei and fibres grow slowly with patch size
        prof = _STAIN_PROFILES[self.stain]  # only concentrations depend on it, never the RNG draws
        onehot = (mask[None] == np.arange(4, dtype=np.uint8)[:, None, None]).astype(np.float32)
        weights = ndimage.gaussian_filter(onehot, sigma=(0, 0.8 * k, 0.8 * k))

        # Per-image stain amount and per-class jitter: colour distributions of classes overlap.
        g = np.exp(rng.normal(0.0, 0.12, size=3))
        jit = np.exp(rng.normal(0.0, 0.15, size=(4, 3)))
        fine = _field(rng, s, max(10, s // 5), width=0.6)
        mottle = _field(rng, s, max(6, s // 12))

        hed = np.zeros((3, s, s), dtype=np.float64)
        # background: faint glass with dust-level noise
        bg = np.array(prof.base[0])[:, None, None] * jit[0][:, None, None] * (1 + 0.3 * fine)
        hed += weights[0] * bg
        # normal tissue: pale mottled cytoplasm
        tex = np.clip(1.0 + 0.25 * mottle + 0.15 * fine, 0.5, None)
        normal = np.array(prof.base[1])[:, None, None] * jit[1][:, None, None] * tex
        hed += weights[1] * normal
        # stroma: wavy eosin fibres along a random angle
        theta = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
        along = xx * np.cos(theta) + yy * np.sin(theta)
        across = -xx * np.sin(theta) + yy * np.cos(theta)
        wavelength = rng.uniform(3.5, 5.0) * k
        wave = 2.5 * _field(rng, s, 3) + 0.8 * _field(rng, s, max(6, s // 14))
        fib = 0.5 + 0.5 * np.sin(2 * np.pi * across / wavelength + wave + 0.1 * along / wavelength)
        fib = fib ** rng.uniform(1.5, 3.0) * np.clip(0.75 + 0.35 * fine, 0.2, None)
        stroma = np.array(prof.base[2])[:, None, None] * jit[2][:, None, None] * (0.45 + 0.75 * fib)
        hed += weights[2] * stroma
        # tumour epithelium: slightly basophilic cytoplasm
        tumour = np.array(prof.base[3])[:, None, None] * jit[3][:, None, None] * (tex + 0.1 * fine)
        hed += weights[3] * tumour

        nuc_h, nuc_a = self._nuclei(mask, rng, theta, k)
        chroma = 0.8 + 0.25 * fine
        a = np.clip(nuc_a, 0.0, 1.0)
        hed[0] = hed[0] * (1 - a) + a * (nuc_h * prof.nuclear_h) * chroma
        hed[1] *= 1 - prof.nuclear_e_cut * a
        hed[2] *= 1 - prof.nuclear_d_cut * a

        scale, offset = site_stain(site, self.stain_strength)
        tissue = 1.0 - weights[0]
        hed = hed * (g * scale)[:, None, None] + offset[:, None, None] * tissue
        hed = np.clip(hed, 0.0, None)

        rgb = hed2rgb(np.moveaxis(hed, 0, -1))
        rgb = ndimage.gaussian_filter(rgb, sigma=(0.5, 0.5, 0))
        rgb += rng.normal(0.0, 0.018, size=rgb.shape)
        return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)

    def _nuclei(
        self, mask: np.ndarray, rng: np.random.Generator, theta: float, k: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw nuclei; returns (haematoxylin concentration, coverage alpha) maps."""
        s = self.size
        nuc_h = np.zeros((s, s), dtype=np.float64)
        nuc_a = np.zeros((s, s), dtype=np.float64)
        flat = mask.ravel()
        # class: (area coverage, major radius range, aspect range, H concentration range)
        spec = {
            1: (0.06, (1.2, 1.7), (1.0, 1.25), (0.06, 0.09)),
            2: (0.04, (2.2, 3.2), (2.6, 4.0), (0.07, 0.10)),
            3: (0.38, (2.2, 3.4), (1.1, 1.6), (0.10, 0.16)),
        }
        for cls, (cover, rad, asp, conc) in spec.items():
            idx = np.flatnonzero(flat == cls)
            if idx.size == 0:
                continue
            r_major = np.array(rad) * k
            mean_area = np.pi * np.mean(r_major) ** 2 / np.mean(asp)
            count = rng.poisson(idx.size * cover / mean_area)
            if count == 0:
                continue
            centres = rng.choice(idx, size=count)
            rows = centres // s + rng.uniform(-0.5, 0.5, count)
            cols = centres % s + rng.uniform(-0.5, 0.5, count)
            majors = rng.uniform(r_major[0], r_major[1], count)
            minors = majors / rng.uniform(*asp, count)
            hs = rng.uniform(*conc, count)
            if cls == 2:  # aligned with the fibres
                angles = theta + rng.normal(0.0, 0.12, count)
            else:
                angles = rng.uniform(0, np.pi, count)
            for n in range(count):
                # skimage's ellipse rotation is counter-clockwise from the row axis; the fibres run
                # along (cos theta, sin theta) in (x, y), i.e. angle pi/2 - theta from the row axis.
                rot = (np.pi / 2 - angles[n]) if cls == 2 else angles[n]
                rr, cc = ellipse(rows[n], cols[n], majors[n], minors[n], shape=(s, s), rotation=rot)
                nuc_h[rr, cc] = np.maximum(nuc_h[rr, cc], hs[n])
                nuc_a[rr, cc] = 1.0
                if cls == 3:  # irregular outline: a second, offset lobe
                    d = rng.uniform(0.4, 0.9) * majors[n]
                    phi = rng.uniform(0, 2 * np.pi)
                    rr, cc = ellipse(
                        rows[n] + d * np.sin(phi),
                        cols[n] + d * np.cos(phi),
                        0.7 * majors[n],
                        0.6 * minors[n],
                        shape=(s, s),
                        rotation=rng.uniform(0, np.pi),
                    )
                    nuc_h[rr, cc] = np.maximum(nuc_h[rr, cc], hs[n])
                    nuc_a[rr, cc] = 1.0
        nuc_a = ndimage.gaussian_filter(nuc_a, 0.45 * k)
        nuc_h = ndimage.gaussian_filter(nuc_h, 0.45 * k) / np.maximum(nuc_a, 1e-3)
        return nuc_h, nuc_a
