"""CKKS aggregation: client time, server time, bytes and error of the presets vs the per-layer recipe.

``python -m privfl.bench he --params 1000000 --clients 5 [--dropouts 1] [--json]``.

In one run on one machine, for K clients each holding an update of ``--params`` float32 values:

* ``precise`` and ``compact`` (:mod:`privfl.defenses.ckks`): the whole update packed densely, 2048
  values per ciphertext, symmetric encryption, weights applied by the clients, the server only adds.
  Streamed chunk by chunk (262,144 values) through ``CKKSClient.encrypt_frames`` (client protect:
  scaling, encryption, serialization — exactly the payload bytes ``CKKSAggregation.protect`` sends),
  ``CKKSServer.sum_chunks`` (server: deserialize, add, serialize) and ``CKKSClient.decrypt_chunk``
  (key holder: deserialize, decrypt, decode), so memory stays bounded at 55.4 M parameters.
* the anchor (docs/ckks.md, "Benchmark"): the per-layer TenSEAL recipe most FL stacks use —
  context N = 8192, coeff_mod_bit_sizes [60, 40, 40, 60], global scale 2**40, public-key
  encryption (TenSEAL's default), one ``ts.ckks_vector`` per layer (TenSEAL splits a layer longer
  than 4096 values into several ciphertexts), the server multiplies each vector by the client's
  weight (plain scalar, then rescale) and adds. Above ``--anchor-params`` values it is measured on
  an evenly strided subset of the layers and extrapolated per ciphertext (its times and bytes are
  proportional to the number of ciphertexts, which is known exactly for every layer).

Layer layout: the floating entries of DHU-Net's ``state_dict`` (``build_model("dhunet",
num_classes=4)``, 305 entries, 55,414,330 values), in order, truncated to ``--params`` (repeated
if larger). Client updates: per layer a common scale drawn log-uniformly in [1e-4, 1e-2], Gaussian
values, each client's update then clipped to L2 norm ``--clip`` (as ``ClipUpdate`` would), and
``--bound`` (default: the clip norm, as ``CKKSAggregation`` infers it inside a ``Compose``) is the
public bound. Weights: proportional to random dataset sizes; ``--dropouts`` clients (the last ones)
send nothing, the mean is renormalised over the others.

Targets (docs/ckks.md, "Benchmark"): ``precise`` client protect ≥ 3× faster and ≥ 1.4× fewer bytes
than the anchor, error ≤ 1e-7 × max |value|; ``compact`` ≤ 35 bytes per parameter at error ≤ 1e-4 ×
max |value|.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import torch
from rich.table import Table

from privfl.bench.common import (
    console_for,
    finish_measurement,
    json_out,
    load_text,
)
from privfl.defenses.ckks import PRESETS, CKKSClient, CKKSKeys, CKKSServer, aggregate_head
from privfl.updates import SpecEntry, UpdateSpec

DEFAULT_PARAMS = 1_000_000
TARGET_SPEEDUP = 3.0  # precise client protect vs anchor
TARGET_BYTES_RATIO = 1.4  # anchor bytes / precise bytes
TARGET_COMPACT_BYTES = 35.0  # bytes per parameter
ANCHOR: dict[str, Any] = {
    "poly_modulus_degree": 8192,
    "coeff_mod_bit_sizes": [60, 40, 40, 60],
    "global_scale_bits": 40,
    "encryption": "public key (TenSEAL default)",
    "packing": "one ts.ckks_vector per layer",
}


# --------------------------------------------------------------------------------------------
# workload
# --------------------------------------------------------------------------------------------


def dhunet_layers() -> list[tuple[str, int]]:
    """(name, numel) of DHU-Net's floating state_dict entries, in order (built on the meta device)."""
    from privfl.models import build_model

    with torch.device("meta"):
        model = build_model("dhunet", num_classes=4)
    return [(k, v.numel()) for k, v in model.state_dict().items() if v.dtype.is_floating_point]


