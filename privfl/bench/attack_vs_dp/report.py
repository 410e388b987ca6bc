"""``attack-vs-dp`` outputs: the terminal table, ``results.csv`` (rows: :func:`flat_row`),
``frontier.png``, ``reconstructions.png``, ``roc.png`` and ``report.md`` (which ties them together)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from torch import Tensor

from privfl.attacks.metrics import plot_roc
from privfl.bench.common import eps_text

CSV_COLUMNS = (
    "name",
    "label",
    "dice",
    "jaccard",
    "accuracy",
    "epsilon",
    "delta",
    "claimed_epsilon",
    "psnr_batch1_db",
    "ssim_batch1",
    "psnr_batchB_db",
    "batch_B",
    "mia_auc",
    "mia_tpr_at_1pct_fpr",
    "mia_empirical_epsilon",
    "bytes_per_round",
    "train_seconds",
    "total_seconds",
)


def flat_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row of a setting's record."""
    inv = rec["inversion"]
    last = inv[-1]
    return {
        "name": rec["name"],
        "label": rec["label"],
        "dice": rec["utility"]["dice"],
        "jaccard": rec["utility"]["jaccard"],
        "accuracy": rec["utility"]["accuracy"],
        "epsilon": rec["privacy"]["epsilon"],
        "delta": rec["privacy"]["delta"],
        "claimed_epsilon": rec["privacy"]["claimed_epsilon"],
        "psnr_batch1_db": inv[0]["psnr_db"],
        "ssim_batch1": inv[0]["ssim"],
        "psnr_batchB_db": last["psnr_db"] if len(inv) > 1 else None,
        "batch_B": last["batch"] if len(inv) > 1 else None,
        "mia_auc": rec["membership"]["auc"],
        "mia_tpr_at_1pct_fpr": rec["membership"]["tpr_at_1%_fpr"],
        "mia_empirical_epsilon": rec["membership"]["empirical_epsilon"],
        "bytes_per_round": rec["wire"]["bytes_per_round"],
        "train_seconds": rec["seconds"]["train"],
        "total_seconds": rec["seconds"]["total"],
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def table(records: Sequence[Mapping[str, Any]], title: str) -> Table:
    t = Table(title=title)
    t.add_column("setting", no_wrap=True)
    for col in ("Dice", "ε", "PSNR b=1", "PSNR b=B", "MIA AUC", "TPR@1%", "MB/round", "s"):
        t.add_column(col, justify="right")
    for rec in records:
        row = flat_row(rec)
        b = "—" if row["psnr_batchB_db"] is None else f"{row['psnr_batchB_db']:.1f}"
        t.add_row(
            rec["label"],
            f"{row['dice']:.3f}",
            eps_text(rec["privacy"]["epsilon"]),
            f"{row['psnr_batch1_db']:.1f}",
            b,
            f"{row['mia_auc']:.3f}",
            f"{row['mia_tpr_at_1pct_fpr']:.3f}",
            _mb(row["bytes_per_round"]),
            f"{row['total_seconds']:.0f}",
        )
    return t


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_frontier(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Utility (Dice) against attack success: inversion PSNR (batch 1) and membership AUC, ε labelled."""
    fig = _figure(11, 4.6)
    for ax, key, xlabel in (
        (fig.add_subplot(1, 2, 1), "psnr", "inversion PSNR, batch 1 (dB) — higher leaks more"),
        (fig.add_subplot(1, 2, 2), "auc", "membership AUC — 0.5 is chance"),
    ):
        xs = [r["inversion"][0]["psnr_db"] if key == "psnr" else r["membership"]["auc"] for r in records]
        ys = [r["utility"]["dice"] for r in records]
        ax.scatter(xs, ys, s=36, c=[f"C{i % 10}" for i in range(len(records))])
        # settings at (almost) the same point, e.g. none and ckks, share one label
        tol_x, tol_y = 0.03 * (max(xs) - min(xs) or 1.0), 0.03 * (max(ys) - min(ys) or 1.0)
        groups: list[tuple[float, float, list[str]]] = []
        for x, y, rec in zip(xs, ys, records):
            text = f"{rec['name']} (ε={eps_text(rec['privacy']['epsilon'])})"
            near = next((g for g in groups if abs(g[0] - x) <= tol_x and abs(g[1] - y) <= tol_y), None)
            if near is None:
                groups.append((x, y, [text]))
            else:
                near[2].append(text)
        for x, y, names in groups:
            ax.annotate("\n".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if key == "auc":
            ax.axvline(0.5, ls="--", color="grey", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test Dice (classes 1..3)")
        ax.grid(alpha=0.3)
    fig.suptitle("privacy–utility frontier: up and to the left is better")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def plot_reconstructions(
    path: Path, records: Sequence[Mapping[str, Any]], tensors: Mapping[str, Any]
) -> Path:
    """Client 0's original batch-1 image and every setting's reconstruction (like FedDP's Fig. 3)."""
    names = [r["name"] for r in records]
    first = tensors[names[0]]["batch1"]["images"]
    fig = _figure(1.9 * (len(names) + 1), 2.3)
    panels: list[tuple[str, Tensor]] = [("original", first[0])]
    for rec in records:
        panels.append(
            (
                f"{rec['name']}\n{rec['inversion'][0]['psnr_db']:.1f} dB",
                tensors[rec["name"]]["batch1"]["reconstruction"][0],
            )
        )
    for i, (title, img) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(np.clip(img.permute(1, 2, 0).numpy(), 0, 1))
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def plot_rocs(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    curves = {
        f"{r['name']} (ε={eps_text(r['privacy']['epsilon'])})": (
            np.asarray(r["membership"]["roc"]["fpr"]),
            np.asarray(r["membership"]["roc"]["tpr"]),
        )
        for r in records
    }
    return plot_roc(curves, path, loglog=True)


def _findings(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Sentences computed from the numbers: no defense vs the DP settings."""
    by_name = {r["name"]: r for r in records}
    out = []
    base = by_name.get("none")
    dp = [r for r in records if r["privacy"]["epsilon"] is not None]
    if base is not None:
        p0, d0 = base["inversion"][0]["psnr_db"], base["utility"]["dice"]
        out.append(
            f"Without a defense, client 0's batch-1 update is inverted to **{p0:.1f} dB** PSNR; the model "
            f"reaches Dice {d0:.3f}; membership AUC {base['membership']['auc']:.3f}."
        )
        for r in dp:
            p, d = r["inversion"][0]["psnr_db"], r["utility"]["dice"]
            verb = "falls" if p < p0 else "does not fall"
            out.append(
                f"**{r['label']}** (ε = {eps_text(r['privacy']['epsilon'])} at "
                f"δ = {r['privacy']['delta']:g}): PSNR {verb} to {p:.1f} dB ({p - p0:+.1f} dB); "
                f"Dice {d:.3f} ({d - d0:+.3f}) ({r['inversion'][0]['attacked']})."
            )
    for r in records:
        claimed = r["privacy"]["claimed_epsilon"]
        if claimed is not None and r["privacy"]["epsilon"] is not None:
            out.append(
                f"FedDP claims ε = C/σ = {claimed:g}; the accountant proves "
                f"ε = {r['privacy']['epsilon']:.3g} at δ = {r['privacy']['delta']:g} for these "
                f"{len(r['utility']['dice_per_round'])} rounds."
            )
    return out


def write_report(path: Path, results: Mapping[str, Any]) -> Path:
    """``report.md``: configuration, the table, the findings and the three plots."""
    records = results["settings"]
    cfg = results["config"]
    m = results["machine"]
    lines = [
        "# attack-vs-dp report",
        "",
        f"{m['date']} · {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if m.get('gpu') else ', no GPU'} · "
        f"torch {m['torch']} · preset `{results['preset']}` · {results['data']}",
        "",
        f"`{cfg['model']}`, {cfg['clients']} clients, {cfg['rounds']} rounds, "
        f"{cfg['size']}×{cfg['size']} px, batch {cfg['batch_size']}, clip C = {cfg['clip']:g}, "
        f"δ = {cfg['delta']:g}, seed {cfg['seed']}; noise: "
        f"{'seeded (reproducible, NOT secure)' if cfg['seeded_noise'] else 'ChaCha20 (secure)'}. "
        f"Total {results['seconds']:.0f} s.",
        "",
        "## Findings",
        "",
        *[f"- {s}" for s in _findings(records)],
        "",
        "## Results",
        "",
        "| setting | Dice | Jaccard | Acc | ε (δ) | PSNR b=1 dB | SSIM b=1 | PSNR b=B dB | MIA AUC | "
        "TPR@1% FPR | MIA ε_LB | MB / round | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rec in records:
        r = flat_row(rec)
        b = "—" if r["psnr_batchB_db"] is None else f"{r['psnr_batchB_db']:.1f} (B={r['batch_B']})"
        lines.append(
            f"| {rec['label']} | {r['dice']:.3f} | {r['jaccard']:.3f} | {r['accuracy']:.3f} | "
            f"{eps_text(rec['privacy']['epsilon'])} | {r['psnr_batch1_db']:.1f} | "
            f"{r['ssim_batch1']:.3f} | {b} | {r['mia_auc']:.3f} | {r['mia_tpr_at_1pct_fpr']:.3f} | "
            f"{r['mia_empirical_epsilon']:.2f} | "
            f"{_mb(r['bytes_per_round'])} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "ε: from the defense's accountant over the rounds run (tightest of RDP, PRV, PLD); `none` = no DP "
        "guarantee. PSNR: client 0's one-step update inverted by the server (Inverting Gradients, masks "
        "known), matched to the true images; for secure aggregation and CKKS the attack only has the "
        "aggregate. MIA: confidence-threshold membership inference on the final model (training samples vs "
        "the test split); ε_LB is the empirical lower bound (Clopper–Pearson, 95 %), which must stay below "
        "ε.",
        "",
        "## Threat models",
        "",
        *[f"- **{rec['label']}**: {rec['threat']}" for rec in records],
        "",
        "## Plots",
        "",
        "![frontier](frontier.png)",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "![ROC](roc.png)",
        "",
    ]
    path.write_text("\n".join(lines))
    return path
