"""What ``attack-vs-dp`` measures on a trained model under one setting, after training: gradient
inversion on one client's round update as the server receives it, membership inference on the
final global model, and the bytes a round puts on the wire.

Inversion threat model: the honest-but-curious server, holding the global model, attacks client
0's update in the form the setting lets it see — the protected payload itself when the setting
shows individual updates (no defense, FedDP, central DP's clipped update, the shared part under
partial sharing), and only the aggregate of all clients' round updates when it hides them (secure
aggregation, CKKS: the server of a real deployment never even decrypts it; the attack takes the
decrypted mean, i.e. a key-holding client's view). The update is one local SGD step (FedAvg mode)
on ``batch`` images of each client, BatchNorm in eval mode, masks known to the attacker (worst
case); ``batch = 1`` is the worst case for the client, the training batch size the realistic one.

Under partial sharing each client computes its update on its personalized model (the decoder it
kept), which the server does not have: the attack runs with the global model, as a real server's
would. Utility is then each client's personalized model on the test split, averaged.

Membership threat model: black-box logits of the final global model; the attacker scores the
clients' training samples (members) against the pooled test split (non-members, same sites) with
the pixel-averaged logit-scaled confidence of the true class (a LOSS-style attack, no shadows).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from privfl.attacks.inversion import InvertingGradients, observe_update
from privfl.attacks.membership import segmentation_scores
from privfl.attacks.metrics import attack_summary, empirical_epsilon, match_batches, roc_curve, ssim
from privfl.defenses.base import Defense, Payload, RoundContext
from privfl.experiments.sweep import NUM_CLASSES, Federation, finite_or_none
from privfl.fl.client import load_state, trainable_state
from privfl.fl.device import make_fabric
from privfl.fl.evaluate import evaluate
from privfl.updates import Update


def payload_bytes(payload: Payload) -> int:
    """Bytes a payload takes on the wire: its length for bytes (ciphertexts, masked vectors), the
    tensors' storage for a dict of tensors (float32 dense, as privfl sends them)."""
    if payload is None:
        return 0
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return len(payload)
    if isinstance(payload, Mapping):
        return int(sum(t.numel() * t.element_size() for t in payload.values() if isinstance(t, Tensor)))
    raise TypeError(f"cannot size a payload of type {type(payload).__name__}")


def _batch(dataset: Dataset, n: int) -> tuple[Tensor, Tensor]:
    size = len(cast(Sized, dataset))  # map-style: has __len__, which torch's Dataset type omits
    if size < n:
        raise ValueError(f"a client holds {size} samples, fewer than the inversion batch {n}")
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.stack([m for _, m in items])


@dataclass(frozen=True)
class InversionSpec:
    """The attack's budget and the client's local step it inverts."""

    iterations: int = 200
    restarts: int = 1
    tv: float = 1.0
    lr: float = 0.05
    local_lr: float = 0.1
    seed: int = 0


def round_payloads(
    defense: Defense,
    model: nn.Module,
    federation: Federation,
    batch: int,
    local_lr: float,
    ctx: RoundContext,
    client_starts: Sequence[Update] | None = None,
) -> tuple[list[Payload], tuple[Tensor, Tensor]]:
    """Each client's one-step update on its first ``batch`` images, protected by ``defense`` (a fresh
    instance) in the round ``ctx``; returns the payloads and client 0's batch.

    A client computes its update from ``client_starts[c]`` (its personalized state, e.g. the global
    encoders with the decoder it kept under partial sharing), the global state of ``model`` when
    ``None``; the attacker only ever holds ``model``."""
    defense.before_round(ctx)
    global_state = trainable_state(model)
    # the client sends every floating entry; an eval-mode step leaves the BatchNorm statistics unchanged
    unchanged = {k: torch.zeros_like(v) for k, v in global_state.items()}
    client_model = copy.deepcopy(model)
    payloads: list[Payload] = []
    for cid, data in enumerate(federation.clients):
        defense.personalize(global_state, ctx.for_client(cid))  # what the server hands out this round
        load_state(client_model, global_state if client_starts is None else client_starts[cid])
        images, masks = _batch(data, batch)
        update = observe_update(client_model, images, masks, mode="fedavg", local_steps=1, local_lr=local_lr)
        payloads.append(defense.protect({**unchanged, **update}, ctx.for_client(cid)))
    return payloads, _batch(federation.clients[0], batch)


