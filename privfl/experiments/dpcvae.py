"""The DP-CVAE comparison of ``python -m privfl.bench dpcvae``, as one function.

:func:`run_dpcvae_experiment` runs Di Salvo et al.'s pipeline on per-client embeddings and its
baselines, then attacks what each method releases:

1. **Data.** Client ``c`` holds the patches of stain profile (hospital) ``c`` of a
   :class:`~privfl.data.SyntheticHistology` set, labelled with their dominant tissue class
   (:class:`~privfl.data.patches.PatchClassification`), split into train / validation / test.
2. **Embeddings** from a frozen extractor (default: privfl's ``dhunet-tiny`` encoder, random
   features, nothing downloaded; or any :func:`~privfl.sharing.embeddings.timm_encoder`).
3. **Methods**, each evaluated per client on its test split (accuracy and balanced accuracy, mean
   and std over clients):

   * ``Local``: a linear classifier on the client's own real data.
   * ``FedAvg`` / ``FedProx``: one federated linear classifier.
   * ``FedLambda``: ``λ·P_local + (1−λ)·P_FedAvg``, λ picked on the client's validation split.
   * ``DP-CVAE``: decoders trained with DP-SGD and FedAvg'ed, synthetic embeddings sampled from the
     global decoder (uniform labels), a linear classifier on them mixed with the local one by λ.
   * ``DP-CGAN``: the same with a DP conditional GAN in place of the CVAE.

4. **Privacy.** The ε each DP client's accountant proves; the sliced Wasserstein distance between
   each client's real and synthetic embeddings; membership inference on what is released — the
   distance-to-closest-record attack on the synthetic data (members: a client's training
   embeddings, non-members: its test embeddings) and the LOSS attack on the FedAvg classifier.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from privfl.attacks.metrics import attack_summary
from privfl.attacks.synthetic import distance_to_closest_record
from privfl.data import SyntheticHistology
from privfl.data.partition import train_val_split
from privfl.data.patches import PatchClassification
from privfl.sharing import dpcgan, dpcvae
from privfl.sharing.classifiers import (
    accuracy,
    balanced_accuracy,
    choose_lambda,
    federated_linear,
    mix,
    predict_proba,
    train_linear,
)
from privfl.sharing.embeddings import dhunet_encoder, extract
from privfl.sharing.fidelity import sliced_wasserstein

__all__ = ["PRESETS", "ClientSplit", "DPCVAEPreset", "run_dpcvae_experiment"]


@dataclass(frozen=True)
class DPCVAEPreset:
    """Sizes and hyper-parameters of a run (defaults: the paper's, on small synthetic data).

    Attributes:
        clients: number of clients (one stain profile each).
        per_client: patches generated per client (background-only patches are dropped).
        size: patch side in pixels.
        val_fraction, test_fraction: of each client's patches.
        rounds, local_epochs, lr, batch_size: the generators' federated DP-SGD training (paper:
            50 rounds × 5 local epochs, SGD lr 1e-3).
        epsilon, delta, max_grad_norm: each client's DP-SGD target over the whole run (paper: ε = 1,
            δ = 1e-4, clip 1.5).
        latent, hidden: CVAE / CGAN sizes.
        synthetic_per_client: synthetic embeddings each client samples from the global generator.
        classifier_epochs: epochs of every linear classifier (paper: Adam lr 1e-3, 100 epochs).
        fed_rounds, prox_mu: the FedAvg / FedProx linear baselines.
        seed: data, splits, models and seeded noise (``--seeded-noise``).
    """

    name: str
    clients: int = 5
    per_client: int = 120
    size: int = 32
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    rounds: int = 50
    local_epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    epsilon: float = 1.0
    delta: float = 1e-4
    max_grad_norm: float = 1.5
    latent: int = 16
    hidden: int = 128
    synthetic_per_client: int = 200
    classifier_epochs: int = 100
    fed_rounds: int = 50
    prox_mu: float = 0.01
    seed: int = 0


PRESETS = {
    "cpu-quick": DPCVAEPreset("cpu-quick", size=64),
    "tiny": DPCVAEPreset(
        "tiny",
        clients=3,
        per_client=30,
        size=32,
        rounds=2,
        local_epochs=1,
        hidden=16,
        latent=4,
        synthetic_per_client=20,
        classifier_epochs=5,
        fed_rounds=2,
    ),
    "paper": DPCVAEPreset("paper", clients=5, per_client=1000, size=224, batch_size=64),
}


@dataclass
class ClientSplit:
    """One client's embeddings: ``(x, y)`` pairs for train, validation and test."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def _client_splits(
    preset: DPCVAEPreset, extractor: nn.Module | None, progress: bool
) -> tuple[list[ClientSplit], int]:
    data = SyntheticHistology(
        preset.clients * preset.per_client, size=preset.size, seed=preset.seed, sites=preset.clients
    )
    extractor = extractor if extractor is not None else dhunet_encoder(size=preset.size, seed=preset.seed)
    splits = []
    for c in range(preset.clients):
        view = PatchClassification(
            Subset(data, np.flatnonzero(data.sites_of == c).tolist()), data.num_classes
        )
        x, y = extract(view, extractor, progress=progress)
        rest, test = train_val_split(np.arange(len(y)), preset.test_fraction, seed=preset.seed * 1000 + c)
        train, val = train_val_split(
            rest, preset.val_fraction / (1 - preset.test_fraction), seed=preset.seed * 1000 + 500 + c
        )
        splits.append(ClientSplit(*((x[idx], y[idx]) for idx in (train, val, test))))
    return splits, data.num_classes


