"""Split a dataset across federated clients.

All partitioners are deterministic given ``seed`` and return one sorted int64 index array per
client. `iid` and `dirichlet` return disjoint arrays that together cover ``0..n-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Subset

__all__ = ["iid", "dirichlet", "by_site", "partition", "train_val_split", "SCHEMES"]

SCHEMES = ("iid", "dirichlet", "by_site")


def _check_clients(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"num_clients ({num_clients}) exceeds the number of samples ({n})")


def iid(n: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``0..n-1`` and cut it into ``num_clients`` parts whose sizes differ by at most one."""
    _check_clients(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_clients)]


def dirichlet(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed partition: each class is split across clients in proportions ~ Dir(alpha).

    This is the widely used NIID-Bench recipe (Hsu et al. 2019; Li et al. 2022): for each class
    the indices are shuffled and cut by Dirichlet(alpha, ..., alpha) proportions, where a client
    that already holds ``>= n / num_clients`` samples gets no more of the class. The whole draw is
    repeated until every client holds at least ``min_size`` samples. Small ``alpha`` (e.g. 0.1)
    gives strongly skewed clients; large ``alpha`` (e.g. 100) approaches IID.

    Raises:
        ValueError: ``alpha <= 0``, ``num_clients < 1``, ``num_clients > n``,
            ``min_size * num_clients > n``, or no valid draw found within ``max_tries``.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    n = int(y.size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check_clients(n, num_clients)
    if min_size < 0 or min_size * num_clients > n:
        raise ValueError(f"min_size={min_size} is impossible for {n} samples over {num_clients} clients")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    cap = n / num_clients
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = p * (sizes < cap)
            total = p.sum()
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
                sizes[k] += chunk.size
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) partition of {n} samples over {num_clients} clients gave every "
        f"client >= {min_size} samples in {max_tries} tries; raise alpha or lower min_size/num_clients"
    )


def by_site(sites: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """One client per distinct site value, in increasing site order."""
    s = np.asarray(sites)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("sites must be a non-empty one-dimensional sequence")
    return [np.flatnonzero(s == v).astype(np.int64) for v in np.unique(s)]


def train_val_split(
    indices: Sequence[int] | np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly split ``indices`` into sorted ``(train, val)`` arrays.

    ``round(val_fraction * len(indices))`` go to validation, at least one if ``val_fraction > 0``
    and there are at least two indices.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    idx = np.asarray(indices, dtype=np.int64).ravel()
    n_val = int(round(val_fraction * idx.size))
    if val_fraction > 0 and n_val == 0 and idx.size >= 2:
        n_val = 1
    perm = np.random.default_rng(seed).permutation(idx)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _labels(dataset: Any) -> np.ndarray:
    if hasattr(dataset, "dominant_class"):
        return np.array([dataset.dominant_class(i) for i in range(len(dataset))], dtype=np.int64)
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels)
    raise ValueError("the 'dirichlet' scheme needs a dataset with dominant_class(i) or a labels attribute")


def partition(dataset: Any, scheme: str, num_clients: int, seed: int = 0, alpha: float = 0.5) -> list[Subset]:
    """Split ``dataset`` into per-client `torch.utils.data.Subset` s.

    Schemes: ``"iid"``; ``"dirichlet"`` (labels from ``dataset.dominant_class(i)``, else
    ``dataset.labels``); ``"by_site"`` (``dataset.sites_of``; ``num_clients`` must equal the
    number of distinct sites).
    """
    if scheme == "iid":
        parts = iid(len(dataset), num_clients, seed)
    elif scheme == "dirichlet":
        parts = dirichlet(_labels(dataset), num_clients, alpha, seed)
    elif scheme == "by_site":
        if not hasattr(dataset, "sites_of"):
            raise ValueError("the 'by_site' scheme needs a dataset with a sites_of attribute")
        parts = by_site(dataset.sites_of)
        if len(parts) != num_clients:
            raise ValueError(f"by_site found {len(parts)} sites but num_clients={num_clients}")
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    return [Subset(dataset, part.tolist()) for part in parts]
