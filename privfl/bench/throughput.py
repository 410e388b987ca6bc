"""Training throughput of a model: images/s for forward + loss + backward + SGD step on random data.

``python -m privfl.bench train-throughput --model dhunet --img-size 224``. Runs through Lightning
Fabric (:func:`privfl.fl.device.make_fabric`): channels_last and bf16 autocast on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from rich.table import Table
from torch import nn

from privfl.bench.common import console_for, finish_measurement, json_out, machine
from privfl.fl.device import make_fabric, prepare_model
from privfl.models import build_model
from privfl.models.losses import CEDiceLoss, DHUNetLoss

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def loss_for(out: Any) -> tuple[LossFn, str]:
    """The training loss for a model output: DHUNetLoss for a deep-supervised tuple, else CEDiceLoss."""
    if isinstance(out, (tuple, list)):
        return DHUNetLoss(), "DHUNetLoss"
    return CEDiceLoss(), "CEDiceLoss"


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {machine()['cpu']}"


def measure_train_throughput(
    model: nn.Module,
    img_size: int,
    batch_size: int,
    steps: int,
    warmup: int,
    fabric: Fabric,
    num_classes: int = 4,
) -> dict[str, Any]:
    """Time ``warmup + steps`` SGD training steps on a random batch; statistics over the last ``steps``.

    One step = zero_grad, forward under ``fabric.autocast()``, loss, backward, SGD step (momentum 0.9,
    weight decay 1e-4, as the DHUnet recipe). The same random batch (images in [0, 1], labels in
    ``[0, num_classes)``) is reused, so data loading is excluded. On CUDA each step is bracketed by
    ``torch.cuda.synchronize``. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (reset before
    the warm-up); on CPU the process's peak RSS (``ru_maxrss``), which also counts whatever the process
    held before this call.
    """
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(
            f"need steps >= 1, warmup >= 0, batch_size >= 1; got {steps}, {warmup}, {batch_size}"
        )
    device = fabric.device
    on_cuda = device.type == "cuda"
    model = prepare_model(model, fabric)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, img_size, img_size, generator=gen).to(device)
    masks = torch.randint(0, num_classes, (batch_size, img_size, img_size), generator=gen).to(device)
    if on_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    loss_fn: LossFn | None = None
    loss_name = ""
    times: list[float] = []
    loss_value = float("nan")
    for i in range(warmup + steps):
        if on_cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with fabric.autocast():
            out = model(images)
        if loss_fn is None:
            loss_fn, loss_name = loss_for(out)
        loss = loss_fn(out, masks)
        loss.backward()
        opt.step()
        if on_cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
        loss_value = float(loss.detach())
    if not torch.isfinite(torch.tensor(loss_value)):
        raise FloatingPointError(f"non-finite training loss {loss_value}")

    median = statistics.median(times)
    if on_cuda:
        peak_mib, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    else:
        peak_mib, peak_kind = _peak_rss_mib(), "process peak RSS (ru_maxrss)"
    return {
        "img_size": img_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "num_classes": num_classes,
        "device": str(device),
        "device_name": _device_name(device),
        "precision": str(fabric.strategy.precision.precision),
        "params": sum(p.numel() for p in model.parameters()),
        "loss": loss_name,
        "final_loss": loss_value,
        "images_per_s": batch_size / median,
        "s_per_step": median,
        "s_per_step_mean": statistics.fmean(times),
        "s_per_step_min": min(times),
        "s_per_step_max": max(times),
        "step_times": times,
        "peak_memory_mib": peak_mib,
        "peak_memory_kind": peak_kind,
    }


def _build(name: str, num_classes: int, img_size: int) -> nn.Module:
    """Build a registered model, passing ``img_size`` to the factories that take one (DHU-Net)."""
    try:
        return build_model(name, num_classes=num_classes, img_size=img_size)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return build_model(name, num_classes=num_classes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dhunet")
    p.add_argument("--img-size", type=int, default=224, help="square input side in pixels")
    p.add_argument("--batch-size", type=int, default=None, help="default: 24 on CUDA, 2 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--device", default="auto", help="Lightning Fabric accelerator: auto, cpu, cuda")
    p.add_argument(
        "--precision", default=None, help="Fabric precision; default bf16-mixed on CUDA, 32-true on CPU"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file; default results/train-throughput/<timestamp>.json"
    )


def run(args: argparse.Namespace) -> int:
    console = console_for(args)
    out = json_out(args, "train-throughput")
    torch.manual_seed(args.seed)
    fabric = make_fabric(args.device, args.precision)
    batch_size = args.batch_size or (24 if fabric.device.type == "cuda" else 2)
    model = _build(args.model, args.num_classes, args.img_size)
    console.print(
        f"train-throughput: {args.model} {args.img_size}px, batch {batch_size}, "
        f"{args.warmup} warm-up + {args.steps} timed steps on {fabric.device} → {out}"
    )
    result = measure_train_throughput(
        model, args.img_size, batch_size, args.steps, args.warmup, fabric, num_classes=args.num_classes
    )
    result = {"model": args.model, **result}

    table = Table(title=f"Training throughput: {args.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    peak = "CUDA max allocated" if fabric.device.type == "cuda" else "peak RSS"
    rows = [
        ("device", result["device_name"]),
        ("precision", result["precision"]),
        ("input", f"{batch_size} × 3 × {args.img_size} × {args.img_size}"),
        ("parameters", f"{result['params']:,}"),
        ("loss", result["loss"]),
        ("images/s", f"{result['images_per_s']:.2f}"),
        (f"s/step (median of {args.steps})", f"{result['s_per_step']:.3f}"),
        ("s/step min / max", f"{result['s_per_step_min']:.3f} / {result['s_per_step_max']:.3f}"),
        (f"{peak} (MiB)", f"{result['peak_memory_mib']:.0f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    return finish_measurement(args, console, out, result)
