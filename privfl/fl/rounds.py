"""One synchronous FedAvg round, for trainers that run their own loop over rounds.

:func:`fedavg_round` is the round of every FedAvg-style trainer in :mod:`privfl.sharing` (the
DP-CVAE's and DP-CGAN's decoder / generator averaging, the federated linear classifiers,
FedAvg-GAN): each client, one after the other, starts from the global state and returns what it
sends; the server averages the messages. The clients run sequentially and in the given order, so
the draws they take from any shared RNG come in that order.

The averaging is a parameter. By default it is :func:`privfl.updates.weighted_mean` (float64,
``u_0 + Σ_i w_i (u_i − u_0)``). :func:`weighted_sum` is the plain ``Σ_i w_i u_i``, the arithmetic
the federated linear classifiers and FedAvg-GAN have always used: the two round differently, so a
trainer keeps the one its published figures were computed with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from privfl.updates import Update, weighted_mean

__all__ = ["Average", "fedavg_round", "weighted_sum"]

C = TypeVar("C")

Average = Callable[[Sequence[Mapping[str, Tensor]], Sequence[float]], Update]
"""``average(messages, weights) -> new global state``, e.g. :func:`~privfl.updates.weighted_mean`."""


def fedavg_round(
    global_state: Mapping[str, Tensor],
    clients: Iterable[C],
    local_update: Callable[[Mapping[str, Tensor], C], Mapping[str, Tensor]],
    weights: Sequence[float],
    *,
    average: Average = weighted_mean,
) -> Update:
    """One FedAvg round: ``average([local_update(global_state, c) for c in clients], weights)``.

    Args:
        global_state: the state every client starts the round from (passed as is: a client that
            modifies it in place changes it for the clients after it).
        clients: whatever ``local_update`` needs to identify a client (data, model, index); one
            message per item, in order.
        local_update: runs client ``c``'s local training from ``global_state`` and returns its
            message (a ``state_dict``-shaped mapping). Called sequentially, in the order of
            ``clients``.
        weights: one per client (e.g. training-set sizes), passed to ``average`` unchanged.
        average: the server's aggregation (default :func:`~privfl.updates.weighted_mean`).

    Returns the new global state.
    """
    messages = [local_update(global_state, client) for client in clients]
    return average(messages, weights)


def weighted_sum(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], *, dtype: torch.dtype | None = None
) -> Update:
    """``Σ_i w_i·states[i]`` per entry, with the weights normalised to sum 1.

    The weights are normalised in float64 (``w_i / Σ_j w_j``). Each entry is summed left to right
    from 0 (Python's ``sum``), each term ``w_i·s_i`` computed in ``dtype`` (default: the entry's own
    dtype, e.g. float32; FedAvg-GAN uses ``torch.float64``), then cast back to the entry's dtype;
    non-floating entries (``num_batches_tracked``) are rounded to the nearest integer first (ties to
    even). Unlike :func:`~privfl.updates.weighted_mean`, the mean of identical states is not
    necessarily that state bit for bit.

    Raises:
        ValueError: no states, a weight count that differs from the state count, or weights that
            are negative, non-finite or sum to zero.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    raw = [float(w) for w in weights]
    if not all(math.isfinite(w) and w >= 0 for w in raw) or math.fsum(raw) <= 0:
        raise ValueError(f"weights must be finite and non-negative with a positive sum, got {list(weights)}")
    total = math.fsum(raw)
    w = [x / total for x in raw]
    out: Update = {}
    for key, first in states[0].items():
        acc = sum(wi * (s[key] if dtype is None else s[key].to(dtype)) for wi, s in zip(w, states))
        assert isinstance(acc, Tensor)
        out[key] = acc.to(first.dtype) if first.is_floating_point() else acc.round().to(first.dtype)
    return out
