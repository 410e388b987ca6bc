"""Secure vs seeded DP noise throughput: ChaCha20 SecureNoise and SeededNoise against torch.randn.

``python -m privfl.bench noise --params 55400000``. Times, in one run on the same machine,
``torch.randn(params)`` (the floor: what a DP implementation without a secure source costs),
:class:`~privfl.defenses.rng.SeededNoise` and :class:`~privfl.defenses.rng.SecureNoise` Gaussian and
Laplace noise of ``params`` float32 values. The sources are timed round-robin (one call of each per
repeat, after one untimed warm-up round) so a shared machine's load drifts over all of them alike;
the figures are medians. The target (benchmarks/RESULTS.md, "DP noise source") is SecureNoise
Gaussian within 2× of ``torch.randn``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from privfl.bench.common import (
    console_for,
    finish_measurement,
    json_out,
    load_text,
)
from privfl.defenses.rng import SecureNoise, SeededNoise

TARGET_RATIO = 2.0  # SecureNoise Gaussian time / torch.randn time, benchmarks/RESULTS.md "DP noise source"
DHUNET_PARAMS = 55_400_000


def _cases(n: int, seed: int) -> list[tuple[str, str, str, Callable[[], torch.Tensor]]]:
    """(label, source name, distribution, call) for every timed case, ``n`` float32 values each."""
    seeded, secure = SeededNoise(seed), SecureNoise()
    key = ("bench", "noise")
    return [
        ("torch.randn", "torch.randn (global generator)", "gaussian", lambda: torch.randn(n)),
        ("SeededNoise gaussian", seeded.name, "gaussian", lambda: seeded.gaussian(n, 1.0, key=key)),
        ("SecureNoise gaussian", secure.name, "gaussian", lambda: secure.gaussian(n, 1.0)),
        ("SeededNoise laplace", seeded.name, "laplace", lambda: seeded.laplace(n, 1.0, key=key)),
        ("SecureNoise laplace", secure.name, "laplace", lambda: secure.laplace(n, 1.0)),
    ]


def measure_noise(n: int = DHUNET_PARAMS, repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Time each noise source for ``n`` float32 values, ``warmup`` untimed + ``repeats`` timed rounds.

    Times are wall-clock seconds per call (allocation of the result included); ``ratio_vs_randn``
    divides a case's median by the median of ``torch.randn(n)`` from the same run. ``load_avg_1min``
    (before, after) tells whether other processes competed for the cores: ``torch.randn`` is
    single-threaded, SecureNoise uses ``torch.get_num_threads()`` worker threads, so a busy core
    slows SecureNoise and not the floor.
    """
    if n < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need n >= 1, repeats >= 1, warmup >= 0; got {n}, {repeats}, {warmup}")
    cases = _cases(n, seed)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {label: [] for label, *_ in cases}
    for i in range(warmup + repeats):
        for label, _source, _dist, call in cases:
            t0 = time.perf_counter()
            out = call()
            elapsed = time.perf_counter() - t0
            if out.numel() != n or out.dtype != torch.float32:
                raise AssertionError(f"{label} returned {out.numel()} values of {out.dtype}")
            del out
            if i >= warmup:
                times[label].append(elapsed)
    floor = statistics.median(times["torch.randn"])
    rows: list[dict[str, Any]] = []
    for label, source, dist, _call in cases:
        ts = times[label]
        median = statistics.median(ts)
        rows.append(
            {
                "case": label,
                "source": source,
                "distribution": dist,
                "median_s": median,
                "min_s": min(ts),
                "max_s": max(ts),
                "times_s": ts,
                "mvalues_per_s": n / median / 1e6,
                "ratio_vs_randn": median / floor,
            }
        )
    ratio = next(r["ratio_vs_randn"] for r in rows if r["case"] == "SecureNoise gaussian")
    return {
        "params": n,
        "dtype": "float32",
        "repeats": repeats,
        "warmup": warmup,
        "rows": rows,
        "secure_gaussian_ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "within_target": ratio <= TARGET_RATIO,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params",
        type=int,
        default=DHUNET_PARAMS,
        help=f"values per call (default {DHUNET_PARAMS:,}, DHU-Net's parameter count)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--seed", type=int, default=0, help="seed of SeededNoise")
    p.add_argument("--out", type=Path, default=None, help="JSON file; default results/noise/<timestamp>.json")


def run(args: argparse.Namespace) -> int:
    console = console_for(args)
    out = json_out(args, "noise")
    console.print(
        f"noise: {args.params:,} float32 values, {args.warmup} warm-up + {args.repeats} timed "
        f"rounds, {torch.get_num_threads()} torch threads → {out}"
    )
    result = measure_noise(args.params, args.repeats, args.warmup, args.seed)

    table = Table(title=f"DP noise, {args.params:,} float32 values (median of {args.repeats})")
    for col, justify in (
        ("case", "left"),
        ("median s", "right"),
        ("min–max s", "right"),
        ("M values/s", "right"),
        ("× randn", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in result["rows"]:
        table.add_row(
            r["case"],
            f"{r['median_s']:.3f}",
            f"{r['min_s']:.3f}–{r['max_s']:.3f}",
            f"{r['mvalues_per_s']:.0f}",
            f"{r['ratio_vs_randn']:.2f}",
        )
    console.print(table)
    load = result["load_avg_1min"]
    console.print(f"{load_text(load)} on {os.cpu_count()} cores (other processes slow the threaded cases)")
    verdict = "within" if result["within_target"] else "OVER"
    console.print(
        f"SecureNoise gaussian / torch.randn = {result['secure_gaussian_ratio']:.2f} "
        f"({verdict} the {TARGET_RATIO:g}× target)"
    )

    return finish_measurement(args, console, out, result)
