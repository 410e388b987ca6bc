"""FID and Dist-FID of Distributed Synthetic Learning (privfl.sharing.dsl.fid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from privfl.sharing.dsl.fid import (
    FeatureStats,
    dist_fid,
    feature_stats,
    fid,
    fid_extractor,
    frechet_distance,
    pooled_stats,
)


def _random_stats(rng: np.random.Generator, d: int, n: int = 50, shift: float = 0.0) -> FeatureStats:
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift
    return FeatureStats.from_features(torch.from_numpy(x))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fid_eigh(a: FeatureStats, b: FeatureStats) -> float:
    sa, sb = a.cov.numpy(), b.cov.numpy()
    ra = _psd_sqrt(sa)
    diff = (a.mean - b.mean).numpy()
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2 * np.trace(_psd_sqrt(ra @ sb @ ra)))


def test_frechet_distance_diagonal_closed_form():
    f64 = torch.float64
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], dtype=f64), torch.tensor([1.0, 1.5, 0.0], dtype=f64)
    va, vb = torch.tensor([1.0, 4.0, 0.25], dtype=f64), torch.tensor([9.0, 1.0, 0.5], dtype=f64)
    a = FeatureStats(mean=mu1, cov=torch.diag(va), n=10)
    b = FeatureStats(mean=mu2, cov=torch.diag(vb), n=20)
    expected = float(((mu1 - mu2) ** 2).sum() + ((va.sqrt() - vb.sqrt()) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-9)


def test_frechet_distance_matches_eigendecomposition():
    rng = np.random.default_rng(0)
    for d in (2, 5, 12):
        a, b = _random_stats(rng, d), _random_stats(rng, d, shift=0.5)
        ref = _fid_eigh(a, b)
        assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
        assert frechet_distance(b, a) == pytest.approx(ref, rel=1e-6)
        assert fid(a, b) == pytest.approx(ref, rel=1e-6)
        assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6 * float(a.cov.trace()))


def test_frechet_distance_singular_covariances_and_errors():
    rng = np.random.default_rng(1)
    a, b = _random_stats(rng, 16, n=5), _random_stats(rng, 16, n=6, shift=1.0)  # rank <= 5 << D
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value >= 0
    assert value == pytest.approx(_fid_eigh(a, b), rel=1e-3)
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(a, _random_stats(rng, 3))


def test_from_features_matches_numpy():
    x = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    s = FeatureStats.from_features(torch.from_numpy(x))
    assert s.n == 30 and s.mean.dtype == torch.float64 and s.cov.dtype == torch.float64
    np.testing.assert_allclose(s.mean.numpy(), x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.cov.numpy(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    for bad in (torch.zeros(1, 4), torch.zeros(5), torch.tensor([[0.0, float("nan")], [1.0, 2.0]])):
        with pytest.raises(ValueError):
            FeatureStats.from_features(bad)
    with pytest.raises(ValueError):
        FeatureStats(mean=torch.zeros(3), cov=torch.eye(2), n=5)


def test_dist_fid_is_weighted_sum_of_site_fids():
    rng = np.random.default_rng(3)
    sites = [_random_stats(rng, 6, n=n, shift=s) for n, s in ((20, 0.0), (50, 1.0), (30, -0.5))]
    synth = _random_stats(rng, 6, n=40, shift=0.2)
    per_site = [frechet_distance(s, synth) for s in sites]
    total = sum(s.n for s in sites)
    expected = sum(s.n / total * f for s, f in zip(sites, per_site))
    assert dist_fid(sites, synth) == pytest.approx(expected, rel=1e-12)
    assert dist_fid(sites, synth, weights=[1, 1, 2]) == pytest.approx(
        (per_site[0] + per_site[1] + 2 * per_site[2]) / 4, rel=1e-12
    )
    assert dist_fid(sites, synth, weights=[0, 3, 0]) == pytest.approx(per_site[1], rel=1e-12)
    assert dist_fid(sites[:1], synth) == pytest.approx(fid(sites[0], synth), rel=1e-12)
    for bad in ([1, -1, 1], [0, 0, 0], [1, 1], [1, float("nan"), 1]):
        with pytest.raises(ValueError):
            dist_fid(sites, synth, weights=bad)
    with pytest.raises(ValueError):
        dist_fid([], synth)


def test_pooled_stats_equal_stats_of_concatenated_features():
    rng = np.random.default_rng(4)
    parts = [torch.from_numpy(rng.normal(loc=m, size=(n, 5))) for n, m in ((7, 0.0), (20, 2.0), (2, -1.0))]
    pooled = pooled_stats([FeatureStats.from_features(p) for p in parts])
    direct = FeatureStats.from_features(torch.cat(parts))
    assert pooled.n == direct.n == 29
    torch.testing.assert_close(pooled.mean, direct.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled.cov, direct.cov, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        pooled_stats([])


class _GapExtractor(nn.Module):
    """Global average pooling + flatten: (B, C, H, W) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class _Pairs(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], torch.zeros(self.images.shape[-2:], dtype=torch.long)


def test_feature_stats_tensor_dataset_and_channels():
    images = torch.rand(11, 6, 8, 8, generator=torch.Generator().manual_seed(5))
    ext = _GapExtractor()
    on_tensor = feature_stats(images, ext, batch_size=4)
    on_dataset = feature_stats(_Pairs(images), ext, batch_size=3)
    direct = FeatureStats.from_features(images.mean(dim=(2, 3)))
    for s in (on_tensor, on_dataset):
        assert s.n == 11
        torch.testing.assert_close(s.mean, direct.mean)
        torch.testing.assert_close(s.cov, direct.cov)
    second = feature_stats(_Pairs(images), ext, batch_size=5, channels=slice(3, 6))
    torch.testing.assert_close(second.mean, direct.mean[3:])
    torch.testing.assert_close(second.cov, direct.cov[3:, 3:])
    ext.train()
    feature_stats(images, ext)
    assert ext.training  # the extractor's mode is restored
    with pytest.raises(ValueError):
        feature_stats(images[:1], ext)
    with pytest.raises(ValueError):
        feature_stats(images, ext, batch_size=0)


def test_fid_extractor_default_and_argument_errors(tmp_path):
    ext = fid_extractor(size=32)
    out = ext(torch.rand(2, 3, 32, 32))
    assert out.ndim == 2 and out.shape[0] == 2 and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        fid_extractor(timm_model="resnet18")
    with pytest.raises(ValueError):
        fid_extractor(checkpoint=tmp_path / "weights.pth")


def test_fid_sanity_same_distribution_closer_than_shifted():
    g = torch.Generator().manual_seed(6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ext = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    base = torch.rand(200, 3, 16, 16, generator=g) * 0.6
    shifted = (torch.rand(100, 3, 16, 16, generator=g) * 0.6 + 0.4).clamp(0, 1)
    first, second = feature_stats(base[:100], ext), feature_stats(base[100:], ext)
    same = fid(first, second)
    other = fid(first, feature_stats(shifted, ext))
    assert 0 <= same < other
    # Dist-FID over two sites of the same distribution is also lower for the matching synthetic set
    assert dist_fid([first, second], feature_stats(base[:50], ext)) < dist_fid(
        [first, second], feature_stats(shifted, ext)
    )
