"""Multi-stain (multi-modal) view of `SyntheticHistology`, for multi-modal Distributed Synthetic Learning.

`MultiStainHistology` renders each sample in several stains (modalities, see
`privfl.data.synthetic.STAINS`: ``"he"`` H&E and ``"ihc"`` a DAB pan-cytokeratin-like IHC with
haematoxylin counterstain) and stacks them along the channel axis. All modalities of a sample share
one mask and one tissue layout: they come from `SyntheticHistology` datasets that differ only in
``stain``, whose random draws are keyed by ``(seed, i)`` and identical across stains, so the
images are pixel-aligned and the mask is exact for every modality.

Units: images are float32 in [0, 1] (RGB per modality), sizes in pixels, masks int64 class labels
0 background, 1 normal tissue, 2 tumour-associated stroma, 3 tumour epithelium.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from privfl.data.synthetic import STAINS, SyntheticHistology

__all__ = ["MultiStainHistology"]


class MultiStainHistology(Dataset):
    """Pixel-aligned multi-stain synthetic patches with one exact 4-class mask per sample.

    Args:
        length: number of samples (>= 1).
        size: patch side in pixels (>= 32).
        seed: dataset seed; sample ``i`` depends on ``(seed, i)`` only.
        sites: number of stain profiles cycled over samples (sample ``i`` has site ``i % sites``);
            the same site profile applies to every modality of a sample.
        site: if given, every sample uses this stain profile (overrides ``sites``).
        stain_strength: magnitude of the per-site stain shift (see `site_stain`); 0 disables it.
        modalities: stains to render, in channel order; non-empty, no duplicates, each in `STAINS`.
        cache: keep generated samples in memory.

    ``ds[i]`` returns ``(image, mask)``: ``image`` float32 tensor ``(3*M) x size x size`` in
    [0, 1], the modalities' RGB images concatenated along channels in ``modalities`` order
    (``channels(name)`` gives each one's slice), ``mask`` int64 tensor ``size x size`` in ``0..3``.
    Modality ``name`` of sample ``i`` equals ``SyntheticHistology(..., stain=name)[i]``.
    """

    num_classes = SyntheticHistology.num_classes
    CLASS_NAMES = SyntheticHistology.CLASS_NAMES

    def __init__(
        self,
        length: int,
        size: int = 64,
        seed: int = 0,
        sites: int = 1,
        site: int | None = None,
        stain_strength: float = 0.05,
        modalities: Sequence[str] = ("he", "ihc"),
        cache: bool = True,
    ) -> None:
        if isinstance(modalities, str):
            raise ValueError(f"modalities must be a sequence of stain names, got the string {modalities!r}")
        mods = tuple(modalities)
        if not mods:
            raise ValueError("modalities must not be empty")
        if len(set(mods)) != len(mods):
            raise ValueError(f"modalities must not repeat, got {mods}")
        unknown = [m for m in mods if m not in STAINS]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; choose from {STAINS}")
        self.modalities: tuple[str, ...] = mods
        self._datasets = {
            m: SyntheticHistology(
                length,
                size=size,
                seed=seed,
                sites=sites,
                site=site,
                stain_strength=stain_strength,
                cache=cache,
                stain=m,
            )
            for m in mods
        }
        ref = self._datasets[mods[0]]
        self.length = ref.length
        self.size = ref.size
        self.seed = ref.seed
        self.sites = ref.sites
        self.site = ref.site
        self.stain_strength = ref.stain_strength
        self.cache = cache
        self.sites_of = ref.sites_of

    @property
    def num_modalities(self) -> int:
        """Number of modalities M (the image has 3*M channels)."""
        return len(self.modalities)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = [self._datasets[m][index][0] for m in self.modalities]
        mask = torch.from_numpy(self.mask(index).astype(np.int64))
        return torch.cat(images, dim=0), mask

    def modality(self, index: int, name: str) -> torch.Tensor:
        """RGB image (float32, ``3 x size x size`` in [0, 1]) of sample ``index`` in stain ``name``."""
        return self._dataset(name)[index][0]

    def channels(self, name: str) -> slice:
        """Channel slice of modality ``name`` in the concatenated image (e.g. ``slice(3, 6)``)."""
        self._dataset(name)
        k = self.modalities.index(name)
        return slice(3 * k, 3 * k + 3)

    def mask(self, index: int) -> np.ndarray:
        """The exact read-only uint8 mask (size x size) of sample ``index``, shared by all modalities."""
        return self._datasets[self.modalities[0]].mask(index)

    def class_histogram(self, index: int) -> np.ndarray:
        """Pixel fraction of each class in sample ``index``, float64 array of length 4 summing to 1."""
        return self._datasets[self.modalities[0]].class_histogram(index)

    def dominant_class(self, index: int) -> int:
        """Most frequent non-background class (1..3) of sample ``index``; 0 if it is all background."""
        return self._datasets[self.modalities[0]].dominant_class(index)

    def _dataset(self, name: str) -> SyntheticHistology:
        if name not in self._datasets:
            raise ValueError(f"unknown modality {name!r}; this dataset has {self.modalities}")
        return self._datasets[name]