def _scores(probs_by_client: Sequence[torch.Tensor], splits: Sequence[ClientSplit]) -> dict[str, Any]:
    acc = [accuracy(p, s.test[1]) for p, s in zip(probs_by_client, splits)]
    bacc = [balanced_accuracy(p, s.test[1]) for p, s in zip(probs_by_client, splits)]
    return {
        "accuracy": float(np.mean(acc)),
        "accuracy_std": float(np.std(acc)),
        "balanced_accuracy": float(np.mean(bacc)),
        "balanced_accuracy_std": float(np.std(bacc)),
        "per_client_accuracy": acc,
        "per_client_balanced_accuracy": bacc,
    }


def _mixed(
    local: Sequence[nn.Linear], global_models: Sequence[nn.Module], splits: Sequence[ClientSplit]
) -> tuple[list[torch.Tensor], list[float]]:
    """Per client: λ on validation, then the λ-mix of local and global probabilities on test."""
    probs, lambdas = [], []
    for loc, glob, s in zip(local, global_models, splits):
        lam = choose_lambda(predict_proba(loc, s.val[0]), predict_proba(glob, s.val[0]), s.val[1])
        probs.append(mix(predict_proba(loc, s.test[0]), predict_proba(glob, s.test[0]), lam))
        lambdas.append(lam)
    return probs, lambdas


def _linear_params(dim: int, num_classes: int) -> int:
    return dim * num_classes + num_classes


def _loss_attack(models: nn.Module | Sequence[nn.Module], splits: Sequence[ClientSplit]) -> dict[str, Any]:
    """LOSS (Yeom et al. 2018) on classifiers: score = −cross-entropy; members = each client's training
    embeddings, non-members = its test embeddings. ``models``: one shared classifier, or one per client
    (each attacked on its client's records); the scores are pooled."""
    per_client = list(models) if isinstance(models, Sequence) else [models] * len(splits)
    scores, members = [], []
    for model, s in zip(per_client, splits):
        x, y = torch.cat([s.train[0], s.test[0]]), torch.cat([s.train[1], s.test[1]])
        with torch.no_grad():
            scores.append(-F.cross_entropy(model(x), y, reduction="none"))
        members.append(torch.arange(len(y)) < len(s.train[1]))
    return attack_summary(torch.cat(scores), torch.cat(members))


