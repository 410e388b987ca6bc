"""Fréchet Inception Distance (FID) and the distributed FID (Dist-FID) of Distributed Synthetic Learning.

**FID** (Heusel et al., NeurIPS 2017) compares two image distributions through the Gaussians fitted to
their features under a fixed extractor: with feature means ``mu_r, mu_s`` and covariances
``S_r, S_s`` of the real and synthetic images,

    FID = ||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^{1/2}),

the squared 2-Wasserstein (Fréchet) distance between the two Gaussians. Units: **squared feature
units** of the extractor; lower is better, 0 for identical statistics.

**Dist-FID** (Chang et al., Nature Communications 2023, "Distributed Synthetic Learning") evaluates a
generator trained across sites whose real data never leaves them: each site ``j`` computes the mean
and covariance of its own real features and sends them **once** (a `FeatureStats`); the server
compares each against the synthetic statistics and averages by site size,

    Dist-FID = sum_j w_j FID(site j real, synthetic),   w_j = n_j / sum_k n_k.

The server never sees a real image or a real feature vector, but it does see every site's feature
mean and covariance (``D + D(D+1)/2`` numbers, plus the image count): a summary of the site's real
data, which is what a site discloses. From the same messages the ordinary FID against all real data
can be computed exactly (`pooled_stats`, then `fid`).

Extractor: nothing is downloaded. `fid_extractor` gives privfl's frozen DHU-Net encoder with
**random**, fixed-seed weights (or a timm backbone loaded from a local checkpoint). FID values under
random features are not comparable to the Inception-v3 FID reported in papers, and are comparable
between privfl runs only when they use the same extractor (same model, ``size`` and ``seed``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from privfl.sharing.embeddings import dhunet_encoder, timm_encoder

__all__ = [
    "FeatureStats",
    "dist_fid",
    "feature_stats",
    "fid",
    "fid_extractor",
    "frechet_distance",
    "pooled_stats",
]


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mean and covariance of the features of ``n`` images: what a DSL site sends for Dist-FID.

    A summary of the site's **real** data: publishing it discloses the mean and the (unbiased)
    covariance of the site's image features under the agreed extractor, once; the images and the
    individual feature vectors stay at the site. No noise is added, so it is no formal privacy
    mechanism (a site with very few images reveals correspondingly more about each one).

    Equality is identity (``eq=False``): tensors have no single truth value. Tensors are stored as
    float64 on the CPU.

    Attributes:
        mean: ``(D,)`` float64 feature mean (feature units).
        cov: ``(D, D)`` float64 unbiased feature covariance (squared feature units).
        n: number of images the statistics summarise (at least 2).
    """

    mean: Tensor
    cov: Tensor
    n: int

    def __post_init__(self) -> None:
        """Validate shapes, finiteness and ``n``; store ``mean`` and ``cov`` as CPU float64."""
        mean = torch.as_tensor(self.mean).detach().to("cpu", torch.float64)
        cov = torch.as_tensor(self.cov).detach().to("cpu", torch.float64)
        if mean.ndim != 1 or mean.shape[0] < 1 or tuple(cov.shape) != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"need a (D,) mean and a (D, D) covariance, got {tuple(mean.shape)} and {tuple(cov.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError("feature mean and covariance must be finite")
        if isinstance(self.n, bool) or int(self.n) != self.n or self.n < 2:
            raise ValueError(f"n (number of images) must be an integer >= 2, got {self.n!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)
        object.__setattr__(self, "n", int(self.n))

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.mean.shape[0])

    @classmethod
    def from_features(cls, features: Tensor) -> FeatureStats:
        """Statistics of a ``(N, D)`` feature matrix: mean and unbiased (``N - 1``) covariance.

        Args:
            features: ``(N, D)`` finite features of ``N >= 2`` images (any float dtype; computed
                in float64).

        Raises:
            ValueError: not 2-D, fewer than 2 rows, no columns, or non-finite values.
        """
        x = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
            raise ValueError(f"need (N, D) features with N >= 2 and D >= 1, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("features must be finite")
        mean = x.mean(dim=0)
        xc = x - mean
        cov = xc.T @ xc / (x.shape[0] - 1)
        return cls(mean=mean, cov=cov, n=int(x.shape[0]))


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _image_batches(images: Tensor | Dataset, batch_size: int) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    for batch in DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise TypeError("the dataset must yield (image C x H x W, mask) pairs or image tensors")
        yield x


def feature_stats(
    images: Tensor | Dataset,
    extractor: nn.Module,
    *,
    batch_size: int = 64,
    channels: slice | None = None,
) -> FeatureStats:
    """`FeatureStats` of the extractor's features of a set of images.

    The extractor runs under ``torch.no_grad()`` on the device of its parameters, in eval mode (its
    previous train/eval mode is restored afterwards); outputs are flattened to ``(B, D)`` and the
    statistics are computed in float64 on the CPU.

    Args:
        images: a ``(N, C, H, W)`` float tensor with values in ``[0, 1]``, or a dataset yielding
            ``(image, mask)`` pairs (e.g. a privfl segmentation dataset; the mask is ignored) or
            bare ``(C, H, W)`` image tensors. At least 2 images.
        extractor: module mapping ``(B, C', H, W)`` images to ``(B, D)`` features, e.g. from
            `fid_extractor`.
        batch_size: images per forward pass.
        channels: channel slice to keep before extraction, e.g. ``slice(3, 6)`` for the second
            modality of an image that stacks 3 channels per modality; ``None`` keeps all.

    Raises:
        ValueError: bad ``batch_size``, a tensor that is not 4-D, fewer than 2 images, or
            non-finite features.
        TypeError: dataset items that are neither images nor ``(image, mask)`` pairs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(extractor)
    was_training = extractor.training
    extractor.eval()
    feats: list[Tensor] = []
    try:
        with torch.no_grad():
            for x in _image_batches(images, batch_size):
                if channels is not None:
                    x = x[:, channels]
                out = extractor(x.to(device=device, dtype=torch.float32))
                feats.append(out.reshape(out.shape[0], -1).to("cpu", torch.float64))
    finally:
        extractor.train(was_training)
    if not feats:
        raise ValueError("no images to compute feature statistics of")
    return FeatureStats.from_features(torch.cat(feats))


def frechet_distance(a: FeatureStats, b: FeatureStats, *, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians of two `FeatureStats`, in squared feature units.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with ``scipy.linalg.sqrtm``, as
    pytorch-fid computes it. If the product ``S_a S_b`` is (near-)singular, e.g. with fewer images
    than feature dimensions, and ``sqrtm`` returns non-finite values or an inaccurate root, the root
    is recomputed with ``eps * I`` added to both covariances (a ``RuntimeWarning`` if that root
    is still inaccurate). A negligible imaginary part of the root (numerical noise) is dropped. The result is
    clipped at 0. Symmetric in ``a`` and ``b`` up to rounding.

    Args:
        a: first statistics (e.g. real).
        b: second statistics (e.g. synthetic); same ``D`` as ``a``.
        eps: ridge added to the diagonals of both covariances when the first square root fails.

    Raises:
        ValueError: different feature dimensions, ``eps < 0``, or a matrix square root with a
            significant imaginary part (largest diagonal imaginary part above
            ``1e-3 * max(1, largest |real entry|)``).
    """
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} and {b.dim}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mu_a, mu_b = a.mean.numpy(), b.mean.numpy()
    s_a, s_b = a.cov.numpy(), b.cov.numpy()
    diff = mu_a - mu_b

    def root(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, bool]:
        prod = x @ y
        with warnings.catch_warnings():  # singular products are handled below (residual check, eps retry)
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            r = np.asarray(linalg.sqrtm(prod))
        if not np.isfinite(r).all():
            return r, False
        # relative residual of the root: large when the product is (near-)singular and sqrtm failed
        scale = max(float(np.linalg.norm(prod)), np.finfo(np.float64).tiny)
        return r, float(np.linalg.norm(r @ r - prod)) <= 1e-4 * scale

    covmean, ok = root(s_a, s_b)
    if not ok and eps > 0:
        offset = np.eye(a.dim) * eps
        covmean, ok = root(s_a + offset, s_b + offset)
    if not ok:
        warnings.warn(
            "the matrix square root of the covariance product is inaccurate; the FID may be off",
            RuntimeWarning,
            stacklevel=2,
        )
    if not np.isfinite(covmean).all():
        raise ValueError("the matrix square root of the covariance product is not finite")
    if np.iscomplexobj(covmean):
        imag = float(np.abs(np.diagonal(covmean).imag).max())
        if imag > 1e-3 * max(1.0, float(np.abs(covmean.real).max())):
            raise ValueError(f"the matrix square root has a significant imaginary component ({imag:.3g})")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def fid(real: FeatureStats, synthetic: FeatureStats) -> float:
    """Ordinary FID between real and synthetic feature statistics, in squared feature units.

    `frechet_distance` with the default ``eps``. In DSL the real statistics are those of all real
    data, pooled over the sites with `pooled_stats` from what each site sends (no site sends
    features).

    Args:
        real: statistics of the real images (e.g. ``pooled_stats(site_stats)``).
        synthetic: statistics of the synthetic images, under the same extractor.
    """
    return frechet_distance(real, synthetic)


