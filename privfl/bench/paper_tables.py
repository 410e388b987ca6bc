"""Shared pieces of ``fedavg-vs-feddp`` and ``noise-ablation``, the two subcommands that reproduce the
*shape* of FedDP's tables (Pan et al., BIBM 2024: Table I, centralized / FL / FedDP per model;
Table II, FedDP's noise ablation over C and σ) with the column the paper lacks: the ε an accountant
proves at δ = 1e-5 next to the paper's ε = C/σ (its Eq. 14, not a DP guarantee).

Here: the presets (``cpu-quick``, ``paper``), the command-line flags both subcommands share and their
validation (everything is checked before any training), the FedDP mechanism with seeded noise, the
centralized baseline, one training run summarised as a table row (its CSV columns, table cells and
progress line) and the output folder.
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import ConcatDataset

from privfl.bench.common import default_out, eps_text
from privfl.data.errors import DataError
from privfl.defenses import FedDPNoise
from privfl.defenses.base import Defense
from privfl.defenses.rng import SeededNoise
from privfl.experiments.sweep import Federation, TrainingPreset, make_model, train
from privfl.fl import ClientConfig
from privfl.models import list_models

DELTA = 1e-5
"""δ of every accounted ε in both tables."""

FEDDP_SIGMA = 0.5
FEDDP_CLIP = 0.05
"""FedDP's published setting (Table I): σ = 0.5 noise multiplier (std σ·C = 0.025), C = 0.05 L2 clip."""

DEFAULT_CLIPS = (0.05, 0.15, 0.25, 0.35)
DEFAULT_SIGMAS = (0.1, 0.3, 0.5)
"""FedDP's Table II grid."""


@dataclass(frozen=True, kw_only=True)
class PaperPreset(TrainingPreset):
    """Every knob of the two paper-table subcommands; command-line flags override single fields.

    ``models`` are the rows of ``fedavg-vs-feddp``; ``model`` is the one ``noise-ablation`` trains.
    """

    models: tuple[str, ...]
    model: str


PRESETS: dict[str, PaperPreset] = {
    # a few minutes on 2 CPU cores (benchmarks/RESULTS.md); same data size and rounds as attack-vs-dp's
    # cpu-quick
    "cpu-quick": PaperPreset(
        models=("dhunet-tiny", "unet"),
        model="dhunet-tiny",
        clients=5,
        samples_per_client=16,
        size=32,
        rounds=10,
        config=ClientConfig(local_epochs=1, batch_size=4, lr=0.1, momentum=0.9),
    ),
    # FedDP's setting (5 clients, 224×224, 150 rounds, batch 24, SGD lr 0.01 momentum 0.9); meant for a GPU
    "paper": PaperPreset(
        models=("dhunet", "unet"),
        model="dhunet",
        clients=5,
        samples_per_client=96,
        size=224,
        rounds=150,
        config=ClientConfig(local_epochs=1, batch_size=24, lr=0.01, momentum=0.9),
    ),
}

_OVERRIDES = (
    ("rounds", int),
    ("clients", int),
    ("samples-per-client", int),
    ("size", int),
    ("batch-size", int),
    ("lr", float),
    ("local-epochs", int),
)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags both subcommands take (``--json`` is added by the dispatcher)."""
    p.add_argument(
        "--preset",
        default="cpu-quick",
        choices=list(PRESETS),
        help="cpu-quick (default: 5 clients, 16 samples each, 32px, 10 rounds) or paper "
        "(5 clients, 224px, 150 rounds, batch 24, lr 0.01; meant for a GPU)",
    )
    for flag, typ in _OVERRIDES:
        p.add_argument(f"--{flag}", type=typ, default=None, help="override the preset's value")
    p.add_argument("--data", default="synthetic", help="'synthetic' (default) or a SegmentationFolder root")
    p.add_argument(
        "--list", dest="list_name", default="default", help="list name of a SegmentationFolder root"
    )
    p.add_argument(
        "--device", default=None, help="Lightning Fabric accelerator: auto (preset default), cpu, cuda"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of data, model initialisation and the (seeded) noise"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder; default results/<subcommand>/<timestamp>"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_preset(args: argparse.Namespace) -> PaperPreset:
    """``args.preset`` with the non-``None`` overrides of ``args`` applied, range-checked (``ValueError``)."""
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
    overrides = {k: v for k, v in vars(args).items() if k not in ("models", "model")}
    return PRESETS[args.preset].with_overrides(overrides)


def check_models(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` if every one is a registered model (``ValueError`` listing the valid names otherwise)."""
    names = tuple(n.strip() for n in names)
    if not names or any(not n for n in names):
        raise ValueError(f"give at least one model name; valid: {', '.join(list_models())}")
    for name in names:
        if name not in list_models():
            raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    if len(set(names)) != len(names):
        raise ValueError(f"model listed twice in {','.join(names)!r}")
    return names


