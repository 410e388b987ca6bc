"""Linear classifiers on embeddings: local, federated (FedAvg / FedProx) and λ-mixtures of the two.

The downstream evaluation of Di Salvo et al. (MICCAI 2025; docs/dpcvae.md): each client trains a linear
classifier on its local real embeddings and one on the global synthetic embeddings (Adam,
lr 1e-3, 100 epochs), and predicts with ``λ·P_local + (1 − λ)·P_global``, λ in {0, 0.1, …, 1}
chosen on validation data. The baselines federate the linear classifier itself (FedAvg, FedProx,
and "FedLambda": local + FedAvg global, mixed by λ).

Everything runs on the CPU, seeded and deterministic (same inputs and seed: same weights, for a
fixed number of torch threads). **None of this is a privacy mechanism**: there is no DP here, and a
classifier trained on real data leaks the membership of its training samples — which is what the
``dpcvae`` benchmark measures.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privfl.fl.rounds import fedavg_round, weighted_sum

__all__ = [
    "DEFAULT_LAMBDAS",
    "accuracy",
    "balanced_accuracy",
    "choose_lambda",
    "federated_linear",
    "mix",
    "predict_proba",
    "train_linear",
]

DEFAULT_LAMBDAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
"""The λ grid {0, 0.1, …, 1} of `choose_lambda`."""


def _check_xy(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D) embeddings, got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be (N,) labels matching x's {x.shape[0]} rows, got shape {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("cannot train on zero samples")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    return x.detach().float().cpu(), y.detach().long().cpu()


def _init_linear(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear``'s default initialisation (U(±1/√dim) for weight and bias), from ``generator``."""
    layer = nn.Linear(dim, num_classes)
    bound = 1.0 / math.sqrt(dim)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def _state(model: nn.Linear) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    init: nn.Linear | None = None,
    prox_mu: float = 0.0,
    prox_center: Mapping[str, torch.Tensor] | None = None,
) -> nn.Linear:
    """Train a linear classifier ``D -> num_classes`` on embeddings with Adam and cross-entropy.

    Args:
        x: embeddings ``(N, D)`` (any float dtype; used as float32 on the CPU).
        y: integer labels ``(N,)`` in ``0..num_classes-1``.
        num_classes: number of outputs (classes absent from ``y`` are allowed).
        epochs: passes over the data; each is a fresh seeded shuffle cut into mini-batches of
            ``batch_size`` (the last one may be smaller). Default 100 (the paper's).
        lr: Adam learning rate (default 1e-3, the paper's; other Adam settings are torch's).
        batch_size: samples per step; the loss is the batch-mean cross-entropy.
        seed: seeds the initialisation (``nn.Linear``'s default U(±1/√D)) and the shuffles.
        init: start from a copy of this layer instead (it is not modified).
        prox_mu: FedProx's μ: adds ``(μ/2)·‖w − w_center‖²`` (weight and bias) to every batch loss.
        prox_center: ``{"weight", "bias"}`` tensors of ``w_center``; default: the starting weights
            (``init``'s, when given).

    Returns a new ``nn.Linear`` on the CPU in eval mode. No DP: the weights leak their training data.
    """
    x, y = _check_xy(x, y, num_classes)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prox_mu < 0:
        raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
    gen = torch.Generator().manual_seed(int(seed))
    if init is not None:
        if (init.in_features, init.out_features) != (x.shape[1], num_classes):
            raise ValueError(
                f"init maps {init.in_features} -> {init.out_features}, expected {x.shape[1]} -> {num_classes}"
            )
        model = copy.deepcopy(init).cpu().float()
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = _init_linear(x.shape[1], num_classes, gen)
    center: dict[str, torch.Tensor] | None = None
    if prox_mu > 0:
        src = prox_center if prox_center is not None else _state(model)
        center = {k: src[k].detach().float().cpu() for k in ("weight", "bias")}
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if center is not None:
                loss = loss + 0.5 * prox_mu * (
                    (model.weight - center["weight"]).pow(2).sum()
                    + (model.bias - center["bias"]).pow(2).sum()
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax class probabilities ``(N, C)`` (float32, CPU) of ``model`` on embeddings ``(N, D)``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x.detach().float().to(device))
    finally:
        model.train(was_training)
    return torch.softmax(logits.float(), dim=1).cpu()


