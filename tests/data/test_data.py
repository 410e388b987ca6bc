"""Tests of privfl.data: synthetic dataset, folder datasets, WSI tiling and partitioners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from privfl.data import (
    DataError,
    SegmentationFolder,
    SyntheticHistology,
    by_site,
    dirichlet,
    iid,
    partition,
    site_stain,
    tile_wsi,
    tissue_fraction,
    train_val_split,
    write_segmentation_folder,
)

tifffile = pytest.importorskip("tifffile")


# ---------------------------------------------------------------------------- SyntheticHistology
def _pixels(ds: SyntheticHistology) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in range(len(ds)):
        x, m = ds[i]
        xs.append(x.permute(1, 2, 0).reshape(-1, 3).numpy())
        ys.append(m.reshape(-1).numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_synthetic_deterministic_and_order_independent():
    a = SyntheticHistology(6, size=48, seed=5, sites=2)
    b = SyntheticHistology(6, size=48, seed=5, sites=2)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]
    for (xa, ma), (xb, mb) in zip(forward, backward):
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
    # a fresh, uncached dataset accessed at one index only gives the same sample
    c = SyntheticHistology(6, size=48, seed=5, sites=2, cache=False)
    assert torch.equal(c[4][0], forward[4][0]) and torch.equal(c[4][1], forward[4][1])
    # repeated access is served from the cache and equal
    assert torch.equal(a[3][0], forward[3][0])
    # another seed gives other images and masks
    d = SyntheticHistology(6, size=48, seed=6, sites=2)
    assert not torch.equal(d[0][1], forward[0][1])
    assert not torch.equal(d[0][0], forward[0][0])
    # samples within one dataset differ
    assert not torch.equal(forward[0][1], forward[1][1])


@pytest.mark.parametrize("size", [32, 40, 48, 64])
def test_synthetic_shapes_dtypes_ranges(size):
    ds = SyntheticHistology(3, size=size, seed=1)
    assert len(ds) == 3
    for i in range(3):
        x, m = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, size, size)
        assert m.dtype == torch.int64 and m.shape == (size, size)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert set(m.unique().tolist()) <= {0, 1, 2, 3}


@settings(max_examples=8, deadline=None)
@given(size=st.integers(32, 72), seed=st.integers(0, 2**31 - 1), index=st.integers(0, 4))
def test_synthetic_any_size_property(size, seed, index):
    ds = SyntheticHistology(5, size=size, seed=seed, sites=3)
    x, m = ds[index]
    assert x.shape == (3, size, size) and m.shape == (size, size)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert 0 <= int(m.min()) and int(m.max()) <= 3
    hist = ds.class_histogram(index)
    assert hist.shape == (4,) and hist.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(hist, np.bincount(m.flatten().numpy(), minlength=4) / size**2)


def test_synthetic_all_classes_appear_and_labels():
    ds = SyntheticHistology(12, size=48, seed=0)
    present = np.array([ds.class_histogram(i) > 0 for i in range(12)])
    assert present.any(axis=0).all(), "every class must appear in a small dataset"
    # tissue classes are present in most images, proportions vary
    assert present[:, 1:].mean() > 0.75
    fractions = np.array([ds.class_histogram(i) for i in range(12)])
    assert fractions.std(axis=0).min() > 0.03
    # background is near-white with little texture; tissue is not
    x, y = _pixels(ds)
    assert x[y == 0].mean() > 0.9 and x[y != 0].mean() < x[y == 0].mean() - 0.1
    # dominant_class agrees with the mask
    for i in range(12):
        counts = np.bincount(ds[i][1].flatten().numpy(), minlength=4)
        assert ds.dominant_class(i) == int(np.argmax(counts[1:]) + 1)
    assert SyntheticHistology.num_classes == 4
    assert SyntheticHistology.CLASS_NAMES == ("background", "normal", "stroma", "tumour")


def test_synthetic_sites_change_stain_not_layout():
    ref = SyntheticHistology(4, size=48, seed=3, site=0)
    means = []
    for site in (0, 1, 2):
        ds = SyntheticHistology(4, size=48, seed=3, site=site)
        assert (ds.sites_of == site).all()
        for i in range(4):
            assert torch.equal(ds[i][1], ref[i][1]), "masks must not depend on the stain site"
        means.append(np.mean([ds[i][0].mean(dim=(1, 2)).numpy() for i in range(4)], axis=0))
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(means[a] - means[b]).max() > 0.01, (a, b, means)
    # no stain shift when stain_strength == 0
    flat = SyntheticHistology(2, size=48, seed=3, site=2, stain_strength=0.0)
    assert torch.equal(flat[1][0], ref[1][0])
    scale, offset = site_stain(0)
    assert np.array_equal(scale, np.ones(3)) and np.array_equal(offset, np.zeros(3))
    scale1, _ = site_stain(1, 0.05)
    assert np.array_equal(site_stain(1, 0.05)[0], scale1) and not np.allclose(scale1, 1.0)


def test_synthetic_sites_of_cycles():
    ds = SyntheticHistology(7, size=32, sites=3)
    assert ds.sites_of.dtype.kind == "i"
    assert ds.sites_of.tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_synthetic_invalid_arguments_and_indexing():
    with pytest.raises(ValueError):
        SyntheticHistology(4, size=31)
    with pytest.raises(ValueError):
        SyntheticHistology(0, size=32)
    ds = SyntheticHistology(3, size=32)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]
    assert torch.equal(ds[-1][1], ds[2][1])


def test_synthetic_transform_applied_not_cached():
    calls = []

    def flip(x, m):
        calls.append(1)
        return x.flip(-1), m.flip(-1)

    plain = SyntheticHistology(2, size=32, seed=9)
    ds = SyntheticHistology(2, size=32, seed=9, transform=flip)
    x1, m1 = ds[0]
    x2, _ = ds[0]
    assert len(calls) == 2
    assert torch.equal(x1, plain[0][0].flip(-1)) and torch.equal(m1, plain[0][1].flip(-1))
    assert torch.equal(x1, x2)


def test_synthetic_task_not_solvable_by_colour_alone():
    """A per-pixel colour classifier is far better than chance but far from perfect.

    Measured (48 px, 16 train / 16 test images, 3 sites): nearest class-mean colour 0.55-0.66,
    Bayes classifier on 16^3 colour bins 0.68-0.72, majority class 0.28-0.33.
    """
    x, y = _pixels(SyntheticHistology(16, size=48, seed=1, sites=3))
    xt, yt = _pixels(SyntheticHistology(16, size=48, seed=2, sites=3))
    chance = np.bincount(yt).max() / yt.size
    means = np.stack([x[y == c].mean(axis=0) for c in range(4)])
    nearest = np.argmin(((xt[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    acc_mean = float((nearest == yt).mean())

    def q(a):
        return (np.clip(a, 0, 0.999) * 16).astype(int) @ np.array([256, 16, 1])

    table = np.zeros((4096, 4))
    np.add.at(table, (q(x), y), 1)
    table[table.sum(1) == 0, np.bincount(y).argmax()] = 1
    acc_bins = float((table.argmax(1)[q(xt)] == yt).mean())
    assert chance < 0.4
    for acc in (acc_mean, acc_bins):
        assert chance + 0.15 < acc < 0.8, (acc_mean, acc_bins, chance)


# ---------------------------------------------------------------------------- SegmentationFolder
def _write(
    tmp_path: Path, n: int = 3, size: int = 40, fmt: str = "png", split: str = "train"
) -> SyntheticHistology:
    ds = SyntheticHistology(n, size=size, seed=4)
    written = write_segmentation_folder(tmp_path, (ds[i] for i in range(n)), "fold1", split, image_format=fmt)
    assert written == n
    return ds


def test_folder_round_trip_png(tmp_path):
    ds = _write(tmp_path, fmt="png")
    folder = SegmentationFolder(tmp_path, "fold1", "train")
    assert len(folder) == 3
    assert (
        (tmp_path / "lists" / "fold1" / "train_images.txt").read_text().splitlines()[0].startswith("images/")
    )
    for i in range(3):
        x, m = folder[i]
        assert x.dtype == torch.float32 and m.dtype == torch.int64
        assert torch.equal(x, ds[i][0]) and torch.equal(m, ds[i][1])
        assert folder.dominant_class(i) == ds.dominant_class(i)


def test_folder_round_trip_jpg_and_resize(tmp_path):
    ds = _write(tmp_path, fmt="jpg", split="test")
    folder = SegmentationFolder(tmp_path, "fold1", "test")
    x, m = folder[1]
    assert (x - ds[1][0]).abs().mean() < 0.03
    assert torch.equal(m, ds[1][1])
    small = SegmentationFolder(tmp_path, "fold1", "test", size=32)
    xs, ms = small[1]
    assert xs.shape == (3, 32, 32) and ms.shape == (32, 32)
    assert set(ms.unique().tolist()) <= set(ds[1][1].unique().tolist())
    with pytest.raises(DataError, match="train_images.txt"):
        SegmentationFolder(tmp_path, "fold1", "train")


def test_folder_missing_list_and_files(tmp_path):
    with pytest.raises(DataError, match="train_images.txt"):
        SegmentationFolder(tmp_path, "nolist", "train")
    _write(tmp_path)
    victim = tmp_path / "images" / "fold1_train_00001.png"
    victim.unlink()
    with pytest.raises(DataError, match="fold1_train_00001.png"):
        SegmentationFolder(tmp_path, "fold1", "train")


def test_folder_unequal_lists(tmp_path):
    _write(tmp_path)
    masks = tmp_path / "lists" / "fold1" / "train_masks.txt"
    masks.write_text("".join(masks.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(DataError, match="train_masks.txt"):
        SegmentationFolder(tmp_path, "fold1", "train")


def test_folder_bad_mask_value_and_shape(tmp_path):
    _write(tmp_path)
    bad = np.zeros((40, 40), dtype=np.uint8)
    bad[5, 5] = 7
    Image.fromarray(bad).save(tmp_path / "masks" / "fold1_train_00002.png")
    folder = SegmentationFolder(tmp_path, "fold1", "train")
    folder[0]
    with pytest.raises(DataError, match=r"fold1_train_00002\.png.*7"):
        folder[2]
    Image.fromarray(np.zeros((20, 40), dtype=np.uint8)).save(tmp_path / "masks" / "fold1_train_00001.png")
    with pytest.raises(DataError, match="fold1_train_00001"):
        folder[1]
    # a larger num_classes accepts the value 7
    assert int(SegmentationFolder(tmp_path, "fold1", "train", num_classes=8)[2][1].max()) == 7


# ---------------------------------------------------------------------------- tile_wsi
LABELS = np.array([0, 50, 100, 150], dtype=np.uint8)  # spread out: interpolation would create new values


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 256x128 (w x h) slide: left half glass, right half four synthetic tissue tiles."""
    root = tmp_path_factory.mktemp("wsi")
    rng = np.random.default_rng(0)
    img = np.clip(245 + rng.normal(0, 2, size=(128, 256, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((128, 256), dtype=np.uint8)
    ds = SyntheticHistology(4, size=64, seed=2)
    for k in range(4):
        r, c = (k // 2) * 64, 128 + (k % 2) * 64
        x, m = ds[k]
        img[r : r + 64, c : c + 64] = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        mask[r : r + 64, c : c + 64] = LABELS[m.numpy()]
    tifffile.imwrite(root / "plain.tif", img, photometric="rgb")
    with tifffile.TiffWriter(root / "pyramid.tif") as tw:
        tw.write(img, tile=(32, 32), subifds=1, photometric="rgb")
        tw.write(img[::2, ::2], tile=(32, 32), subfiletype=1, photometric="rgb")
    tifffile.imwrite(root / "mask.tif", mask)
    Image.fromarray(mask).save(root / "mask.png")
    return root, img, mask


def test_tile_wsi_skips_background_and_resizes(slide):
    root, img, mask = slide
    tiles = tile_wsi(root / "plain.tif", window=64, stride=64, size=32, mask_path=root / "mask.tif")
    assert [(t.x, t.y) for t in tiles] == [(128, 0), (192, 0), (128, 64), (192, 64)]
    for t in tiles:
        assert t.image.dtype == np.uint8 and t.image.shape == (32, 32, 3)
        assert t.mask is not None and t.mask.dtype == np.uint8 and t.mask.shape == (32, 32)
        assert set(np.unique(t.mask)) <= set(LABELS.tolist())
        window = mask[t.y : t.y + 64, t.x : t.x + 64]
        expected = np.asarray(Image.fromarray(window).resize((32, 32), Image.NEAREST))
        assert np.array_equal(t.mask, expected)
        assert t.tissue_fraction >= 0.1
    every = tile_wsi(root / "plain.tif", window=64, stride=64, size=32, tissue_threshold=0.0)
    assert len(every) == 8 and all(t.mask is None for t in every)
    glass = [t for t in every if t.x < 128]
    assert len(glass) == 4 and max(t.tissue_fraction for t in glass) < 0.05


def test_tile_wsi_overlap_png_mask_and_identity_size(slide):
    root, img, mask = slide
    tiles = tile_wsi(
        root / "plain.tif", window=64, stride=32, size=64, mask_path=root / "mask.png", tissue_threshold=0.0
    )
    assert len(tiles) == 7 * 3
    t = next(t for t in tiles if (t.x, t.y) == (160, 32))
    assert np.array_equal(t.image, img[32:96, 160:224])
    assert np.array_equal(t.mask, mask[32:96, 160:224])


def test_tile_wsi_pyramid_level(slide):
    root, img, _ = slide
    tiles = tile_wsi(root / "pyramid.tif", window=32, stride=32, size=32, level=1)
    assert [(t.x, t.y) for t in tiles] == [(128, 0), (192, 0), (128, 64), (192, 64)]
    assert np.array_equal(tiles[0].image, img[::2, ::2][0:32, 64:96])
    with pytest.raises(ValueError, match="level"):
        tile_wsi(root / "pyramid.tif", window=32, stride=32, size=32, level=2)


def test_tile_wsi_errors(slide, tmp_path):
    root, _, _ = slide
    garbage = tmp_path / "broken_slide.tif"
    garbage.write_bytes(b"this is not a tiff" * 64)
    with pytest.raises(DataError, match="broken_slide.tif"):
        tile_wsi(garbage, window=64, stride=64, size=32)
    with pytest.raises(DataError, match="missing_slide.tif"):
        tile_wsi(tmp_path / "missing_slide.tif", window=64, stride=64, size=32)
    for kwargs in (
        {"window": 0, "stride": 8, "size": 8},
        {"window": 8, "stride": -1, "size": 8},
        {"window": 8, "stride": 8, "size": 0},
    ):
        with pytest.raises(ValueError):
            tile_wsi(root / "plain.tif", **kwargs)
    small = tmp_path / "small_mask.png"
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(small)
    with pytest.raises(DataError, match="small_mask.png"):
        tile_wsi(root / "plain.tif", window=64, stride=64, size=32, mask_path=small)


def test_tissue_fraction():
    white = np.full((8, 8, 3), 250, dtype=np.uint8)
    assert tissue_fraction(white) == 0.0
    pink = np.zeros((8, 8, 3), dtype=np.uint8) + np.array([230, 140, 180], dtype=np.uint8)
    assert tissue_fraction(pink) == 1.0
    white[:4] = pink[:4]
    assert tissue_fraction(white) == 0.5


# ---------------------------------------------------------------------------- partitioners
def _check_cover(parts, n):
    joined = np.concatenate(parts)
    assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 200), clients=st.integers(1, 20), seed=st.integers(0, 10**6))
def test_iid_property(n, clients, seed):
    if clients > n:
        with pytest.raises(ValueError):
            iid(n, clients, seed)
        return
    parts = iid(n, clients, seed)
    assert len(parts) == clients
    _check_cover(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid(n, clients, seed)))


def test_iid_seeds_differ():
    assert not all(np.array_equal(a, b) for a, b in zip(iid(100, 4, 0), iid(100, 4, 1)))


def _skew(parts, labels):
    """Mean total-variation distance between client label distributions and the global one."""
    k = labels.max() + 1
    glob = np.bincount(labels, minlength=k) / labels.size
    return float(
        np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / p.size - glob).sum() for p in parts])
    )