def _normalised_weights(site_stats: Sequence[FeatureStats], weights: Sequence[float] | None) -> list[float]:
    if not site_stats:
        raise ValueError("need the statistics of at least one site")
    raw = [float(s.n) for s in site_stats] if weights is None else [float(w) for w in weights]
    if len(raw) != len(site_stats):
        raise ValueError(f"got {len(raw)} weights for {len(site_stats)} sites")
    if not all(math.isfinite(w) and w >= 0 for w in raw):
        raise ValueError(f"weights must be finite and >= 0, got {raw}")
    total = sum(raw)
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return [w / total for w in raw]


def dist_fid(
    site_stats: Sequence[FeatureStats],
    synthetic: FeatureStats,
    weights: Sequence[float] | None = None,
) -> float:
    """Dist-FID (Chang et al. 2023): size-weighted mean over sites of FID(site real, synthetic).

    ``sum_j w_j FID(site_stats[j], synthetic)`` in squared feature units, with the weights
    normalised to sum 1. Sites with weight 0 are skipped. It is not the FID against the pooled
    real data (`pooled_stats`, `fid`): the whole synthetic set is compared with each site, so when
    the sites differ it stays above 0 even for a generator that reproduces their union exactly.

    Args:
        site_stats: each site's `FeatureStats` of its real images (what the sites send).
        synthetic: `FeatureStats` of the synthetic images, under the same extractor.
        weights: non-negative per-site weights; ``None``: each site's image count ``n``.

    Raises:
        ValueError: no sites, a weight count that differs from the site count, negative or
            non-finite weights, all weights zero, or feature dimensions that differ.
    """
    w = _normalised_weights(site_stats, weights)
    return float(sum(wj * frechet_distance(s, synthetic) for wj, s in zip(w, site_stats) if wj > 0))


