"""``python -m privfl.bench fedavg-vs-feddp``: the shape of FedDP's Table I, with the proven ε.

For each model of ``--models`` (cpu-quick: ``dhunet-tiny,unet``; paper: ``dhunet,unet``), three
trainings from the same initial weights on the same data:

- **centralized**: one client holding all the clients' training data (``ConcatDataset``), FedAvg
  over that single client — plain training with the same recipe;
- **FL**: FedAvg over the clients, no defense;
- **FedDP**: FedAvg with FedDP's Eq. 11 (``FedDPNoise(sigma=0.5, clip=0.05)``: each client clips its
  update to L2 norm 0.05 and adds N(0, 0.5²) per coordinate).

Columns: Dice, Jaccard and Acc (classes 1..3, final round, pooled test split), the ε the accountant
proves at δ = 1e-5 (``none`` without DP), the paper's ε = C/σ (Eq. 14 — not a DP guarantee) and the
training time. The FedDP noise is **seeded** (``SeededNoise(--seed)``, reproducible and not
cryptographically secure; its warning is silenced for this benchmark only). Outputs in ``--out``:
``results.json`` and ``results.csv``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

from rich.table import Table

from privfl.bench import paper_tables as pt
from privfl.bench.common import console_for, finish, machine, write_csv

NAME = "fedavg-vs-feddp"
SETTINGS = ("centralized", "FL", "FedDP")
CSV_COLUMNS = ("model", "setting", *pt.ROW_COLUMNS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated models (default: the preset's, dhunet-tiny,unet for cpu-quick)",
    )
    pt.add_common_arguments(p)


def table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    t.add_column("model", no_wrap=True)
    t.add_column("setting", no_wrap=True)
    for col in ("Dice", "Jaccard", "Acc", f"ε (δ={pt.DELTA:g})", "paper ε = C/σ", "train s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["model"], r["setting"], *pt.row_cells(r))
    return t


def run(args: argparse.Namespace) -> int:
    console = console_for(args)

    def check():  # every check before any training
        preset = pt.resolve_preset(args)
        models = pt.check_models(args.models.split(",")) if args.models is not None else preset.models
        preset = replace(preset, models=models)
        federation = pt.load(args, preset)
        return preset, federation, pt.base_models(models, preset, args.seed)

    preset, federation, bases = pt.validated(NAME, check)
    out, progress = pt.start(args, NAME)
    console.print(
        f"{NAME} ({args.preset}): {', '.join(preset.models)}; {federation.describe()}; "
        f"{preset.rounds} rounds → {out}"
    )
    pooled = pt.centralized(federation)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name, base in bases.items():
        for setting in SETTINGS:
            data = pooled if setting == "centralized" else federation
            defense = pt.feddp(pt.FEDDP_SIGMA, pt.FEDDP_CLIP, args.seed) if setting == "FedDP" else None
            row = {
                "model": name,
                "setting": setting,
                "sigma": pt.FEDDP_SIGMA if defense else None,
                "clip": pt.FEDDP_CLIP if defense else None,
                **pt.run_row(data, base, defense, preset, seed=args.seed, progress=progress),
            }
            rows.append(row)
            console.print(f"  {name:<12} {setting:<12} {pt.row_line(row)}")
    results = {
        "subcommand": NAME,
        "preset": args.preset,
        "config": pt.config_record(preset, args),
        "feddp": {"sigma": pt.FEDDP_SIGMA, "clip": pt.FEDDP_CLIP},
        "data": federation.describe(),
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    write_csv(out / "results.csv", rows, CSV_COLUMNS)
    console.print(
        table(
            rows,
            f"{NAME} ({args.preset}): {preset.rounds} rounds, {preset.clients} clients, "
            f"{preset.size}px — test metrics on classes 1..3",
        )
    )
    return finish(args, console, out / "results.json", results)