def test_dirichlet_cover_determinism_and_skew():
    labels = np.random.default_rng(0).integers(0, 4, size=400)
    parts = dirichlet(labels, 8, alpha=0.5, seed=3)
    _check_cover(parts, 400)
    assert all(p.size >= 1 for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, dirichlet(labels, 8, alpha=0.5, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, dirichlet(labels, 8, alpha=0.5, seed=4)))
    low = np.mean([_skew(dirichlet(labels, 8, alpha=0.1, seed=s), labels) for s in range(5)])
    high = np.mean([_skew(dirichlet(labels, 8, alpha=100.0, seed=s), labels) for s in range(5)])
    assert low > 0.4 and high < 0.15 and low > 3 * high, (low, high)
    big = dirichlet(labels, 8, alpha=0.1, seed=0, min_size=20)
    assert min(p.size for p in big) >= 20


def test_dirichlet_errors():
    labels = np.zeros(10, dtype=int)
    for kwargs in (
        {"alpha": 0.0, "num_clients": 2},
        {"alpha": -1.0, "num_clients": 2},
        {"alpha": 1.0, "num_clients": 0},
        {"alpha": 1.0, "num_clients": 11},
    ):
        with pytest.raises(ValueError):
            dirichlet(labels, **kwargs)
    with pytest.raises(ValueError, match="tries"):
        dirichlet(labels, 5, alpha=1e-3, min_size=2, max_tries=20)


