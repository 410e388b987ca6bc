"""Tests of the IHC stain of SyntheticHistology and of MultiStainHistology (multi-modal DSL data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2hed

from privfl.data import STAINS, MultiStainHistology, SyntheticHistology

SIZE = 48
N = 4


@pytest.fixture(scope="module")
def ds() -> MultiStainHistology:
    return MultiStainHistology(N, size=SIZE, seed=7, sites=2)


def _dab(image: torch.Tensor) -> np.ndarray:
    """DAB-channel concentration (H x W) of a 3 x H x W RGB image."""
    return rgb2hed(image.permute(1, 2, 0).numpy())[..., 2]


def test_shapes_ranges_and_channels(ds):
    assert len(ds) == N and ds.modalities == ("he", "ihc") and ds.num_modalities == 2
    assert ds.num_classes == 4 and len(ds.CLASS_NAMES) == 4
    assert ds.channels("he") == slice(0, 3) and ds.channels("ihc") == slice(3, 6)
    for i in range(N):
        image, mask = ds[i]
        assert image.shape == (6, SIZE, SIZE) and image.dtype == torch.float32
        assert mask.shape == (SIZE, SIZE) and mask.dtype == torch.int64
        assert image.min() >= 0 and image.max() <= 1
        assert torch.equal(image[ds.channels("he")], ds.modality(i, "he"))
        assert torch.equal(image[ds.channels("ihc")], ds.modality(i, "ihc"))
    assert np.array_equal(ds.sites_of, [0, 1, 0, 1])


def test_masks_shared_across_modalities_and_with_synthetic(ds):
    ref = SyntheticHistology(N, size=SIZE, seed=7, sites=2)
    ihc = SyntheticHistology(N, size=SIZE, seed=7, sites=2, stain="ihc")
    for i in range(N):
        assert np.array_equal(ihc.mask(i), ref.mask(i))
        assert torch.equal(ihc[i][1], ref[i][1])
        assert torch.equal(ds[i][1], ref[i][1])
        assert np.array_equal(ds.mask(i), ref.mask(i))
        assert ds.dominant_class(i) == ref.dominant_class(i)


def test_he_unchanged_and_ihc_modality_matches_synthetic(ds):
    ref = SyntheticHistology(N, size=SIZE, seed=7, sites=2)
    explicit = SyntheticHistology(N, size=SIZE, seed=7, sites=2, stain="he")
    ihc = SyntheticHistology(N, size=SIZE, seed=7, sites=2, stain="ihc")
    for i in range(N):
        assert torch.equal(explicit[i][0], ref[i][0])
        assert torch.equal(ds.modality(i, "he"), ref[i][0])
        assert torch.equal(ds.modality(i, "ihc"), ihc[i][0])
    assert ref.stain == "he" and ihc.stain == "ihc" and STAINS == ("he", "ihc")


def test_ihc_is_brown_in_tumour_and_differs_from_he(ds):
    tumour_ihc, tumour_he, stroma_ihc = [], [], []
    for i in range(N):
        image, mask = ds[i]
        m = mask.numpy()
        d_he, d_ihc = _dab(image[ds.channels("he")]), _dab(image[ds.channels("ihc")])
        tumour_he.append(d_he[m == 3])
        tumour_ihc.append(d_ihc[m == 3])
        stroma_ihc.append(d_ihc[m == 2])
        assert (image[ds.channels("he")] - image[ds.channels("ihc")]).abs().mean() > 0.03
    t_ihc, t_he, s_ihc = (float(np.concatenate(x).mean()) for x in (tumour_ihc, tumour_he, stroma_ihc))
    assert t_ihc > 2.5 * t_he, (t_ihc, t_he)
    assert t_ihc > 4.0 * s_ihc, (t_ihc, s_ihc)
    # tumour epithelium: brown in IHC (red above blue), purple in H&E (blue above red)
    for i in range(N):
        t = ds[i][1] == 3
        if t.sum() < 50:
            continue
        he_img, ihc_img = ds.modality(i, "he"), ds.modality(i, "ihc")
        assert ihc_img[0][t].mean() - ihc_img[2][t].mean() > 0.04
        assert he_img[0][t].mean() - he_img[2][t].mean() < 0


def test_nuclei_aligned_across_stains():
    # nuclei (haematoxylin peaks) sit at the same pixels in both stains
    he = SyntheticHistology(2, size=SIZE, seed=1, stain_strength=0.0)
    ihc = SyntheticHistology(2, size=SIZE, seed=1, stain_strength=0.0, stain="ihc")
    for i in range(2):
        h_he = rgb2hed(he[i][0].permute(1, 2, 0).numpy())[..., 0]
        h_ihc = rgb2hed(ihc[i][0].permute(1, 2, 0).numpy())[..., 0]
        assert np.corrcoef(h_he.ravel(), h_ihc.ravel())[0, 1] > 0.6


def test_deterministic_and_uncached():
    a = MultiStainHistology(3, size=32, seed=2, site=1)
    b = MultiStainHistology(3, size=32, seed=2, site=1, cache=False)
    for i in (2, 0, 1, -1):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert torch.equal(a[0][0], a[0][0])


def test_single_modality():
    ds = MultiStainHistology(2, size=32, modalities=("ihc",))
    image, mask = ds[1]
    assert image.shape == (3, 32, 32) and ds.num_modalities == 1
    assert ds.channels("ihc") == slice(0, 3)
    assert torch.equal(image, SyntheticHistology(2, size=32, stain="ihc")[1][0])
    with pytest.raises(ValueError):
        ds.channels("he")
    with pytest.raises(ValueError):
        ds.modality(0, "he")


@pytest.mark.parametrize("modalities", [(), ("he", "he"), ("he", "pas"), "he"])
def test_invalid_modalities(modalities):
    with pytest.raises(ValueError):
        MultiStainHistology(2, size=32, modalities=modalities)


def test_invalid_stain_and_index():
    with pytest.raises(ValueError):
        SyntheticHistology(2, size=32, stain="HE")
    with pytest.raises(IndexError):
        MultiStainHistology(2, size=32)[2]