def _predictions(probs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = probs.argmax(dim=1) if probs.ndim == 2 else probs
    if pred.ndim != 1 or y.ndim != 1 or pred.shape[0] != y.shape[0]:
        raise ValueError(f"probs {tuple(probs.shape)} and labels {tuple(y.shape)} do not match")
    if y.shape[0] == 0:
        raise ValueError("cannot score zero samples")
    return pred.long().cpu(), y.long().cpu()


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction in [0, 1] of samples whose most probable class is the label.

    ``probs``: class scores ``(N, C)`` (probabilities or logits), or predicted labels ``(N,)``.
    """
    pred, y = _predictions(probs, y)
    return float((pred == y).double().mean())


def balanced_accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-class recall in [0, 1] over the classes present in ``y`` (sklearn's definition).

    ``probs``: class scores ``(N, C)`` or predicted labels ``(N,)``. Classes that never occur in
    ``y`` do not count, even when predicted.
    """
    pred, y = _predictions(probs, y)
    recalls = [float((pred[y == c] == c).double().mean()) for c in torch.unique(y).tolist()]
    return float(np.mean(recalls))


def mix(p_local: torch.Tensor, p_global: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam · p_local + (1 − lam) · p_global`` for ``lam`` in [0, 1] (both ``(N, C)``)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    if p_local.shape != p_global.shape:
        raise ValueError(
            f"p_local {tuple(p_local.shape)} and p_global {tuple(p_global.shape)} differ in shape"
        )
    return lam * p_local + (1.0 - lam) * p_global


def choose_lambda(
    p_local: torch.Tensor, p_global: torch.Tensor, y: torch.Tensor, grid: Sequence[float] | None = None
) -> float:
    """The λ of ``grid`` (default {0, 0.1, …, 1}) maximising validation accuracy of `mix`.

    ``p_local``, ``p_global``: class probabilities ``(N, C)`` of the local and global classifiers
    on the validation embeddings; ``y``: their labels ``(N,)``. Ties go to the smallest λ (the most
    global mixture).
    """
    lams = sorted(float(v) for v in (DEFAULT_LAMBDAS if grid is None else grid))
    if not lams:
        raise ValueError("the lambda grid is empty")
    best, best_correct = lams[0], -1
    for lam in lams:
        pred, labels = _predictions(mix(p_local, p_global, lam), y)
        correct = int((pred == labels).sum())  # integer counts: no float ties
        if correct > best_correct:
            best, best_correct = lam, correct
    return best


def federated_linear(
    clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    rounds: int = 50,
    local_epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 64,
    mu: float = 0.0,
    seed: int = 0,
) -> nn.Linear:
    """FedAvg (``mu = 0``) or FedProx (``mu > 0``) of a linear classifier over clients' embeddings.

    Args:
        clients: per client ``(x (N_k, D), y (N_k,))``; all with the same ``D``. Clients with no
            samples take no part.
        num_classes: number of outputs.
        rounds: communication rounds; every client takes part in every round.
        local_epochs: epochs of `train_linear` per client and round (a fresh Adam each round).
        lr: learning rate of the local Adam training.
        batch_size: mini-batch size of the local training.
        mu: FedProx's proximal weight μ; the centre is the round's global model.
        seed: seeds the global initialisation and every client's shuffles (client ``k`` in round
            ``r`` uses a seed derived from ``(seed, r, k)``).

    The new global model is the mean of the clients' models weighted by ``N_k / Σ N_k``. Returns
    an ``nn.Linear`` on the CPU in eval mode. No DP and no secure aggregation: the server sees
    every client's weights.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    data = [_check_xy(x, y, num_classes) for x, y in clients if int(x.shape[0]) > 0]
    if not data:
        raise ValueError("federated_linear needs at least one client with samples")
    dims = {x.shape[1] for x, _ in data}
    if len(dims) != 1:
        raise ValueError(f"clients' embeddings differ in dimension: {sorted(dims)}")
    sizes = [int(x.shape[0]) for x, _ in data]
    model = _init_linear(dims.pop(), num_classes, torch.Generator().manual_seed(int(seed)))

    def local_update(center: Mapping[str, torch.Tensor], client: tuple[int, int]) -> dict[str, torch.Tensor]:
        r, k = client
        x, y = data[k]
        # a raw SeedSequence word, not privfl.seeding.derive_seed: that would change every client's shuffles
        client_seed = int(np.random.SeedSequence([int(seed), r, k]).generate_state(1)[0])
        local = train_linear(
            x,
            y,
            num_classes,
            epochs=local_epochs,
            lr=lr,
            batch_size=batch_size,
            seed=client_seed,
            init=model,
            prox_mu=mu,
            prox_center=center,
        )
        return _state(local)

    for r in range(rounds):
        # weighted_sum, not updates.weighted_mean: the float32 sum Σ w_k·θ_k this has always computed
        new = fedavg_round(
            _state(model), [(r, k) for k in range(len(data))], local_update, sizes, average=weighted_sum
        )
        model.load_state_dict(new)
    return model.eval()
