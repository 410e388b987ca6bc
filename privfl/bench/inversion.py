"""Inverting Gradients against one client's update: iterations per second and reconstruction PSNR.

``python -m privfl.bench inversion --model unet --widths 48,64 --iterations 300 --defense both``.

The fixed case (:func:`~privfl.experiments.inversion.fixed_case`): one 64×64 SyntheticHistology
patch (``seed``, index 0) and its mask; the model built with ``torch.manual_seed(seed)``, its
BatchNorm running statistics estimated on ``--calibrate`` other synthetic patches (dataset seed
``seed + 1``), as a global model's are after training; one client update (batch 1) computed by
:func:`~privfl.attacks.inversion.observe_update` — the gradient (``--mode gradient``) or the delta after
``--local-steps`` SGD steps (``--mode fedavg``). The attack then reconstructs the image from

* ``none`` — the update as it is, and
* ``dp`` — the update after ``Compose(ClipUpdate(C), GaussianMechanism(noise_multiplier=z,
  sensitivity=C, placement="local"))``. ``C`` defaults to the update's own L2 norm, so clipping
  changes nothing and the noise is the least this mechanism adds to it (the attacker's best case
  at that ``z``). The noise is seeded (reproducible, not secure).

with masks known to the attacker (the worst case). Figures: seconds, iterations per second, the
final objective and the PSNR (and SSIM) of the reconstruction against the true image; a PNG grid
(ground truth | undefended | dp) lands next to the JSON record.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from privfl.attacks.inversion import InvertingGradients, observe_update
from privfl.attacks.metrics import mean_psnr, ssim
from privfl.bench.common import args_record, console_for, default_out, finish, machine
from privfl.experiments.inversion import dp_protect, fixed_case
from privfl.models import list_models
from privfl.updates import global_l2_norm

DEFENSES = ("none", "dp")


def _save_grid(path: Path, truth: torch.Tensor, panels: list[tuple[str, torch.Tensor]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [("ground truth", truth)] + panels
    fig, axes = plt.subplots(1, len(items), figsize=(2.6 * len(items), 2.9))
    for ax, (title, img) in zip(axes, items):
        ax.imshow(img[0].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="unet", choices=list_models(), help="model name (default unet)")
    p.add_argument(
        "--widths", default=None, help="UNet widths, comma-separated (e.g. 48,64); default the model's"
    )
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--defense", default="both", choices=(*DEFENSES, "both"), help="which update(s) to attack")
    p.add_argument("--iterations", type=int, default=300, help="attack iterations per restart (default 300)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts (default 1)")
    p.add_argument("--tv", type=float, default=1.0, help="total-variation weight (default 1.0)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--mode", default="gradient", choices=("gradient", "fedavg"), help="what the update is")
    p.add_argument("--local-steps", type=int, default=1, help="local SGD steps (fedavg mode)")
    p.add_argument("--local-lr", type=float, default=0.01, help="local SGD learning rate (fedavg mode)")
    p.add_argument("--noise-multiplier", type=float, default=0.5, help="z of the dp defense (default 0.5)")
    p.add_argument(
        "--clip", type=float, default=None, help="C of the dp defense; default the update's L2 norm"
    )
    p.add_argument("--calibrate", type=int, default=16, help="patches for the BatchNorm statistics (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the case, the model and the attack")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder; default results/inversion/<timestamp>"
    )


def run(args: argparse.Namespace) -> int:
    console = console_for(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else None
    out_dir = args.out or default_out("inversion")
    defenses = DEFENSES if args.defense == "both" else (args.defense,)

    model, image, mask = fixed_case(
        args.model, size=args.size, seed=args.seed, widths=widths, calibrate=args.calibrate, device=device
    )
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"inversion: {args.model}{'' if widths is None else f' widths={widths}'} ({params:,} parameters) "
        f"on {device}, 1×3×{args.size}×{args.size}, {args.mode} mode, {args.iterations} iterations × "
        f"{args.restarts} restart(s), tv={args.tv:g}, lr={args.lr:g}, {torch.get_num_threads()} threads"
    )
    update = observe_update(
        model, image, mask, mode=args.mode, local_steps=args.local_steps, local_lr=args.local_lr
    )
    attack = InvertingGradients(
        model,
        mode=args.mode,
        local_steps=args.local_steps,
        local_lr=args.local_lr,
        iterations=args.iterations,
        restarts=args.restarts,
        tv=args.tv,
        lr=args.lr,
        progress=not args.no_progress,
        seed=args.seed,
    )
    rows: dict[str, dict[str, Any]] = {}
    panels: list[tuple[str, torch.Tensor]] = []
    for name in defenses:
        observed = (
            update if name == "none" else dp_protect(update, args.noise_multiplier, args.clip, args.seed)
        )
        result = attack.reconstruct(observed, tuple(image.shape), mask)
        p = mean_psnr(result.images, image.cpu())
        rows[name] = {
            "psnr_db": p,
            "ssim": float(ssim(result.images, image.cpu()).mean()),
            "final_loss": result.loss,
            "seconds": result.seconds,
            "iterations": result.iterations,
            "iterations_per_second": result.iterations_per_second,
            "update_l2_norm": global_l2_norm(observed),
        }
        label = "undefended" if name == "none" else f"dp z={args.noise_multiplier:g}"
        panels.append((f"{label}: {p:.1f} dB", result.images))

    table = Table(title=f"Inverting Gradients, {args.model}, batch 1, {args.size}×{args.size}")
    for col in ("update", "PSNR dB", "SSIM", "final loss", "s", "it/s"):
        table.add_column(col, justify="left" if col == "update" else "right")
    for name, r in rows.items():
        table.add_row(
            name,
            f"{r['psnr_db']:.2f}",
            f"{r['ssim']:.3f}",
            f"{r['final_loss']:.4f}",
            f"{r['seconds']:.1f}",
            f"{r['iterations_per_second']:.2f}",
        )
    console.print(table)
    if "none" in rows and "dp" in rows:
        console.print(f"dp lowers the PSNR by {rows['none']['psnr_db'] - rows['dp']['psnr_db']:.2f} dB")
    grid = _save_grid(out_dir / "grid.png", image, panels)
    console.print(f"image grid: {grid}")
    record = {
        "args": args_record(args),
        "machine": machine(),
        "device": str(device),
        "parameters": params,
        "grid": str(grid),
        "result": rows,
    }
    return finish(args, console, out_dir / "inversion.json", record)
