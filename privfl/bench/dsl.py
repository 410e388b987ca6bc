"""``python -m privfl.bench dsl``: Distributed Synthetic Learning (Chang et al. 2023) against its
baselines, with what its channels leak.

Runs :func:`privfl.experiments.dsl.run_dsl_experiment` on the embedded multi-stain synthetic
data and writes, in ``--out``: ``results.json``, ``results.csv`` (one row per method),
``attacks.csv`` (gradient reconstruction PSNR, passive and active, without the defense and at each
noise multiplier),
``dsl.png`` (downstream Dice, Dist-FID, membership-inference AUC, reconstruction PSNR) and
``report.md``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
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
from privfl.experiments.dsl import METHODS, PRESETS, run_dsl_experiment
from privfl.models import list_models

COLUMNS = (
    "method",
    "noise_multiplier",
    "dice",
    "dice_std",
    "dist_fid_he",
    "fid_he",
    "dist_fid_ihc",
    "fid_ihc",
    "mia_loss_auc",
    "mia_dcr_auc",
    "bytes_from_sites",
    "seconds",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu-quick",
        help="sizes (default cpu-quick: 3 sites, 32 px, about 11 minutes on 2 cores; gpu: 128 px, "
        "the paper's networks)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"subset of {', '.join(repr(m) for m in METHODS)} (default all)",
    )
    p.add_argument(
        "--seg-model",
        default=None,
        help="downstream segmenter (privfl.models name; default the preset's: unet-tiny for cpu-quick, "
        "dhunet-tiny for gpu)",
    )
    add_timm_arguments(p, "FID features")
    add_run_arguments(p, "dsl", "defense")


def _get(row: dict[str, Any], *keys: str) -> Any:
    value: Any = row
    for k in keys:
        if not isinstance(value, dict) or k not in value:
            return None
        value = value[k]
    return value


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    traffic = row.get("traffic_bytes") or {}
    sent = sum(
        v for k, v in traffic.items() if k in ("masks_to_server", "gradients_to_server", "models_to_server")
    )
    return {
        "method": row["method"],
        "noise_multiplier": row.get("noise_multiplier"),
        "dice": row["dice"],
        "dice_std": row.get("dice_std"),
        "dist_fid_he": _get(row, "fidelity", "he", "dist_fid"),
        "fid_he": _get(row, "fidelity", "he", "fid"),
        "dist_fid_ihc": _get(row, "fidelity", "ihc", "dist_fid"),
        "fid_ihc": _get(row, "fidelity", "ihc", "fid"),
        "mia_loss_auc": _get(row, "mia", "loss", "auc"),
        "mia_dcr_auc": _get(row, "mia", "dcr", "auc"),
        "bytes_from_sites": sent or None,
        "seconds": row["seconds"],
    }


ATTACK_COLUMNS = ("attack", "noise_multiplier", "clip", "psnr_db", "images", "server_synthetic_psnr_db")


def _label(row: dict[str, Any]) -> str:
    sigma = row.get("noise_multiplier")
    return row["method"] if sigma is None else f"{row['method']} σ={sigma:g}"


def _attack_rows(attacks: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "attack": a["attack"],
            "noise_multiplier": a["noise_multiplier"],
            "clip": a["clip"],
            "psnr_db": a["psnr"],
            "images": a["images"],
            "server_synthetic_psnr_db": a.get("psnr_server_synthetic"),
        }
        for a in attacks.get("reconstruction", [])
    ]


def _plot(record: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [_flat(r) for r in record["methods"]]
    names = [_label(r) for r in rows]
    ys = list(range(len(rows)))[::-1]  # first method on top
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax = axes[0, 0]
    ax.barh(
        ys, [r["dice"] for r in rows], xerr=[r["dice_std"] or 0 for r in rows], color="tab:blue", capsize=3
    )
    ax.set_yticks(ys, names)
    ax.set_xlim(0, 1)
    ax.set_title("downstream Dice on real held-out H&E (mean ± std over seeds)")
    ax = axes[0, 1]
    fid = [(y, r) for y, r in zip(ys, rows) if r["dist_fid_he"] is not None]
    ax.barh([y for y, _ in fid], [r["dist_fid_he"] for _, r in fid], color="tab:green")
    ax.set_yticks(ys, names)
    ax.set_title("Dist-FID, H&E (lower is better)")
    ax = axes[1, 0]
    ax.barh([y + 0.2 for y in ys], [r["mia_loss_auc"] or 0 for r in rows], 0.4, label="LOSS on the segmenter")
    ax.barh(
        [y - 0.2 for y in ys], [r["mia_dcr_auc"] or 0 for r in rows], 0.4, label="closest synthetic image"
    )
    lira = record["attacks"].get("lira_dsl")
    if lira:
        y = ys[names.index("DSL")] if "DSL" in names else ys[0]
        ax.plot([lira["auc"]], [y], "k*", ms=12, label=lira["attack"])
    ax.set_yticks(ys, names)
    ax.axvline(0.5, color="grey", lw=1, ls="--")
    ax.set_xlim(0, 1)
    ax.set_title("membership inference AUC (0.5 = chance)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3)
    ax = axes[1, 1]
    attack_rows = _attack_rows(record["attacks"])
    levels = sorted({a["noise_multiplier"] for a in attack_rows}, key=lambda s: -1.0 if s is None else s)
    xs = range(len(levels))
    for mode, style in (("passive", "o-"), ("active", "s-")):
        by = {a["noise_multiplier"]: a for a in attack_rows if a["attack"] == mode}
        ax.plot(
            xs, [by[s]["psnr_db"] if s in by else float("nan") for s in levels], style, label=f"{mode} server"
        )
    prior = {
        a["noise_multiplier"]: a["server_synthetic_psnr_db"] for a in attack_rows if a["attack"] == "passive"
    }
    ax.plot(
        xs, [prior.get(s) or float("nan") for s in levels], "k--", lw=1, label="server's own synthetic images"
    )
    ax.set_xticks(list(xs), ["none" if s is None else f"σ={s:g}" for s in levels])
    ax.set_xlabel("noise on the returned gradients")
    ax.set_ylabel("PSNR of the rebuilt real image (dB)")
    ax.set_title("what the returned gradients leak, and what hiding it costs")
    dice = {
        r["noise_multiplier"]: r["dice"] for r in rows if r["method"] in ("DSL", "DSL + clip/noise")
    }  # means
    twin = ax.twinx()
    twin.plot(
        xs, [dice.get(s, float("nan")) for s in levels], "^:", color="tab:green", label="downstream Dice"
    )
    twin.set_ylim(0, 1)
    twin.set_ylabel("downstream Dice")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _report(record: dict[str, Any], path: Path) -> Path:
    p, d = record["preset"], record["data"]
    lacking = ", ".join(f"site {s} lacks {m}" for s, m in p["missing"]) or "none"
    lines = [
        f"# Distributed Synthetic Learning — preset `{p['name']}`",
        "",
        f"{d['sites']} sites (one stain profile each), {d['train_per_site']} training and "
        f"{d['test_per_site']} held-out images per site, {d['size']}×{d['size']} px, modalities "
        f"{', '.join(d['modalities'])} (Hetero-MM-DSL: {lacking}). Generators: {p['epochs']} epochs "
        f"(pix2pix ResNet generator, ngf {p['ngf']}, {p['n_blocks']} blocks; PatchGAN ndf {p['ndf']}; "
        f"λ₁ = {p['lambda_l1']}). Downstream: `{p['seg_model']}`, {p['seg_epochs']} epochs, "
        f"{p['seg_seeds']} seeds per method. Machine: {record['machine'].get('cpu')}, "
        f"{record['machine'].get('cores')} cores, {record['machine'].get('gpu', 'no GPU')}; "
        f"{record['seconds']:.0f} s in all.",
        "",
        "| method | Dice (real test, mean ± std) | Dist-FID H&E | FID H&E | Dist-FID IHC | MIA LOSS AUC | "
        "MIA closest-image AUC | bytes sent by sites | s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in record["methods"]:
        f = _flat(r)
        lines.append(
            f"| {_label(f)} | {f['dice']:.3f} ± {f['dice_std'] or 0:.3f} | {_fmt(f['dist_fid_he'])} | "
            f"{_fmt(f['fid_he'])} | "
            f"{_fmt(f['dist_fid_ihc'])} | {_fmt(f['mia_loss_auc'])} | {_fmt(f['mia_dcr_auc'])} | "
            f"{_fmt(f['bytes_from_sites'], ',')} | {f['seconds']:.0f} |"
        )
    lines += [
        "",
        "Reconstruction of site 0's real images from the gradients it returns:",
        "",
        "| attack | noise multiplier σ (clip C) | PSNR (dB) | images | server's own synthetic images (dB) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for a in _attack_rows(record["attacks"]):
        setting = "none" if a["noise_multiplier"] is None else f"{a['noise_multiplier']:g} ({a['clip']:g})"
        lines.append(
            f"| {a['attack']} | {setting} | {a['psnr_db']:.1f} | {a['images']} | "
            f"{_fmt(a['server_synthetic_psnr_db'], '.1f')} |"
        )
    lira = record["attacks"].get("lira_dsl")
    if lira:
        lines += [
            "",
            f"{lira['attack']} against the DSL downstream segmenter: AUC {lira['auc']:.3f}, TPR at 1% FPR "
            f"{lira['tpr_at_1%_fpr']:.3f}.",
        ]
    lines += [
        "",
        "![DSL](dsl.png)",
        "",
        "Dice is the mean foreground Dice of the downstream segmenter on the real held-out H&E images of all "
        "sites, averaged over downstream models trained with different seeds (the same seeds for every "
        "method; the first one is attacked). Dist-FID weighs each site's FID (its real feature statistics, "
        "sent once) by its size; "
        "features come from privfl's random-weight encoder, so values compare within this benchmark only. "
        "Membership: members are the real training images whose masks generated the synthetic data, "
        "non-members the held-out images; 0.5 is chance. Passive: the honest-but-curious server votes on "
        "the sign of the returned gradients over the epochs; active: a malicious server sends bisection "
        "probes instead of synthetic images; the server's own synthetic images are the mean of its last "
        "synthetic images of each mask, what it has without the gradients. The defense clips each image's "
        "returned gradient to L2 norm C and adds Gaussian noise of std σ·C; no ε is claimed for it (the "
        "local discriminator, trained on all real images without DP, shapes every gradient).",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def run(args: argparse.Namespace) -> int:
    console, ok, extractor = start_embedding_run(args)
    if not ok:
        return 2
    preset = PRESETS[args.preset]
    if args.seg_model:
        if args.seg_model not in list_models():
            console.print(
                f"[red]unknown --seg-model {args.seg_model!r}; choose from {', '.join(list_models())}"
            )
            return 2
        preset = replace(preset, seg_model=args.seg_model)
    out = args.out or default_out("dsl")
    out.mkdir(parents=True, exist_ok=True)
    result = run_dsl_experiment(
        preset,
        methods=args.methods,
        extractor=extractor,
        noise=noise_source(args, preset.seed),
        progress=not args.no_progress,
        log=lambda m: console.print(f"[bold]{m}"),
    )
    record = {
        "subcommand": "dsl",
        "machine": machine(),
        **result,
        "fid_extractor": args.timm_model or "dhunet-tiny encoder (random features)",
        "noise": noise_label(args),
    }
    table = Table(title=f"dsl ({preset.name}), {result['seconds']:.0f} s")
    for col in ("method", "Dice", "Dist-FID H&E", "Dist-FID IHC", "MIA LOSS", "MIA closest"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = [_flat(r) for r in result["methods"]]
    for f in rows:
        table.add_row(
            _label(f),
            f"{f['dice']:.3f}±{f['dice_std'] or 0:.3f}",
            _fmt(f["dist_fid_he"]),
            _fmt(f["dist_fid_ihc"]),
            _fmt(f["mia_loss_auc"]),
            _fmt(f["mia_dcr_auc"]),
        )
    attack_rows = _attack_rows(result["attacks"])
    lines = []
    for a in attack_rows:
        setting = "no defense" if a["noise_multiplier"] is None else f"σ = {a['noise_multiplier']:g}"
        lines.append(
            f"gradient reconstruction, {a['attack']} server, {setting}: {a['psnr_db']:.1f} dB "
            f"(its own synthetic images: {_fmt(a['server_synthetic_psnr_db'], '.1f')} dB)"
        )
    return write_outputs(
        args,
        console,
        out,
        record,
        show=[table, *lines],
        tables={"results.csv": (rows, COLUMNS), "attacks.csv": (attack_rows, ATTACK_COLUMNS)},
        figures={"dsl.png": lambda path: _plot(record, path)},
        report=lambda path: _report(record, path),
    )
