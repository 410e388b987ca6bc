"""``python -m privfl.bench noise-ablation``: the shape of FedDP's Table II, with the proven ε.

FedDP (Eq. 11: clip each client's update to L2 norm C, add N(0, σ²C²) per coordinate: σ is the
noise multiplier, the std is σ·C) trained on one
model (``--model``; cpu-quick: ``dhunet-tiny``) for every C in ``--clips`` (default 0.05, 0.15, 0.25,
0.35) and σ in ``--sigmas`` (default 0.1, 0.3, 0.5), plus a no-defense reference row, all from the
same initial weights on the same data. Columns: C, σ, Dice, Jaccard, Acc (classes 1..3, final round,
pooled test split), the ε the accountant proves at δ = 1e-5 and the paper's ε = C/σ (Eq. 14 — not a
DP guarantee: the accounted ε depends on the noise multiplier σ *and* the number of rounds, not on C).

The noise is **seeded** (``SeededNoise(--seed)``, the same seed for every cell, so cells differ only
by C and σ; reproducible and not cryptographically secure — its warning is silenced for this
benchmark only). Outputs in ``--out``: ``results.json``, ``results.csv`` and ``ablation.png`` (a Dice
heatmap over C × σ with ε in each cell, and Dice against accounted ε per C).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.table import Table

from privfl.bench import paper_tables as pt
from privfl.bench.common import console_for, eps_text, finish, machine, write_csv

NAME = "noise-ablation"
CSV_COLUMNS = ("setting", "clip", "sigma", "noise_multiplier", *pt.ROW_COLUMNS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="model to train (default: the preset's, dhunet-tiny for cpu-quick)"
    )
    p.add_argument(
        "--clips",
        default=",".join(map(str, pt.DEFAULT_CLIPS)),
        help="comma-separated L2 clip norms C (default 0.05,0.15,0.25,0.35)",
    )
    p.add_argument(
        "--sigmas",
        default=",".join(map(str, pt.DEFAULT_SIGMAS)),
        help="comma-separated noise multipliers σ of Eq. 11, std σ·C (default 0.1,0.3,0.5)",
    )
    pt.add_common_arguments(p)


def table(rows: Sequence[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for col in (
        "C",
        "σ",
        "Dice",
        "Jaccard",
        "Acc",
        f"accounted ε (δ={pt.DELTA:g})",
        "paper ε = C/σ",
        "train s",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        c, s = ("—", "—") if r["clip"] is None else (f"{r['clip']:g}", f"{r['sigma']:g}")
        t.add_row(c, s, *pt.row_cells(r))
    return t


def plot(
    path: Path, rows: Sequence[dict[str, Any]], clips: Sequence[float], sigmas: Sequence[float], title: str
) -> Path:
    """Left: Dice heatmap over C (rows) × σ (columns), each cell labelled with Dice, accounted ε and C/σ.
    Right: Dice against accounted ε (log scale), one line per C, one marker per σ, points labelled
    with ε; the dashed line is the no-defense reference."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(11, 4.4))
    FigureCanvasAgg(fig)
    cells = {(r["clip"], r["sigma"]): r for r in rows if r["clip"] is not None}
    reference = next((r for r in rows if r["clip"] is None), None)
    grid = np.array([[cells[(c, s)]["dice"] for s in sigmas] for c in clips])

    ax = fig.add_subplot(1, 2, 1)
    im = ax.imshow(
        grid,
        cmap="viridis",
        aspect="auto",
        vmin=0.0,
        vmax=max(1e-6, float(grid.max()), reference["dice"] if reference else 0.0),
    )
    for i, c in enumerate(clips):
        for j, s in enumerate(sigmas):
            r = cells[(c, s)]
            ax.text(
                j,
                i,
                f"{r['dice']:.3f}\nε={eps_text(r['epsilon'])}\nC/σ={r['paper_epsilon']:.3g}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if r["dice"] < 0.6 * grid.max() else "black",
            )
    ax.set_xticks(range(len(sigmas)), [f"{s:g}" for s in sigmas])
    ax.set_yticks(range(len(clips)), [f"{c:g}" for c in clips])
    ax.set_xlabel("σ (noise multiplier; std σ·C)")
    ax.set_ylabel("C (L2 clip norm)")
    ax.set_title("test Dice; accounted ε at δ = 1e-5", fontsize=9)
    fig.colorbar(im, ax=ax, label="Dice")

    ax = fig.add_subplot(1, 2, 2)
    markers = dict(zip(sigmas, "os^vDP*Xhp" * (1 + len(sigmas) // 10), strict=False))
    for ci, c in enumerate(clips):
        pts = sorted((cells[(c, s)]["epsilon"], cells[(c, s)]["dice"], s) for s in sigmas)
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, label=f"C = {c:g}")
        for eps, dice, s in pts:
            ax.scatter([eps], [dice], marker=markers[s], color=line.get_color(), s=28, zorder=3)
            ax.annotate(
                f"ε={eps:.3g}",
                (eps, dice),
                textcoords="offset points",
                xytext=(4, 4 + 6 * (ci % 2)),
                fontsize=6,
                color=line.get_color(),
            )
    for s in sigmas:  # legend entries for the σ markers
        ax.scatter([], [], marker=markers[s], color="black", s=28, label=f"σ = {s:g}")
    if reference is not None:
        ax.axhline(
            reference["dice"], ls="--", color="grey", lw=1, label=f"no defense ({reference['dice']:.3f})"
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.2, y=0.1)
    ax.set_xlabel("accounted ε at δ = 1e-5 (log) — lower is more private")
    ax.set_ylabel("test Dice (classes 1..3)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run(args: argparse.Namespace) -> int:
    console = console_for(args)

    def check():  # every check before any training
        preset = pt.resolve_preset(args)
        model = pt.check_models([args.model])[0] if args.model is not None else preset.model
        preset = replace(preset, model=model, models=(model,))
        clips = pt.parse_positive_floats(args.clips, "--clips")
        sigmas = pt.parse_positive_floats(args.sigmas, "--sigmas")
        federation = pt.load(args, preset)
        return preset, clips, sigmas, federation, pt.base_models([model], preset, args.seed)[model]

    preset, clips, sigmas, federation, base = pt.validated(NAME, check)
    out, progress = pt.start(args, NAME)
    console.print(
        f"{NAME} ({args.preset}): {preset.model}; C in {list(clips)} × σ in {list(sigmas)}; "
        f"{federation.describe()}; {preset.rounds} rounds → {out}"
    )
    t0 = time.perf_counter()
    grid: list[tuple[float | None, float | None]] = [(None, None)] + [(c, s) for c in clips for s in sigmas]
    rows: list[dict[str, Any]] = []
    for clip, sigma in grid:
        defense = None if clip is None or sigma is None else pt.feddp(sigma, clip, args.seed)
        row = {
            "setting": "no defense" if clip is None else f"FedDP C={clip:g} σ={sigma:g}",
            "clip": clip,
            "sigma": sigma,
            "noise_multiplier": None if defense is None else defense.noise_multiplier,
            **pt.run_row(federation, base, defense, preset, seed=args.seed, progress=progress),
        }
        rows.append(row)
        console.print(f"  {row['setting']:<22} {pt.row_line(row)}")
    results = {
        "subcommand": NAME,
        "preset": args.preset,
        "config": pt.config_record(preset, args),
        "clips": list(clips),
        "sigmas": list(sigmas),
        "data": federation.describe(),
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    title = (
        f"{NAME} ({args.preset}): {preset.model}, {preset.rounds} rounds, {preset.clients} clients, "
        f"{preset.size}px"
    )
    write_csv(out / "results.csv", rows, CSV_COLUMNS)
    plot(out / "ablation.png", rows, clips, sigmas, title)
    console.print(table(rows, title + " — test metrics on classes 1..3"))
    return finish(args, console, out / "results.json", results)
