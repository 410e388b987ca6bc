"""One ``attack-vs-dp`` sweep: plan (validate everything, compute each setting's ε before training),
then per setting train → attack → record, saving each setting's record as it completes so that
``--resume`` skips the finished ones (and continues a setting's training from its checkpoint)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from privfl.experiments.attack_vs_dp.probes import (
    InversionSpec,
    batches,
    invert,
    membership,
    personalized_utility,
    strip_tensors,
    wire,
)
from privfl.experiments.attack_vs_dp.settings import Setting, SweepSpec, planned_epsilon
from privfl.experiments.sweep import Federation, TrainingPreset, make_model, train
from privfl.fl.client import trainable_state


@dataclass(frozen=True, kw_only=True)
class Preset(TrainingPreset):
    """Every knob of an attack-vs-dp sweep; command-line flags override single fields (the named
    presets are ``privfl.bench.attack_vs_dp.presets.PRESETS``).

    Attributes:
        model: the ``privfl.models`` name trained.
        clip: L2 clip norm C of the Gaussian and Laplace settings (:class:`SweepSpec`).
        inversion_iterations: Inverting Gradients iterations per attacked update.
        inversion_batch: the "realistic" batch attacked besides batch 1 (at most
            ``samples_per_client``).
    """

    model: str
    clip: float
    inversion_iterations: int
    inversion_batch: int

    positive_ints = (*TrainingPreset.positive_ints, "inversion_iterations", "inversion_batch")

    @classmethod
    def check_values(cls, values: Mapping[str, Any]) -> None:
        """:meth:`TrainingPreset.check_values`, then ``clip > 0`` and the inversion batch."""
        super().check_values(values)
        if not values["clip"] > 0:
            raise ValueError(f"--clip must be > 0, got {values['clip']}")
        if values["inversion_batch"] > values["samples_per_client"]:
            raise ValueError(
                f"--inversion-batch {values['inversion_batch']} exceeds --samples-per-client "
                f"{values['samples_per_client']}"
            )


class OutOfBudgetError(ValueError):
    """A setting would spend more ε than ``--max-epsilon`` allows (raised before any training)."""


@dataclass(frozen=True)
class Plan:
    """A validated sweep: the settings, what their defenses are built for, and their ε before training."""

    preset: Preset
    spec: SweepSpec
    settings: tuple[Setting, ...]
    planned_epsilons: dict[str, float | None]
    inversion: InversionSpec

    def fingerprint(self, data: str) -> dict[str, Any]:
        """What a saved setting record must match to be reused by ``--resume``."""
        return {
            "preset": self.preset.record(),
            "spec": asdict(self.spec),
            "inversion": asdict(self.inversion),
            "data": data,
        }


def make_plan(
    preset: Preset,
    settings: Sequence[Setting],
    *,
    delta: float,
    seed: int,
    seeded_noise: bool,
    max_epsilon: float | None,
) -> Plan:
    """Build every setting's defense once (validating it) and compute the ε its accountant will report
    after the planned rounds. Raises :class:`OutOfBudgetError` when one exceeds ``max_epsilon``."""
    spec = SweepSpec(
        rounds=preset.rounds,
        num_clients=preset.clients,
        delta=delta,
        clip=preset.clip,
        seed=seed,
        seeded_noise=seeded_noise,
    )
    model = make_model(preset.model, preset.size, seed)
    planned = {s.name: planned_epsilon(s.build(spec, model), spec) for s in settings}
    if max_epsilon is not None:
        over = {k: v for k, v in planned.items() if v is not None and v > max_epsilon}
        if over:
            shown = ", ".join(f"{k} (ε = {v:.3g})" for k, v in over.items())
            raise OutOfBudgetError(
                f"over the budget --max-epsilon {max_epsilon:g} at δ = {delta:g} after "
                f"{preset.rounds} rounds: {shown}; drop them or raise the budget"
            )
    inversion = InversionSpec(iterations=preset.inversion_iterations, local_lr=preset.config.lr, seed=seed)
    return Plan(preset, spec, tuple(settings), planned, inversion)


def _paths(out: Path, name: str) -> tuple[Path, Path, Path]:
    base = out / "settings"
    return base / f"{name}.json", base / f"{name}.pt", out / "checkpoints" / name


def load_done(
    out: Path, name: str, fingerprint: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A finished setting's record and tensors, if saved by a run with the same configuration."""
    record_path, tensor_path, _ = _paths(out, name)
    if not (record_path.is_file() and tensor_path.is_file()):
        return None
    record = json.loads(record_path.read_text())
    if record.get("fingerprint") != fingerprint:
        return None
    return record, torch.load(tensor_path, weights_only=True)


