"""Plain helpers shared by the tests (importable as ``helpers``: ``pythonpath = ["tests"]``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from scipy import stats

from privfl.defenses import RoundContext
from privfl.models.dhunet import TINY, DHUNet


def ctx_for(
    clients: int | Sequence[float], weights: Sequence[float] | None = None, rnd: int = 0, *, seed: int = 0
) -> RoundContext:
    """A server-side ``RoundContext`` for round ``rnd`` with every client sampled: ``clients`` is a
    client count (equal weights unless ``weights``) or the weights themselves."""
    if not isinstance(clients, int):
        weights, clients = list(clients), len(clients)
    w = list(weights) if weights is not None else [1 / clients] * clients
    return RoundContext(rnd, clients, tuple(range(clients)), tuple(w), seed=seed)


def cp_contains(k: int, n: int, p: float, confidence: float = 1 - 1e-6) -> bool:
    """Whether the exact (Clopper–Pearson) confidence interval of ``k`` successes in ``n`` contains ``p``."""
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return ci.low <= p <= ci.high


def tiny_dhunet_model(size: int = 32, seed: int = 0) -> DHUNet:
    """dhunet-tiny without stochastic depth, so a batch and a single sample see the same network."""
    torch.manual_seed(seed)
    return DHUNet(4, size, dataclasses.replace(TINY, swin_drop_path=0.0, convnext_drop_path=0.0))
