"""``run_federated``: the FedAvg round loop.

Data flows one way each round: server samples clients (``defense.before_round``) → each client
starts from ``defense.personalize(global state)``, trains and computes its delta →
``defense.protect`` → server ``defense.aggregate`` → global state updated → metrics (per-client
validation on the personalized model, the pooled test split on the global model).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from torch import nn
from torch.utils.data import Dataset, Subset

from privfl.data.partition import train_val_split
from privfl.defenses.base import Defense, NoDefense
from privfl.defenses.dpsgd import DPSGD, DPSGDTrainer
from privfl.fl.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from privfl.fl.client import (
    Augment,
    Client,
    ClientConfig,
    SGDTrainer,
    clamp_running_variances,
    load_state,
    trainable_state,
)
from privfl.fl.device import make_fabric, prepare_model
from privfl.fl.evaluate import evaluate
from privfl.fl.server import Server
from privfl.models.losses import default_loss
from privfl.models.training import LocalTrainer
from privfl.progress import progress_bar
from privfl.seeding import derive_seed
from privfl.updates import Update, global_l2_norm


@dataclass
class FederatedResult:
    """What :func:`run_federated` returns: the final global state, the model holding it, and one
    history record per round (see :func:`run_federated` for the record's keys)."""

    global_state: Update
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)

    def curve(self, split: str = "test", metric: str = "dice") -> list[float]:
        """One metric per round, e.g. ``curve("test", "dice")``."""
        return [rec[split][metric] for rec in self.history if rec.get(split)]


def _privacy_record(defense: Defense) -> dict[str, Any] | None:
    """The (ε, δ) spent so far, if the defense accounts privacy."""
    accountant = getattr(defense, "accountant", None)
    if accountant is None:
        return None
    report = accountant.epsilon()
    return {
        "epsilon": report.epsilon,
        "delta": report.delta,
        "accountant": report.accountant,
        "rounds_accounted": accountant.steps,
    }


def _defense_reports(defense: Defense) -> dict[str, Any] | None:
    """Per-round reports of the stages that keep one (``last_report``: bytes on the wire, error, …)."""
    stages = getattr(defense, "stages", (defense,))
    reports = {}
    for i, stage in enumerate(stages):
        report = getattr(stage, "last_report", None)
        if dataclasses.is_dataclass(report) and not isinstance(report, type):
            reports[f"{i}:{type(stage).__name__}"] = dataclasses.asdict(report)
    return reports or None


def _split_clients(
    datasets: Sequence[Dataset], val_fraction: float, seed: int
) -> list[tuple[Dataset, Dataset | None]]:
    out: list[tuple[Dataset, Dataset | None]] = []
    for cid, ds in enumerate(datasets):
        if val_fraction <= 0:
            out.append((ds, None))
            continue
        tr, va = train_val_split(
            list(range(len(cast(Sized, ds)))), val_fraction, seed=derive_seed(seed, cid, "val")
        )
        out.append((Subset(ds, list(tr)), Subset(ds, list(va))))
    return out


