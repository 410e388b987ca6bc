"""``python -m privfl.bench dpcvae``: share data, not models — DP-CVAE on embeddings and its baselines,
with the privacy each one proves and what an attacker gets from what it releases.

Runs :func:`privfl.experiments.dpcvae.run_dpcvae_experiment` (Di Salvo, Nguyen, Ledig, MICCAI
2025) on the embedded synthetic data and writes, in ``--out``: ``results.json``, ``results.csv``
(one row per method), ``dpcvae.png`` (accuracy / balanced accuracy with the std over clients, and
membership-inference AUC) and ``report.md``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from rich.table import Table

from privfl.bench.common import (
    add_run_arguments,
    add_timm_arguments,
    default_out,
    machine,
    noise_label,
    noise_source,
    start_embedding_run,
    write_outputs,
)
from privfl.bench.common import fmt_cell as _fmt
from privfl.experiments.dpcvae import PRESETS, run_dpcvae_experiment

COLUMNS = (
    "method",
    "accuracy",
    "accuracy_std",
    "balanced_accuracy",
    "balanced_accuracy_std",
    "lambda",
    "epsilon",
    "delta",
    "fidelity_sliced_w1",
    "params_total",
    "mia_attack",
    "mia_auc",
    "mia_tpr_at_1%_fpr",
    "mia_loss_synthetic_classifier_auc",
    "seconds",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu-quick",
        help="sizes and hyper-parameters (default cpu-quick: 5 clients, 64 px, the paper's DP-SGD settings)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="subset of Local FedAvg FedProx FedLambda DP-CVAE DP-CGAN (default all)",
    )
    add_timm_arguments(p, "embeddings")
    add_run_arguments(p, "dpcvae", "DP")


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    mia = row.get("mia") or {}
    return {
        "method": row["method"],
        "accuracy": row["accuracy"],
        "accuracy_std": row["accuracy_std"],
        "balanced_accuracy": row["balanced_accuracy"],
        "balanced_accuracy_std": row["balanced_accuracy_std"],
        "lambda": row.get("lambda"),
        "epsilon": row.get("epsilon"),
        "delta": row.get("delta"),
        "fidelity_sliced_w1": row.get("fidelity_sliced_w1"),
        "params_total": row["params"].get("total"),
        "mia_attack": mia.get("attack"),
        "mia_auc": mia.get("auc"),
        "mia_tpr_at_1%_fpr": mia.get("tpr_at_1%_fpr"),
        "mia_loss_synthetic_classifier_auc": (row.get("mia_loss") or {}).get("auc"),
        "seconds": row.get("seconds"),
    }


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = range(len(rows))
    ax1.bar(
        [x - 0.2 for x in xs],
        [r["accuracy"] for r in rows],
        0.4,
        yerr=[r["accuracy_std"] for r in rows],
        label="accuracy",
        capsize=3,
    )
    ax1.bar(
        [x + 0.2 for x in xs],
        [r["balanced_accuracy"] for r in rows],
        0.4,
        yerr=[r["balanced_accuracy_std"] for r in rows],
        label="balanced accuracy",
        capsize=3,
    )
    ax1.set_xticks(list(xs), names, rotation=20)
    ax1.set_ylim(0, 1)
    ax1.set_title("test utility per client (mean ± std)")
    ax1.legend(fontsize=8)
    attacked = [r for r in rows if r.get("mia")]
    ax2.bar([r["method"] for r in attacked], [r["mia"]["auc"] for r in attacked], color="tab:red")
    ax2.axhline(0.5, color="grey", lw=1, ls="--")
    ax2.set_ylim(0, 1)
    ax2.set_title("membership inference AUC on what is released")
    for r, x in zip(attacked, range(len(attacked))):
        eps = r.get("epsilon")
        ax2.text(
            x, r["mia"]["auc"] + 0.02, "no DP" if eps is None else f"ε={eps:.2f}", ha="center", fontsize=8
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _report(record: dict[str, Any], path: Path) -> Path:
    p, d = record["preset"], record["data"]
    lines = [
        f"# DP-CVAE vs model sharing — preset `{p['name']}`",
        "",
        f"{d['clients']} clients (one stain profile each), {d['num_classes']} tissue classes, embeddings of "
        f"dimension {d['embedding_dim']}; train / val / test sizes per client: {d['sizes']['train']} / "
        f"{d['sizes']['val']} / {d['sizes']['test']}. Generators: {p['rounds']} rounds × "
        f"{p['local_epochs']} local epochs of DP-SGD (target ε = {p['epsilon']} at δ = {p['delta']} per "
        f"client, clip {p['max_grad_norm']}). "
        f"Machine: {record['machine'].get('cpu')}, {record['machine'].get('cores')} cores; "
        f"{record['seconds']:.0f} s in all.",
        "",
        "| method | accuracy | balanced acc. | λ | ε (accountant) | sliced W1 | params | MIA | AUC | "
        "TPR@1% FPR | LOSS AUC, classifier on synthetic data |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in record["methods"]:
        f = _flat(r)
        lines.append(
            f"| {f['method']} | {f['accuracy']:.3f} ± {f['accuracy_std']:.3f} | "
            f"{f['balanced_accuracy']:.3f} ± {f['balanced_accuracy_std']:.3f} | {_fmt(f['lambda'], '.2f')} | "
            f"{_fmt(f['epsilon'])} | {_fmt(f['fidelity_sliced_w1'])} | {_fmt(f['params_total'], ',')} | "
            f"{f['mia_attack'] or '—'} | {_fmt(f['mia_auc'])} | {_fmt(f['mia_tpr_at_1%_fpr'])} | "
            f"{_fmt(f['mia_loss_synthetic_classifier_auc'])} |"
        )
    lines += [
        "",
        "![utility and membership inference](dpcvae.png)",
        "",
        "ε is what each client's accountant proves for its DP-SGD run (the largest over clients); "
        "everything sampled from a DP decoder is covered by it (post-processing). Methods without ε "
        "(Local, FedAvg, FedProx, FedLambda) have no DP: the FedAvg classifier is attacked with LOSS, the "
        "generators' synthetic data with the distance to the closest synthetic record, and the classifiers "
        "trained on that synthetic data with LOSS. An AUC of 0.5 is chance.",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def run(args: argparse.Namespace) -> int:
    # opacus' RDP note when the best order is its largest: the bound is still valid (just not the tightest)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    console, ok, extractor = start_embedding_run(args)
    if not ok:
        return 2
    preset = PRESETS[args.preset]
    out = args.out or default_out("dpcvae")
    out.mkdir(parents=True, exist_ok=True)
    result = run_dpcvae_experiment(
        preset,
        extractor=extractor,
        noise=noise_source(args, preset.seed),
        progress=not args.no_progress,
        methods=args.methods,
    )
    record = {
        "subcommand": "dpcvae",
        "machine": machine(),
        **result,
        "extractor": args.timm_model or "dhunet-tiny encoder (random features)",
        "noise": noise_label(args),
    }
    table = Table(title=f"dpcvae ({preset.name}), {result['seconds']:.0f} s")
    for col in ("method", "acc", "bal. acc", "λ", "ε", "sliced W1", "params", "MIA AUC"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = [_flat(r) for r in result["methods"]]
    for f in rows:
        table.add_row(
            f["method"],
            f"{f['accuracy']:.3f}±{f['accuracy_std']:.3f}",
            f"{f['balanced_accuracy']:.3f}±{f['balanced_accuracy_std']:.3f}",
            _fmt(f["lambda"], ".2f"),
            _fmt(f["epsilon"]),
            _fmt(f["fidelity_sliced_w1"]),
            _fmt(f["params_total"], ","),
            _fmt(f["mia_auc"]),
        )
    return write_outputs(
        args,
        console,
        out,
        record,
        show=[table],
        tables={"results.csv": (rows, COLUMNS)},
        figures={"dpcvae.png": lambda path: _plot(result["methods"], path)},
        report=lambda path: _report(record, path),
    )