def invert(
    defense: Defense,
    model: nn.Module,
    federation: Federation,
    batch: int,
    spec: InversionSpec,
    ctx: RoundContext,
    progress: bool,
    client_starts: Sequence[Update] | None = None,
) -> dict[str, Any]:
    """Run the inversion of client 0's update under ``defense`` (see the module docstring)."""
    t0 = time.perf_counter()
    payloads, (images, masks) = round_payloads(
        defense, model, federation, batch, spec.local_lr, ctx, client_starts
    )
    hides = bool(defense.hides_individual_updates)
    observed = defense.aggregate(payloads, ctx) if hides else payloads[0]
    attack = InvertingGradients(
        model,
        mode="fedavg",
        local_steps=1,
        local_lr=spec.local_lr,
        iterations=spec.iterations,
        restarts=spec.restarts,
        tv=spec.tv,
        lr=spec.lr,
        progress=progress,
        seed=spec.seed,
    )
    result = attack.reconstruct(observed, tuple(images.shape), masks)
    perm, psnrs = match_batches(result.images, images)
    matched = result.images[list(perm)]
    return {
        "batch": batch,
        "attacked": "aggregate of all clients" if hides else "client 0's payload",
        "psnr_db": float(psnrs.mean()),
        "psnr_db_per_image": [float(p) for p in psnrs],
        "ssim": float(ssim(matched, images).mean()),
        "final_loss": finite_or_none(result.loss),
        "iterations_per_second": result.iterations_per_second,
        "seconds": time.perf_counter() - t0,
        "upload_bytes_per_client": payload_bytes(payloads[0]),
        "_images": images,
        "_reconstruction": matched,
    }


def personalized_utility(
    model: nn.Module, starts: Sequence[Update], federation: Federation
) -> dict[str, float]:
    """Mean over clients of each client's personalized model's test metrics (classes 1..3)."""
    probe = copy.deepcopy(model)
    fabric = make_fabric("cpu" if next(model.parameters()).device.type == "cpu" else "auto")
    rows: list[dict[str, Any]] = []
    for state in starts:
        load_state(probe, state)
        rows.append(evaluate(probe, federation.test, NUM_CLASSES, fabric).to_dict())
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("dice", "jaccard", "accuracy")}


def membership(
    model: nn.Module, federation: Federation, delta: float, max_per_side: int = 256
) -> dict[str, Any]:
    """Confidence-score membership inference on the final model: clients' training samples vs the
    test split, as many of each (at most ``max_per_side``)."""
    pool: ConcatDataset = ConcatDataset(federation.clients)
    n = min(len(pool), len(cast(Sized, federation.test)), max_per_side)
    members, non_members = Subset(pool, list(range(n))), Subset(federation.test, list(range(n)))
    scores = torch.cat([segmentation_scores(model, members), segmentation_scores(model, non_members)])
    is_member = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    summary = attack_summary(scores, is_member)
    fpr, tpr, _ = roc_curve(scores, is_member)
    return {
        "attack": "confidence threshold (logit-scaled, pixel-averaged)",
        "n_members": n,
        "n_non_members": n,
        "auc": summary["auc"],
        "tpr_at_1%_fpr": summary["tpr_at_1%_fpr"],
        "tpr_at_0.1%_fpr": summary["tpr_at_0.1%_fpr"],
        "empirical_epsilon": float(empirical_epsilon(scores, is_member, delta)),
        "roc": {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]},
    }


def wire(model: nn.Module, upload_bytes_per_client: int, num_clients: int) -> dict[str, int]:
    """Bytes per round: every client uploads its payload and downloads the dense float32 global
    state (buffers included, as privfl's server broadcasts it)."""
    download = payload_bytes(trainable_state(model))
    return {
        "upload_bytes_per_client": upload_bytes_per_client,
        "download_bytes_per_client": download,
        "bytes_per_round": num_clients * (upload_bytes_per_client + download),
    }


def strip_tensors(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Split an inversion record into its JSON part and its tensors (keys starting with ``_``)."""
    plain = {k: v for k, v in record.items() if not k.startswith("_")}
    tensors = {k[1:]: v for k, v in record.items() if k.startswith("_")}
    return plain, tensors


def batches(realistic: int) -> Sequence[int]:
    """The inversion batch sizes: 1 (worst case) and the training batch (if larger)."""
    return (1,) if realistic <= 1 else (1, realistic)
