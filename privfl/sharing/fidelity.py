"""How close synthetic embeddings are to the real ones: the sliced Wasserstein distance.

The DP-CVAE paper reports a Wasserstein distance between each client's real and synthetic
embeddings. In hundreds of dimensions the exact W1 between two point clouds is an optimal-transport
problem; privfl uses the **sliced** W1 (Rabin et al. 2011; Bonneel et al. 2015): the mean, over
random unit directions, of the exact 1-D W1 between the two projected samples. It is a metric on
distributions, zero iff the projections agree in law, and its projections are seeded so that runs
compare. Units: those of the embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import wasserstein_distance

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(
    real: torch.Tensor, synthetic: torch.Tensor, *, projections: int = 64, seed: int = 0
) -> float:
    """Sliced 1-Wasserstein distance between two samples of embeddings ``(N, D)`` and ``(M, D)``.

    Args:
        real: ``(N, D)`` float tensor of real embeddings.
        synthetic: ``(M, D)`` float tensor of synthetic embeddings (same D; N and M may differ).
        projections: number of random unit directions (default 64).
        seed: seed of the directions (the same seed gives the same directions for every pair).

    Raises:
        ValueError: empty samples, different D, non-finite values.
    """
    a = torch.as_tensor(real, dtype=torch.float64)
    b = torch.as_tensor(synthetic, dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(
            f"need two non-empty (N, D) samples with the same D, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("embeddings must be finite")
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).numpy(), (b @ dirs).numpy()
    return float(np.mean([wasserstein_distance(pa[:, k], pb[:, k]) for k in range(projections)]))