def run_federated(
    model: nn.Module,
    client_datasets: Sequence[Dataset],
    test_data: Dataset | None,
    rounds: int,
    *,
    num_classes: int = 4,
    config: ClientConfig | None = None,
    defense: Defense | None = None,
    fraction: float = 1.0,
    val_fraction: float = 0.2,
    seed: int = 0,
    loss_fn: nn.Module | None = None,
    augment: Augment | str | None = "default",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    accelerator: str = "auto",
    precision: str | None = None,
    eval_batch_size: int = 16,
    progress: bool = True,
    on_round_end: Callable[[dict[str, Any]], None] | None = None,
    dp_sgd: DPSGD | None = None,
    trainer: LocalTrainer | None = None,
) -> FederatedResult:
    """Federated training with FedAvg, a defense in the loop, checkpoints and resume.

    Args:
        model: the architecture; its current weights are the round-0 global state.
        client_datasets: one dataset per client; each is split into train / held-out val
            (``val_fraction``) deterministically per seed.
        test_data: a pooled test split evaluated on the global model after every round (or ``None``).
        rounds: number of FL rounds.
        defense: privacy defense (``NoDefense()`` by default). Clients call ``protect``, the server
            ``aggregate``; the loop never touches an update after ``protect`` has seen it. Its
            ``before_round`` runs before any client trains; when it raises (e.g.
            :class:`~privfl.defenses.accounting.PrivacyBudgetExceeded`) the exception propagates
            and the global state / checkpoint stay at the last complete round.
        fraction: fraction of clients sampled per round. The server samples a fixed number of
            clients, not a Poisson sample, so privacy accounting claims no amplification
            (``sampling_rate=1``).
        loss_fn: training loss; ``None`` uses the model's ``default_loss()`` (DHU-Net: deep-supervised
            CE + Dice) or CE + Dice.
        augment: per-sample joint augmentation; ``"default"`` uses the model's ``default_augment()``
            when it has one (DHU-Net: flips, ±90° rotations, HSV jitter), ``None`` disables it.
        checkpoint_dir: where ``last.pt`` and ``history.json`` are written after every round.
        resume: continue from the last complete round in ``checkpoint_dir``.
        accelerator: passed to Lightning Fabric.
        precision: passed to Lightning Fabric (bf16-mixed on CUDA by default).
        on_round_end: called with each round's record after its checkpoint is written.
        dp_sgd: sample-level DP-SGD for local training (:class:`~privfl.defenses.dpsgd.DPSGD`, via
            opacus) instead of plain SGD: shorthand for ``trainer=DPSGDTrainer(dp_sgd)``. The model is
            converted with :func:`~privfl.models.dp_compat.make_private_compatible` first when it
            needs it (BatchNorm → GroupNorm, …); ``result.model`` is the converted model. Each
            client's DP-SGD privacy (a :class:`~privfl.defenses.accounting.PrivacyAccountant` state)
            is checkpointed and its ε reported per round.
        trainer: how each client trains locally (a :class:`~privfl.models.training.LocalTrainer`);
            default :class:`~privfl.fl.client.SGDTrainer` (plain SGD), or the DP-SGD trainer above.
            Its state is checkpointed under ``trainer.name``.

    Each history record has ``round``, ``sampled``, ``train_loss`` (sample-weighted mean), ``client_loss``,
    ``update_norm`` (L2 of the aggregated update; keys kept local are absent), ``privacy`` (``epsilon``,
    ``delta``, ``accountant`` so far, or ``None`` without an accountant), ``sample_privacy`` (with ``dp_sgd``:
    ``epsilon`` = the largest client ε, ``delta`` it holds at, ``accountant`` that gave it, ``per_client`` ε),
    ``defense_report`` (stages' ``last_report``, e.g. CKKS / secure-aggregation bytes per client and error),
    ``val`` (per client metrics), ``test`` (pooled metrics, or ``None``) and ``seconds``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not client_datasets:
        raise ValueError("need at least one client dataset")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    config = config or ClientConfig()
    defense = defense or NoDefense()
    loss_fn = loss_fn or default_loss(model)
    if augment == "default":
        factory = getattr(model, "default_augment", None)
        augment = factory() if callable(factory) else None
    elif isinstance(augment, str):
        raise ValueError(f"augment must be a callable, None or 'default', got {augment!r}")
    if dp_sgd is not None and trainer is not None:
        raise ValueError("give dp_sgd or trainer, not both (dp_sgd=... is trainer=DPSGDTrainer(...))")
    local: LocalTrainer = trainer or (DPSGDTrainer(dp_sgd) if dp_sgd is not None else SGDTrainer())
    model = local.prepare(model)
    fabric = make_fabric(accelerator, precision)
    model = prepare_model(model, fabric)
    splits = _split_clients(client_datasets, val_fraction, seed)
    clients = [Client(cid, tr, config, loss_fn, augment) for cid, (tr, _) in enumerate(splits)]
    server = Server(trainable_state(model), defense, len(clients), fraction, seed)
    fingerprint = {
        "rounds": rounds,
        "seed": seed,
        "num_clients": len(clients),
        "fraction": fraction,
        "sizes": [c.num_samples for c in clients],
        "keys": sorted(server.global_state),
    }

    history: list[dict[str, Any]] = []
    start = 0
    if resume:
        ckpt = load_checkpoint(checkpoint_dir)  # type: ignore[arg-type]
        if ckpt is not None:
            if ckpt["fingerprint"] != fingerprint:
                raise CheckpointMismatchError(
                    f"checkpoint in {checkpoint_dir} was written by a different run configuration"
                )
            server.global_state = ckpt["global_state"]
            history = ckpt["history"]
            defense.load_state_dict(ckpt["defense"])
            local.load_state_dict(ckpt.get(local.name, {}))
            start = ckpt["round"] + 1

    with progress_bar(progress, status="{task.fields[info]}") as bar:
        t_rounds = bar.add_task("rounds", total=rounds, completed=start, info="")
        t_clients = bar.add_task("clients", total=len(clients), info="")
        for r in range(start, rounds):
            t0 = time.perf_counter()
            sampled = server.sample(r)
            ctx = server.context(r, sampled, [clients[c].num_samples for c in sampled])
            defense.before_round(ctx)  # e.g. PrivacyBudgetExceeded: refused before any client trains
            payloads, losses = [], {}
            bar.reset(t_clients, total=len(sampled))
            for cid in sampled:
                start_state = defense.personalize(server.global_state, ctx.for_client(cid))
                delta, losses[cid] = clients[cid].fit(
                    model, start_state, r, rounds, fabric, seed, trainer=local
                )
                payloads.append(defense.protect(delta, ctx.for_client(cid)))
                del delta  # the defense has seen it: the loop never touches it again
                bar.advance(t_clients)
            mean_update = server.aggregate(payloads, ctx)
            clamp_running_variances(model, server.global_state)  # DP noise can make a variance negative

            val = {}
            for cid in sampled:  # each client evaluates the model it would train from next round
                val_data = splits[cid][1]
                if val_data is not None and len(cast(Sized, val_data)) > 0:
                    load_state(model, defense.personalize(server.global_state, ctx.for_client(cid)))
                    val[cid] = evaluate(model, val_data, num_classes, fabric, eval_batch_size).to_dict()
            load_state(model, server.global_state)
            test = (
                evaluate(model, test_data, num_classes, fabric, eval_batch_size).to_dict()
                if test_data
                else None
            )
            record = {
                "round": r,
                "sampled": list(sampled),
                "train_loss": sum(w * losses[c] for w, c in zip(ctx.weights, sampled)),
                "client_loss": {str(c): losses[c] for c in sampled},
                "update_norm": global_l2_norm(mean_update),
                "privacy": _privacy_record(defense),
                "sample_privacy": local.privacy_record(),
                "defense_report": _defense_reports(defense),
                "val": {str(c): v for c, v in val.items()},
                "test": test,
                "seconds": time.perf_counter() - t0,
            }
            history.append(record)
            if checkpoint_dir is not None:
                save_checkpoint(
                    checkpoint_dir,
                    {
                        "round": r,
                        "global_state": server.global_state,
                        "history": history,
                        "defense": defense.state_dict(),
                        "fingerprint": fingerprint,
                        local.name: local.state_dict(),
                    },
                )
            dice = f"test Dice {test['dice']:.3f}" if test else ""
            bar.update(t_rounds, advance=1, info=f"loss {record['train_loss']:.3f} {dice}")
            if on_round_end is not None:
                on_round_end(record)

    load_state(model, server.global_state)
    return FederatedResult(server.global_state, model, history)
