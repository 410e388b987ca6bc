"""Membership inference against an intentionally overfitted model, undefended and with DP-SGD.

``python -m privfl.bench membership`` runs :func:`~privfl.experiments.membership.run_membership_experiment`:
a SyntheticHistology population split into members and non-members, a target trained on the
members by privfl's FL loop (one client, many epochs, no augmentation), LiRA with ``--shadows``
shadow models, the LOSS and confidence attacks; then the same with sample-level DP-SGD calibrated
to ``--dp-epsilon``. Prints AUC, TPR at 0.1% / 1% FPR and the empirical ε lower bound next to the
accounted ε; writes the JSON record and a log-log ROC plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from privfl.bench.common import args_record, console_for, default_out, finish, machine
from privfl.experiments.membership import run_membership_experiment

ATTACKS = ("lira_online_fixed", "lira_online", "lira_offline_fixed", "lira_offline", "confidence", "loss")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--population", type=int, default=64, help="population size; half are members (default 64)"
    )
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--model", default="unet", help="model name (default unet, widths 8,16,32,64)")
    p.add_argument("--shadows", type=int, default=8, help="LiRA shadow models (default 8)")
    p.add_argument(
        "--epochs", type=int, default=60, help="local epochs of the undefended recipe (default 60)"
    )
    p.add_argument(
        "--dp-epsilon", type=float, default=1.0, help="DP-SGD target epsilon; 0 skips DP (default 1)"
    )
    p.add_argument("--dp-delta", type=float, default=1e-5, help="DP-SGD delta (default 1e-5)")
    p.add_argument("--dp-epochs", type=int, default=20, help="local epochs with DP-SGD (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, models and noise")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder; default results/membership/<timestamp>"
    )


def _row(summary: dict[str, Any]) -> list[str]:
    return [
        f"{summary['auc']:.3f}",
        f"{summary['tpr_at_0.1%_fpr']:.3f}",
        f"{summary['tpr_at_1%_fpr']:.3f}",
        f"{summary['empirical_epsilon']:.2f}",
    ]


def run(args: argparse.Namespace) -> int:
    console = console_for(args)
    torch.set_num_threads(args.threads)
    out_dir = args.out or default_out("membership")
    out_dir.mkdir(parents=True, exist_ok=True)
    roc = out_dir / "roc.png"
    result = run_membership_experiment(
        population_size=args.population,
        image_size=args.size,
        model=args.model,
        num_shadows=args.shadows,
        local_epochs=args.epochs,
        dp_epsilon=args.dp_epsilon or None,
        dp_delta=args.dp_delta,
        dp_local_epochs=args.dp_epochs,
        seed=args.seed,
        progress=not args.no_progress,
        roc_path=str(roc),
    )
    for part in ("undefended", "dp"):
        if part not in result:
            continue
        res = result[part]
        eps = res["epsilon_accounted"]
        title = f"{part}: train loss {res['train_loss']:.3f}" + (
            "" if eps is None else f", accounted ε = {eps:.3f}"
        )
        table = Table(title=title)
        table.add_column("attack", no_wrap=True)
        for col in ("AUC", "TPR@0.1%", "TPR@1%", "ε_LB", "pooled AUC", "pooled TPR@1%", "pooled ε_LB"):
            table.add_column(col, justify="right")
        for attack in ATTACKS:
            pooled = res.get("pooled", {}).get(attack)
            extra = (
                ["", "", ""]
                if pooled is None
                else [
                    f"{pooled['auc']:.3f}",
                    f"{pooled['tpr_at_1%_fpr']:.3f}",
                    f"{pooled['empirical_epsilon']:.2f}",
                ]
            )
            table.add_row(attack, *_row(res[attack]), *extra)
        console.print(table)
    console.print(f"ROC plot: {roc}")
    record = {
        "args": args_record(args),
        "machine": machine(),
        "roc": str(roc),
        **result,
    }
    return finish(args, console, out_dir / "membership.json", record)