def pooled_stats(site_stats: Sequence[FeatureStats]) -> FeatureStats:
    """Exact `FeatureStats` of the union of all sites' features, from the per-site statistics.

    Law of total covariance: with ``n = sum n_j`` and ``mu = sum n_j mu_j / n``, the pooled
    unbiased covariance is ``(sum_j (n_j - 1) S_j + n_j (mu_j - mu)(mu_j - mu)^T) / (n - 1)``,
    equal (up to rounding) to `FeatureStats.from_features` of the concatenated features. So the
    ordinary FID against all real data needs nothing beyond what sites send for Dist-FID.

    Args:
        site_stats: the sites' statistics, all with the same feature dimension.

    Raises:
        ValueError: no sites or different feature dimensions.
    """
    if not site_stats:
        raise ValueError("need the statistics of at least one site")
    dims = {s.dim for s in site_stats}
    if len(dims) != 1:
        raise ValueError(f"sites have different feature dimensions: {sorted(dims)}")
    n = sum(s.n for s in site_stats)
    mean = sum((s.n * s.mean for s in site_stats), torch.zeros_like(site_stats[0].mean)) / n
    scatter = torch.zeros_like(site_stats[0].cov)
    for s in site_stats:
        d = s.mean - mean
        scatter += (s.n - 1) * s.cov + s.n * torch.outer(d, d)
    return FeatureStats(mean=mean, cov=scatter / (n - 1), n=n)


def fid_extractor(
    *,
    size: int = 64,
    seed: int = 0,
    timm_model: str | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> nn.Module:
    """The frozen feature extractor for FID / Dist-FID; nothing is downloaded.

    Default: :func:`~privfl.sharing.embeddings.dhunet_encoder` ``(size=size, seed=seed)``, a
    DHU-Net-tiny encoder with **random** weights fixed by ``seed`` (256-dimensional features of
    ``(B, 3, size, size)`` images in ``[0, 1]``). FID values under it are not comparable to the
    Inception-v3 FID of papers, only between privfl runs using the same ``size`` and ``seed``.
    With both ``timm_model`` and ``checkpoint``: :func:`~privfl.sharing.embeddings.timm_encoder`
    ``(timm_model, checkpoint)`` (e.g. a histopathology foundation model saved locally); then
    ``size`` and ``seed`` are ignored.

    Args:
        size: image side in pixels (a positive multiple of 32) of the default extractor.
        seed: seed of the default extractor's random weights.
        timm_model: timm model name; requires ``checkpoint``.
        checkpoint: local state-dict file for ``timm_model``; requires ``timm_model``.

    Raises:
        ValueError: only one of ``timm_model`` and ``checkpoint`` given, or a bad ``size``.
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    if (timm_model is None) != (checkpoint is None):
        raise ValueError("give both timm_model and checkpoint (a local weights file), or neither")
    if timm_model is not None and checkpoint is not None:
        return timm_encoder(timm_model, checkpoint)
    return dhunet_encoder(size=size, seed=seed)