def parse_positive_floats(text: str, flag: str) -> tuple[float, ...]:
    """A comma list of distinct positive finite floats (``ValueError`` naming ``flag`` otherwise)."""
    parts = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in parts):
        raise ValueError(f"{flag}: give a comma-separated list of positive numbers, got {text!r}")
    values = []
    for s in parts:
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"{flag}: {s!r} is not a number") from None
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{flag}: every value must be a positive finite number, got {s!r}")
        values.append(v)
    if len(set(values)) != len(values):
        raise ValueError(f"{flag}: value listed twice in {text!r}")
    return tuple(values)


def load(args: argparse.Namespace, preset: PaperPreset) -> Federation:
    """The federation of ``args.data`` at the preset's sizes (``ValueError`` / ``DataError``)."""
    return preset.load_federation(args.data, seed=args.seed, list_name=args.list_name)


def base_models(names: Sequence[str], preset: PaperPreset, seed: int) -> dict[str, nn.Module]:
    """Each model's initial weights (one init per model, shared by all its settings); building them
    before training also catches an image size a model cannot take."""
    out = {}
    for name in names:
        try:
            out[name] = make_model(name, preset.size, seed)
        except (ValueError, AssertionError, RuntimeError) as e:
            raise ValueError(f"model {name!r} cannot be built for {preset.size}px: {e}") from e
    return out


def feddp(sigma: float, clip: float, seed: int) -> FedDPNoise:
    """FedDP's Eq. 11 (clip to ``clip``, add N(0, ``sigma``²)) with **seeded** noise, for reproducible
    tables: :class:`~privfl.defenses.rng.SeededNoise` is not cryptographically secure, and its warning
    (only that one) is silenced here because these are experiments, not deployments. The accountant
    reports ε at :data:`DELTA`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not cryptographically secure", category=UserWarning)
        return FedDPNoise(sigma, clip, noise=SeededNoise(seed), accounting_delta=DELTA)


def centralized(federation: Federation) -> Federation:
    """One client holding every client's training data (``ConcatDataset``), the same test split."""
    return Federation(
        [ConcatDataset(federation.clients)],
        federation.test,
        f"{federation.source}, pooled into one client",
        federation.image_size,
    )


def run_row(
    federation: Federation,
    base: nn.Module,
    defense: Defense | None,
    preset: PaperPreset,
    *,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Train a copy of ``base`` under ``defense`` and summarise it as a table row (final-round test
    metrics on classes 1..3; ``epsilon`` ``None`` without DP)."""
    run = train(
        federation,
        copy.deepcopy(base),
        defense,
        rounds=preset.rounds,
        config=preset.config,
        seed=seed,
        device=preset.device,
        progress=progress,
    )
    s = run.summary()
    eps = run.epsilon
    return {
        "dice": s["dice"],
        "jaccard": s["jaccard"],
        "accuracy": s["accuracy"],
        "train_loss": s["train_loss"],
        "epsilon": eps,
        "delta": s["delta"],
        "accountant": s["accountant"],
        "paper_epsilon": defense.paper_epsilon if isinstance(defense, FedDPNoise) else None,
        "train_seconds": run.seconds,
        "dice_per_round": s["dice_per_round"],
    }


ROW_COLUMNS = ("dice", "jaccard", "accuracy", "epsilon", "delta", "paper_epsilon", "train_seconds")
"""The CSV columns of a :func:`run_row` row, after the subcommand's own."""


def row_cells(row: dict[str, Any]) -> list[str]:
    """The table cells of a :func:`run_row` row: Dice, Jaccard, Acc, accounted ε, paper ε, train s."""
    paper = "—" if row["paper_epsilon"] is None else f"{row['paper_epsilon']:.3g}"
    return [
        f"{row['dice']:.4f}",
        f"{row['jaccard']:.4f}",
        f"{row['accuracy']:.4f}",
        eps_text(row["epsilon"]),
        paper,
        f"{row['train_seconds']:.1f}",
    ]


def row_line(row: dict[str, Any]) -> str:
    """The progress line of a finished :func:`run_row` row (after its name)."""
    return f"Dice {row['dice']:.4f}  ε {eps_text(row['epsilon'])}  {row['train_seconds']:.1f} s"


def start(args: argparse.Namespace, name: str) -> tuple[Path, bool]:
    """``(out, progress)`` of subcommand ``name``: ``--out`` (default ``results/<name>/<timestamp>``),
    created, and whether to draw progress bars."""
    out = args.out or default_out(name)
    out.mkdir(parents=True, exist_ok=True)
    return out, not args.no_progress and not args.json


def config_record(preset: PaperPreset, args: argparse.Namespace) -> dict[str, Any]:
    """The ``config`` of a results record: the preset's :meth:`~TrainingPreset.record`, δ, seed, data,
    noise."""
    rec = preset.record()
    rec["models"] = list(preset.models)
    rec.update(delta=DELTA, seed=args.seed, data=args.data, noise="seeded (SeededNoise, not secure)")
    return rec


def validated(name: str, check):
    """Run ``check()``; a ``ValueError`` / ``DataError`` becomes ``SystemExit("<name>: <message>")``."""
    try:
        return check()
    except (ValueError, DataError) as e:
        raise SystemExit(f"{name}: {e}") from e