def _generative(
    name: str,
    train: Callable[..., Any],
    sample: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    config: Any,
    splits: Sequence[ClientSplit],
    local: Sequence[nn.Linear],
    num_classes: int,
    preset: DPCVAEPreset,
    progress: bool,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = train([s.train for s in splits], num_classes, config, progress=progress)
    uniform = [1.0 / num_classes] * num_classes
    synthetic = [
        sample(result.model, preset.synthetic_per_client, uniform, seed=preset.seed * 100 + c)
        for c in range(len(splits))
    ]
    global_models = [
        train_linear(xs, ys, num_classes, epochs=preset.classifier_epochs, seed=preset.seed + c)
        for c, (xs, ys) in enumerate(synthetic)
    ]
    probs, lambdas = _mixed(local, global_models, splits)
    fidelity = [sliced_wasserstein(s.train[0], xs, seed=preset.seed) for s, (xs, _) in zip(splits, synthetic)]
    # membership on the released synthetic data: members = a client's training embeddings
    released_x = torch.cat([xs for xs, _ in synthetic])
    released_y = torch.cat([ys for _, ys in synthetic])
    per_client_auc, scores, members = [], [], []
    for s in splits:
        sc = distance_to_closest_record(
            torch.cat([s.train[0], s.test[0]]), released_x, torch.cat([s.train[1], s.test[1]]), released_y
        )
        is_member = torch.cat([torch.ones(len(s.train[1])), torch.zeros(len(s.test[1]))]).bool()
        per_client_auc.append(attack_summary(sc, is_member)["auc"])
        scores.append(sc)
        members.append(is_member)
    mia = attack_summary(torch.cat(scores), torch.cat(members))
    return {
        "method": name,
        **_scores(probs, splits),
        "lambda": float(np.mean(lambdas)),
        "lambdas": lambdas,
        "epsilon": float(max(result.epsilons)),
        "per_client_epsilon": [float(e) for e in result.epsilons],
        "accountant": max(result.epsilon_reports, key=lambda r: r.epsilon).accountant,
        "accountants": list(config.dp_accountants),
        "accountant_states": result.accountant_states,
        "delta": result.delta,
        "fidelity_sliced_w1": float(np.mean(fidelity)),
        "fidelity_sliced_w1_std": float(np.std(fidelity)),
        "params": result.param_count,
        "mia": {"attack": "distance to closest synthetic record", **mia, "per_client_auc": per_client_auc},
        # the classifier trained on the synthetic data is released too: LOSS on it, per client
        "mia_loss": {
            "attack": "LOSS on the classifier trained on synthetic data",
            **_loss_attack(global_models, splits),
        },
        "seconds": time.perf_counter() - t0,
    }


def run_dpcvae_experiment(
    preset: DPCVAEPreset,
    *,
    extractor: nn.Module | None = None,
    noise: Any = None,
    progress: bool = False,
    methods: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every method of the comparison (see the module docstring) and return one record.

    Args:
        preset: sizes and hyper-parameters.
        extractor: a frozen embedding model (default: ``dhunet_encoder(size, seed)``).
        noise: DP-SGD noise source for the generators (default privfl's secure source; pass
            ``SeededNoise`` for a reproducible run).
        progress: rich progress bars.
        methods: a subset of ``("Local", "FedAvg", "FedProx", "FedLambda", "DP-CVAE", "DP-CGAN")``.

    Returns:
        ``{"preset", "data", "methods": [one record per method], "seconds"}``; accuracies are
        fractions in [0, 1], ε at ``preset.delta``, fidelity in embedding units.
    """
    all_methods = ("Local", "FedAvg", "FedProx", "FedLambda", "DP-CVAE", "DP-CGAN")
    chosen = tuple(methods) if methods is not None else all_methods
    unknown = sorted(set(chosen) - set(all_methods))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {all_methods}")
    t0 = time.perf_counter()
    torch.manual_seed(preset.seed)
    splits, num_classes = _client_splits(preset, extractor, progress)
    dim = int(splits[0].train[0].shape[1])
    local = [
        train_linear(*s.train, num_classes, epochs=preset.classifier_epochs, seed=preset.seed + c)
        for c, s in enumerate(splits)
    ]
    linear_params = _linear_params(dim, num_classes)
    rows: list[dict[str, Any]] = []
    fed: nn.Linear | None = None
    if "Local" in chosen:
        rows.append(
            {
                "method": "Local",
                **_scores([predict_proba(m, s.test[0]) for m, s in zip(local, splits)], splits),
                "lambda": 1.0,
                "params": {"total": linear_params},
            }
        )
    for name, mu in (("FedAvg", 0.0), ("FedProx", preset.prox_mu)):
        if name not in chosen and not (name == "FedAvg" and "FedLambda" in chosen):
            continue
        model = federated_linear(
            [s.train for s in splits], num_classes, rounds=preset.fed_rounds, mu=mu, lr=1e-3, seed=preset.seed
        )
        if name == "FedAvg":
            fed = model
        if name in chosen:
            rows.append(
                {
                    "method": name,
                    **_scores([predict_proba(model, s.test[0]) for s in splits], splits),
                    "params": {"total": linear_params},
                    "mia": {"attack": "LOSS on the federated classifier", **_loss_attack(model, splits)},
                }
            )
    if "FedLambda" in chosen:
        assert fed is not None
        probs, lambdas = _mixed(local, [fed] * len(splits), splits)
        rows.append(
            {
                "method": "FedLambda",
                **_scores(probs, splits),
                "lambda": float(np.mean(lambdas)),
                "lambdas": lambdas,
                "params": {"total": 2 * linear_params},
            }
        )
    common: dict[str, Any] = {
        "rounds": preset.rounds,
        "local_epochs": preset.local_epochs,
        "lr": preset.lr,
        "batch_size": preset.batch_size,
        "epsilon": preset.epsilon,
        "delta": preset.delta,
        "max_grad_norm": preset.max_grad_norm,
        "latent": preset.latent,
        "hidden": preset.hidden,
        "seed": preset.seed,
    }
    if noise is not None:
        common["noise"] = noise
    if "DP-CVAE" in chosen:
        rows.append(
            _generative(
                "DP-CVAE",
                dpcvae.train_federated_dpcvae,
                dpcvae.sample,
                dpcvae.DPCVAEConfig(**common),
                splits,
                local,
                num_classes,
                preset,
                progress,
            )
        )
    if "DP-CGAN" in chosen:
        rows.append(
            _generative(
                "DP-CGAN",
                dpcgan.train_federated_dpcgan,
                dpcgan.sample,
                dpcgan.DPCGANConfig(**common),
                splits,
                local,
                num_classes,
                preset,
                progress,
            )
        )
    sizes = {k: [int(len(getattr(s, k)[1])) for s in splits] for k in ("train", "val", "test")}
    return {
        "preset": asdict(preset),
        "data": {"clients": preset.clients, "embedding_dim": dim, "num_classes": num_classes, "sizes": sizes},
        "methods": rows,
        "seconds": time.perf_counter() - t0,
    }
