"""``python -m privfl.bench attack-vs-dp``: privacy, utility and attack success side by side.

For each setting of the sweep (``--settings``; default: no defense, FedDP as published, Gaussian DP
at ε 8 and 1 central and distributed with secure aggregation, Laplace, partial sharing of the
encoders, CKKS), federated training (FedAvg, non-IID stain shift), then utility (Dice, Jaccard,
Acc on classes 1..3), the ε the accountant proves at δ, Inverting Gradients on client 0's round
update (batch 1 and the realistic batch), membership inference on the final global model, bytes on
the wire per round and wall time. Outputs in ``--out``: ``results.json`` (schema:
:mod:`privfl.bench.attack_vs_dp.schema`), ``results.csv``, ``frontier.png``,
``reconstructions.png``, ``roc.png`` and ``report.md``. Everything is validated — settings, data,
presets and the ε budget (``--max-epsilon``) — before any training starts. The sweep itself (plan,
settings, what is measured) is :mod:`privfl.experiments.attack_vs_dp`; here are the command line,
the presets, the tables and the report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from privfl.bench.attack_vs_dp.presets import PRESETS, resolve
from privfl.bench.attack_vs_dp.report import (
    CSV_COLUMNS,
    flat_row,
    plot_frontier,
    plot_reconstructions,
    plot_rocs,
    table,
    write_report,
)
from privfl.bench.attack_vs_dp.schema import SCHEMA_VERSION, validate_results
from privfl.bench.common import console_for, default_out, finish, machine, write_csv
from privfl.data.errors import DataError
from privfl.experiments.attack_vs_dp.experiment import OutOfBudgetError, make_plan, run_plan
from privfl.experiments.attack_vs_dp.settings import DEFAULT_SETTINGS, parse_settings
from privfl.models import list_models

__all__ = ["OutOfBudgetError", "add_arguments", "run"]


_OVERRIDES = (
    ("clients", int),
    ("samples-per-client", int),
    ("size", int),
    ("rounds", int),
    ("local-epochs", int),
    ("batch-size", int),
    ("lr", float),
    ("clip", float),
    ("inversion-iterations", int),
    ("inversion-batch", int),
)
"""The flags that override one numeric field of the preset (``--model`` and ``--device`` do too)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="cpu-quick",
        choices=list(PRESETS),
        help="cpu-quick (default; unet-wide, 32px, 10 rounds) or paper (dhunet, 224px, 150 rounds; GPU)",
    )
    p.add_argument(
        "--settings", default=None, help=f"comma-separated settings (default: {','.join(DEFAULT_SETTINGS)})"
    )
    p.add_argument("--data", default="synthetic", help="'synthetic' or a SegmentationFolder root")
    p.add_argument(
        "--list", dest="list_name", default="default", help="list name of a SegmentationFolder root"
    )
    p.add_argument("--model", default=None, help="override the preset's model")
    for flag, typ in _OVERRIDES:
        p.add_argument(f"--{flag}", type=typ, default=None, help="override the preset's value")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of every ε reported (default 1e-5)")
    p.add_argument(
        "--max-epsilon",
        type=float,
        default=None,
        help="refuse (before training) any setting whose planned ε exceeds this",
    )
    p.add_argument(
        "--seeded-noise",
        action="store_true",
        help="reproducible DP noise (NOT cryptographically secure; experiments only)",
    )
    p.add_argument("--device", default=None, help="Lightning Fabric accelerator: auto (default), cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model, noise and attacks")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder; default results/attack-vs-dp/<timestamp>"
    )
    p.add_argument(
        "--resume", action="store_true", help="reuse the finished settings in --out, continue the rest"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("model", *(flag.replace("-", "_") for flag, _ in _OVERRIDES), "device")
    return {k: getattr(args, k) for k in keys}


def run(args: argparse.Namespace) -> int:
    console = console_for(args)
    if args.resume and args.out is None:
        raise SystemExit("attack-vs-dp: --resume needs --out (the folder of the run to continue)")
    try:  # every check before any training
        preset = resolve(args.preset, _overrides(args))
        if preset.model not in list_models():
            raise ValueError(f"unknown model {preset.model!r}; valid: {', '.join(list_models())}")
        settings = parse_settings(args.settings)
        if args.max_epsilon is not None and not args.max_epsilon > 0:
            raise ValueError(f"--max-epsilon must be > 0, got {args.max_epsilon}")
        if not 0 < args.delta < 1:
            raise ValueError(f"--delta must be in (0, 1), got {args.delta}")
        # synthetic: as many test images as training images, so membership inference compares equal sets
        n_train = preset.clients * preset.samples_per_client
        federation = preset.load_federation(
            args.data, seed=args.seed, list_name=args.list_name, test_samples=n_train
        )
        plan = make_plan(
            preset,
            settings,
            delta=args.delta,
            seed=args.seed,
            seeded_noise=args.seeded_noise,
            max_epsilon=args.max_epsilon,
        )
    except (ValueError, DataError) as e:
        raise SystemExit(f"attack-vs-dp: {e}") from e

    out = args.out or default_out("attack-vs-dp")
    out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"attack-vs-dp ({args.preset}): {preset.model}, {federation.describe()}, {preset.rounds} rounds; "
        f"{len(settings)} settings → {out}"
    )
    for s in settings:
        eps = plan.planned_epsilons[s.name]
        console.print(f"  {s.name:<24} planned ε = {'none' if eps is None else f'{eps:.3g}'}")
    t0 = time.perf_counter()
    progress = not args.no_progress and not args.json
    records, tensors = run_plan(
        plan, federation, out, data=args.data, resume=args.resume, progress=progress, console=console
    )
    results = {
        "schema_version": SCHEMA_VERSION,
        "preset": args.preset,
        "config": {
            "model": preset.model,
            "clients": preset.clients,
            "rounds": preset.rounds,
            "size": preset.size,
            "samples_per_client": preset.samples_per_client,
            "local_epochs": preset.config.local_epochs,
            "batch_size": preset.config.batch_size,
            "lr": preset.config.lr,
            "momentum": preset.config.momentum,
            "clip": preset.clip,
            "delta": args.delta,
            "seed": args.seed,
            "seeded_noise": args.seeded_noise,
            "inversion_iterations": preset.inversion_iterations,
            "inversion_batch": preset.inversion_batch,
        },
        "data": federation.describe(),
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
        "settings": [{k: v for k, v in r.items() if k != "fingerprint"} for r in records],
    }
    validate_results(results)
    write_csv(out / "results.csv", [flat_row(r) for r in results["settings"]], CSV_COLUMNS)
    plot_frontier(out / "frontier.png", results["settings"])
    plot_reconstructions(out / "reconstructions.png", results["settings"], tensors)
    plot_rocs(out / "roc.png", results["settings"])
    write_report(out / "report.md", results)
    console.print(table(results["settings"], f"attack-vs-dp ({args.preset}), ε at δ = {args.delta:g}"))
    console.print(f"report: {out / 'report.md'}")
    return finish(args, console, out / "results.json", results)