def test_by_site_groups():
    parts = by_site([2, 0, 2, 1, 0])
    assert [p.tolist() for p in parts] == [[1, 4], [3], [0, 2]]
    with pytest.raises(ValueError):
        by_site([])


def test_partition_convenience():
    ds = SyntheticHistology(12, size=32, seed=0, sites=3)
    sites = partition(ds, "by_site", 3)
    assert len(sites) == 3
    for k, sub in enumerate(sites):
        assert (ds.sites_of[sub.indices] == k).all() and len(sub) == 4
    with pytest.raises(ValueError, match="sites"):
        partition(ds, "by_site", 4)
    parts = partition(ds, "iid", 4, seed=1)
    _check_cover([np.asarray(p.indices) for p in parts], 12)
    x, m = parts[0][0]
    assert x.shape == (3, 32, 32) and m.shape == (32, 32)
    dparts = partition(ds, "dirichlet", 3, seed=0, alpha=0.5)
    _check_cover([np.asarray(p.indices) for p in dparts], 12)
    with pytest.raises(ValueError, match="iid.*dirichlet.*by_site"):
        partition(ds, "shards", 3)


def test_train_val_split():
    train, val = train_val_split(np.arange(10, 60), val_fraction=0.2, seed=1)
    assert val.size == 10 and train.size == 40
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(10, 60))
    again = train_val_split(np.arange(10, 60), val_fraction=0.2, seed=1)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(train_val_split(np.arange(10, 60), 0.2, seed=2)[1], val)
    with pytest.raises(ValueError):
        train_val_split(np.arange(5), val_fraction=1.0)