def run_setting(
    plan: Plan,
    setting: Setting,
    federation: Federation,
    out: Path,
    *,
    data: str,
    resume: bool,
    progress: bool,
    console: Console,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train under ``setting``, attack the result, save and return ``(record, tensors)``."""
    preset, spec = plan.preset, plan.spec
    record_path, tensor_path, checkpoint = _paths(out, setting.name)
    t0 = time.perf_counter()
    model = make_model(preset.model, preset.size, spec.seed)  # the same initial model for every setting
    defense = setting.build(spec, model)
    run = train(
        federation,
        model,
        defense,
        rounds=preset.rounds,
        config=preset.config,
        seed=spec.seed,
        device=preset.device,
        progress=progress,
        checkpoint_dir=checkpoint,
        resume=resume,
    )
    trained = run.model.eval()
    global_state = trainable_state(trained)
    # the state each client would train from next round (partial sharing: its own decoder)
    starts = [
        defense.personalize(global_state, spec.round_context(preset.rounds, cid))
        for cid in range(spec.num_clients)
    ]
    personalized = any(any(not torch.equal(s[k], global_state[k]) for k in global_state) for s in starts)
    inversions, tensors = [], {}
    for b in batches(preset.inversion_batch):
        console.print(f"  inversion of a batch-{b} update")
        rec = invert(
            setting.build(spec, trained),
            trained,
            federation,
            b,
            plan.inversion,
            spec.round_context(),
            progress,
            starts if personalized else None,
        )
        plain, t = strip_tensors(rec)
        inversions.append(plain)
        tensors[f"batch{b}"] = {k: v.cpu() for k, v in t.items()}
    mia = membership(trained, federation, spec.delta)
    summary = run.summary()
    if personalized:
        summary.update(personalized_utility(trained, starts, federation))
    record = {
        "name": setting.name,
        "label": setting.label,
        "threat": setting.threat,
        "utility": {
            **{k: summary[k] for k in ("dice", "jaccard", "accuracy", "train_loss", "dice_per_round")},
            "model": "personalized (mean over clients)" if personalized else "global",
        },
        "privacy": {
            "epsilon": summary["epsilon"],
            "delta": spec.delta if summary["epsilon"] is not None else None,
            "accountant": summary["accountant"],
            "planned_epsilon": plan.planned_epsilons[setting.name],
            "target_epsilon": setting.target_epsilon,
            "claimed_epsilon": spec.feddp_clip / spec.feddp_sigma if setting.name == "feddp" else None,
        },
        "inversion": inversions,
        "membership": mia,
        "wire": wire(trained, inversions[0]["upload_bytes_per_client"], spec.num_clients),
        "seconds": {
            "train": run.seconds,
            "inversion": sum(r["seconds"] for r in inversions),
            "total": time.perf_counter() - t0,
        },
        "fingerprint": plan.fingerprint(data),
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, tensor_path)
    record_path.write_text(json.dumps(record, indent=1))
    return record, tensors


def run_plan(
    plan: Plan,
    federation: Federation,
    out: Path,
    *,
    data: str,
    resume: bool,
    progress: bool,
    console: Console,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every setting of ``plan`` in order (finished ones reused with ``resume``)."""
    records, tensors = [], {}
    fingerprint = plan.fingerprint(data)
    for i, setting in enumerate(plan.settings, 1):
        done = load_done(out, setting.name, fingerprint) if resume else None
        if done is not None:
            console.print(f"[{i}/{len(plan.settings)}] {setting.name}: done in an earlier run, reused")
            record, t = done
        else:
            console.rule(f"[{i}/{len(plan.settings)}] {setting.label}")
            record, t = run_setting(
                plan, setting, federation, out, data=data, resume=resume, progress=progress, console=console
            )
        records.append(record)
        tensors[setting.name] = t
    return records, tensors