def layer_layout(params: int, base: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``base`` truncated to ``params`` values (repeated with a ``#k`` suffix when larger)."""
    out: list[tuple[str, int]] = []
    left, rep = params, 0
    while left > 0:
        for name, n in base:
            take = min(n, left)
            out.append((name if rep == 0 else f"{name}#{rep}", take))
            left -= take
            if left == 0:
                break
        rep += 1
    return out


def make_updates(layers: list[tuple[str, int]], clients: int, clip: float, seed: int) -> list[torch.Tensor]:
    """One float32 vector per client: per-layer Gaussian values, then clipped to L2 norm ``clip``."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(
        torch.empty(len(layers), dtype=torch.float64).uniform_(math.log(1e-4), math.log(1e-2), generator=g)
    )
    n = sum(k for _, k in layers)
    out = []
    for _ in range(clients):
        vec = torch.randn(n, generator=g, dtype=torch.float32)
        off = 0
        for (_, k), s in zip(layers, scales.tolist()):
            vec[off : off + k] *= s
            off += k
        norm = float(torch.linalg.vector_norm(vec, dtype=torch.float64))
        if norm > clip:
            vec *= clip / norm
        out.append(vec)
    return out


def make_weights(clients: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed + 1)
    sizes = rng.integers(50, 500, clients).astype(float)
    return (sizes / sizes.sum()).tolist()


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------


def measure_preset(
    name: str,
    vecs: list[torch.Tensor],
    spec: UpdateSpec,
    weights: list[float],
    senders: list[int],
    bound: float,
    threads: int | None,
) -> dict[str, Any]:
    """Stream one preset chunk by chunk: all senders encrypt chunk c, the server adds, the key holder
    decrypts."""
    preset = PRESETS[name]
    t0 = time.perf_counter()
    keys = CKKSKeys.generate(name, threads)
    keygen_s = time.perf_counter() - t0
    client = CKKSClient(keys.client_context, threads)
    server = CKKSServer(keys.server_context, threads)
    n = spec.numel
    protect_s = {i: 0.0 for i in senders}
    sent = {i: 0 for i in senders}
    gens = {}
    for i in senders:
        t0 = time.perf_counter()
        gens[i] = client.encrypt_frames(vecs[i], spec, weight=weights[i], bound=bound)
        head = next(gens[i])
        protect_s[i] += time.perf_counter() - t0
        sent[i] += len(head)
    w_sum = math.fsum(weights[i] for i in senders)
    agg_s = dec_s = 0.0
    agg_bytes = len(aggregate_head(json.loads(bytes(memoryview(head)[16:])), w_sum, senders))
    max_err = max_val = 0.0
    for start in range(0, n, preset.chunk_values):
        count = min(preset.chunk_values, n - start)
        blobs = []
        for i in senders:
            t0 = time.perf_counter()
            framed = next(gens[i])
            protect_s[i] += time.perf_counter() - t0
            sent[i] += len(framed)
            blobs.append(memoryview(framed)[8:])
        t0 = time.perf_counter()
        summed = server.sum_chunks(blobs)
        agg_s += time.perf_counter() - t0
        agg_bytes += len(summed) + 8
        t0 = time.perf_counter()
        mean = client.decrypt_chunk(summed, count) * (bound / w_sum)
        dec_s += time.perf_counter() - t0
        ref = np.zeros(count)
        for i in senders:
            piece = vecs[i][start : start + count].numpy().astype(np.float64)
            ref += weights[i] * piece
            max_val = max(max_val, float(np.abs(piece).max()))
        ref /= w_sum
        max_err = max(max_err, float(np.abs(mean - ref).max()))
    for i in senders:  # the generators are exhausted: the payload is complete
        assert next(gens[i], None) is None
    mean_protect = sum(protect_s.values()) / len(senders)
    mean_bytes = sum(sent.values()) / len(senders)
    rel = max_err / max_val if max_val > 0 else 0.0
    return {
        "recipe": name,
        "measured_params": n,
        "extrapolated": False,
        "poly_modulus_degree": preset.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(preset.coeff_mod_bit_sizes),
        "scale_bits": preset.scale_bits,
        "headroom_bits": preset.headroom_bits,
        "ciphertexts_per_client": preset.ciphertexts(n),
        "keygen_s": keygen_s,
        "protect_s_per_client": mean_protect,
        "protect_s_by_client": protect_s,
        "aggregate_s": agg_s,
        "decrypt_s": dec_s,
        "bytes_per_client": mean_bytes,
        "bytes_per_param": mean_bytes / n,
        "aggregate_bytes": agg_bytes,
        "max_abs_error": max_err,
        "max_abs_value": max_val,
        "relative_error": rel,
        "error_bound": preset.max_abs_error(bound, len(senders), w_sum),
        "error_target": preset.error_target,
        "error_ok": rel <= preset.error_target
        and max_err <= preset.max_abs_error(bound, len(senders), w_sum),
    }


# --------------------------------------------------------------------------------------------
# anchor
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_stdout():
    """Silence TenSEAL's C++ warning for vectors longer than one ciphertext (it writes to fd 1)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def anchor_subset(layers: list[tuple[str, int]], max_params: int) -> list[int]:
    """Indices of an evenly strided subset of layers with about ``max_params`` values (all if fewer)."""
    total = sum(n for _, n in layers)
    if total <= max_params:
        return list(range(len(layers)))
    stride = 1
    while True:
        stride += 1
        idx = list(range(0, len(layers), stride))
        if sum(layers[i][1] for i in idx) <= max_params or stride >= len(layers):
            return idx


def measure_anchor(
    layers: list[tuple[str, int]],
    vecs: list[torch.Tensor],
    weights: list[float],
    senders: list[int],
    max_params: int,
) -> dict[str, Any]:
    """Per-layer TenSEAL recipe on (a strided subset of) the layers, extrapolated per ciphertext."""
    t0 = time.perf_counter()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, ANCHOR["poly_modulus_degree"], coeff_mod_bit_sizes=ANCHOR["coeff_mod_bit_sizes"]
    )
    ctx.global_scale = 2.0 ** ANCHOR["global_scale_bits"]
    server_ctx = ts.context_from(ctx.serialize(save_secret_key=False))  # public key + relin keys
    keygen_s = time.perf_counter() - t0
    slots = ANCHOR["poly_modulus_degree"] // 2
    offsets = np.cumsum([0] + [n for _, n in layers])
    idx = anchor_subset(layers, max_params)
    w_sum = math.fsum(weights[i] for i in senders)
    protect_s = {i: 0.0 for i in senders}
    sent = {i: 0 for i in senders}
    agg_s = dec_s = 0.0
    agg_bytes = 0
    max_err = max_val = 0.0
    for j in idx:
        a, b = int(offsets[j]), int(offsets[j + 1])
        blobs = []
        for i in senders:
            t0 = time.perf_counter()
            with _quiet_stdout():
                blob = ts.ckks_vector(ctx, vecs[i][a:b].tolist()).serialize()
            protect_s[i] += time.perf_counter() - t0
            sent[i] += len(blob)
            blobs.append(blob)
        t0 = time.perf_counter()
        acc = None
        for i, blob in zip(senders, blobs):
            v = ts.ckks_vector_from(server_ctx, blob) * (weights[i] / w_sum)
            acc = v if acc is None else acc + v
        if acc is None:
            raise ValueError("measure_anchor needs at least one sender")
        out = acc.serialize()
        agg_s += time.perf_counter() - t0
        agg_bytes += len(out)
        t0 = time.perf_counter()
        mean = np.asarray(ts.ckks_vector_from(ctx, out).decrypt(), dtype=np.float64)
        dec_s += time.perf_counter() - t0
        ref = sum(weights[i] * vecs[i][a:b].numpy().astype(np.float64) for i in senders) / w_sum
        max_err = max(max_err, float(np.abs(mean - ref).max()))
        max_val = max(max_val, max(float(vecs[i][a:b].abs().max()) for i in senders))
    cts_all = sum(-(-n // slots) for _, n in layers)
    cts_measured = sum(-(-layers[j][1] // slots) for j in idx)
    factor = cts_all / cts_measured
    measured_params = sum(layers[j][1] for j in idx)
    total = int(offsets[-1])
    mean_protect = sum(protect_s.values()) / len(senders)
    mean_bytes = sum(sent.values()) / len(senders)
    return {
        "recipe": "anchor (per-layer)",
        **ANCHOR,
        "layers_total": len(layers),
        "layers_measured": len(idx),
        "layer_stride": idx[1] - idx[0] if len(idx) > 1 else 1,
        "measured_params": measured_params,
        "ciphertexts_per_client": cts_all,
        "ciphertexts_measured": cts_measured,
        "extrapolated": factor != 1.0,
        "extrapolation_factor": factor,
        "keygen_s": keygen_s,
        "measured": {
            "protect_s_per_client": mean_protect,
            "aggregate_s": agg_s,
            "decrypt_s": dec_s,
            "bytes_per_client": mean_bytes,
            "aggregate_bytes": agg_bytes,
        },
        "protect_s_per_client": mean_protect * factor,
        "aggregate_s": agg_s * factor,
        "decrypt_s": dec_s * factor,
        "bytes_per_client": mean_bytes * factor,
        "bytes_per_param": mean_bytes * factor / total,
        "aggregate_bytes": agg_bytes * factor,
        "max_abs_error": max_err,
        "max_abs_value": max_val,
        "relative_error": max_err / max_val if max_val > 0 else 0.0,
    }


# --------------------------------------------------------------------------------------------
# command
# --------------------------------------------------------------------------------------------


def run_benchmark(
    params: int,
    clients: int,
    dropouts: int = 0,
    presets: tuple[str, ...] = ("precise", "compact"),
    anchor_params: int = 4_000_000,
    clip: float = 1.0,
    bound: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    anchor: bool = True,
) -> dict[str, Any]:
    """Measure every recipe on the same updates; return the figures, ratios and target verdicts."""
    if params < 1 or clients < 1 or not 0 <= dropouts < clients:
        raise ValueError(
            f"need params >= 1, clients >= 1, 0 <= dropouts < clients; got {params}, {clients}, {dropouts}"
        )
    layers = layer_layout(params, dhunet_layers())
    vecs = make_updates(layers, clients, clip, seed)
    spec = UpdateSpec(tuple(_entries(layers)), torch.float32)
    weights = make_weights(clients, seed)
    senders = list(range(clients - dropouts))
    b = float(bound) if bound is not None else float(clip)
    load_before = os.getloadavg()[0]
    rows = []
    for name in presets:
        rows.append(measure_preset(name, vecs, spec, weights, senders, b, threads))
    anchor_row = measure_anchor(layers, vecs, weights, senders, anchor_params) if anchor else None
    verdicts: dict[str, Any] = {}
    for r in rows:
        if anchor_row is not None:
            r["protect_speedup_vs_anchor"] = anchor_row["protect_s_per_client"] / r["protect_s_per_client"]
            r["bytes_ratio_vs_anchor"] = anchor_row["bytes_per_param"] / r["bytes_per_param"]
            r["aggregate_speedup_vs_anchor"] = anchor_row["aggregate_s"] / r["aggregate_s"]
            r["decrypt_speedup_vs_anchor"] = anchor_row["decrypt_s"] / r["decrypt_s"]
        if r["recipe"] == "precise":
            verdicts["precise_error"] = r["error_ok"]
            if anchor_row is not None:
                verdicts["precise_protect_speedup"] = r["protect_speedup_vs_anchor"] >= TARGET_SPEEDUP
                verdicts["precise_bytes_ratio"] = r["bytes_ratio_vs_anchor"] >= TARGET_BYTES_RATIO
        if r["recipe"] == "compact":
            verdicts["compact_error"] = r["error_ok"]
            verdicts["compact_bytes"] = r["bytes_per_param"] <= TARGET_COMPACT_BYTES
    return {
        "params": params,
        "clients": clients,
        "dropouts": dropouts,
        "senders": len(senders),
        "weights": weights,
        "clip": clip,
        "bound": b,
        "layers": len(layers),
        "layout": "DHU-Net float state_dict entries in order, truncated/repeated to params",
        "threads": threads or os.cpu_count(),
        "rows": rows,
        "anchor": anchor_row,
        "targets": {
            "precise_protect_speedup": TARGET_SPEEDUP,
            "precise_bytes_ratio": TARGET_BYTES_RATIO,
            "compact_bytes_per_param": TARGET_COMPACT_BYTES,
            "precise_relative_error": PRESETS["precise"].error_target,
            "compact_relative_error": PRESETS["compact"].error_target,
        },
        "verdicts": verdicts,
        "all_pass": all(verdicts.values()),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
    }


def _entries(layers: list[tuple[str, int]]) -> list[SpecEntry]:
    out, off = [], 0
    for name, n in layers:
        out.append(SpecEntry(name, (n,), torch.float32, n, off))
        off += n
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params", type=int, default=DEFAULT_PARAMS, help=f"values per update (default {DEFAULT_PARAMS:,})"
    )
    p.add_argument("--clients", type=int, default=5, help="clients per round (default 5)")
    p.add_argument("--dropouts", type=int, default=0, help="clients (the last ones) that send nothing")
    p.add_argument("--presets", default="precise,compact", help="comma-separated presets to measure")
    p.add_argument(
        "--anchor-params",
        type=int,
        default=4_000_000,
        help="measure the per-layer anchor on a strided layer subset of about this many values and "
        "extrapolate per ciphertext (default 4,000,000)",
    )
    p.add_argument("--no-anchor", action="store_true", help="skip the per-layer anchor")
    p.add_argument(
        "--clip", type=float, default=1.0, help="L2 clip norm of each client's update (default 1.0)"
    )
    p.add_argument(
        "--bound", type=float, default=None, help="public bound B on |value| (default: the clip norm)"
    )
    p.add_argument("--threads", type=int, default=None, help="TenSEAL threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file; default results/he/<timestamp>.json")


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    console = console_for(args)
    console.width = max(console.width, 160)  # the table has 11 columns
    out = json_out(args, "he")
    presets = tuple(s.strip() for s in args.presets.split(",") if s.strip())
    for name in presets:
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    console.print(
        f"he: {args.params:,} float32 values per update, {args.clients} clients ({args.dropouts} dropped), "
        f"TenSEAL threads {args.threads or os.cpu_count()} → {out}"
    )
    t0 = time.perf_counter()
    result = run_benchmark(
        args.params,
        args.clients,
        args.dropouts,
        presets,
        args.anchor_params,
        args.clip,
        args.bound,
        args.seed,
        args.threads,
        not args.no_anchor,
    )
    result["wall_s"] = time.perf_counter() - t0

    table = Table(
        title=f"CKKS aggregation, {args.params:,} values, {result['senders']} of {args.clients} clients sent"
    )
    cols = (
        "recipe",
        "ciphertexts",
        "protect s/client",
        "server s",
        "decrypt s",
        "bytes/param",
        "payload",
        "max abs err",
        "err / max|u|",
        "protect ×",
        "bytes ×",
    )
    for c in cols:
        table.add_column(c, justify="left" if c == "recipe" else "right")
    rows = list(result["rows"]) + ([result["anchor"]] if result["anchor"] else [])
    for r in rows:
        star = " *" if r.get("extrapolated") else ""
        table.add_row(
            r["recipe"] + star,
            f"{r['ciphertexts_per_client']:,}",
            f"{r['protect_s_per_client']:.2f}",
            f"{r['aggregate_s']:.2f}",
            f"{r['decrypt_s']:.2f}",
            f"{r['bytes_per_param']:.2f}",
            _fmt_bytes(r["bytes_per_client"]),
            f"{r['max_abs_error']:.2e}",
            f"{r['relative_error']:.2e}",
            f"{r.get('protect_speedup_vs_anchor', 1.0):.2f}",
            f"{r.get('bytes_ratio_vs_anchor', 1.0):.2f}",
        )
    console.print(table)
    a = result["anchor"]
    if a is not None:
        if a["extrapolated"]:
            console.print(
                f"* anchor measured on {a['layers_measured']} of {a['layers_total']} layers (layers 0, "
                f"{a['layer_stride']}, {2 * a['layer_stride']}, …: {a['measured_params']:,} values, "
                f"{a['ciphertexts_measured']:,} ciphertexts) and extrapolated "
                f"×{a['extrapolation_factor']:.3f} to all "
                f"{a['ciphertexts_per_client']:,} ciphertexts; its error is the measured subset's"
            )
        else:
            console.print("anchor measured on every layer (nothing extrapolated)")
    console.print(
        f"precise/compact: measured in full, streamed chunk by chunk (bound B = {result['bound']:g}, "
        f"clip {result['clip']:g}); server s = adding {result['senders']} payloads; all times wall-clock"
    )
    for k, ok in result["verdicts"].items():
        console.print(f"  {k}: {'PASS' if ok else 'FAIL'}")
    load = result["load_avg_1min"]
    console.print(f"{load_text(load)} on {os.cpu_count()} cores; wall {result['wall_s']:.0f} s")
    return finish_measurement(args, console, out, result)
