"""Secure aggregation cost: masking time, server unmasking, dropout recovery, bytes on the wire, against
masks from numpy ``RandomState`` with a 32-bit seed (as some FL frameworks do).

``python -m privfl.bench secagg --params 1000000 --clients 5 --dropouts 0``. One run of the protocol
(:mod:`privfl.defenses.secagg.protocol`, every message through its byte encoding) per repeat, with
``clients`` clients of which the last ``dropouts`` drop after sharing keys, before sending their
masked input (their pairwise masks are then removed by reconstructing their X25519 keys). Timed, in
the same process and repeat:

* setup — rounds 0-1 for all clients (key generation, Shamir sharing, AEAD), wall-clock total;
* client protect — quantize, add the self mask and the pairwise masks (ChaCha20), sign, serialise;
* server receive — parse, verify the signature, add into the running sum (per input);
* server unmask — reconstruct secrets, remove self masks and the dropped clients' pairwise masks,
  range check (``dropout recovery`` is the pairwise part);
* anchor — the same number of masks drawn from ``np.random.RandomState(seed32).randint(0, 2**32,
  dtype=uint32)`` and added to the same quantized vector, against privfl's ChaCha20 masks alone
  (``mask ratio`` = ChaCha20 / RandomState; below 1 means faster), and the same for the server's
  mask removal. The 32-bit seed space can be searched exhaustively and MT19937 is predictable from
  its output; ChaCha20 keyed by X25519 + HKDF is not.

The first timed repeat also checks that the unmasked integer sum equals the sum of the survivors'
quantized inputs exactly. Figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from privfl.bench.common import (
    console_for,
    finish_measurement,
    json_out,
    load_text,
)
from privfl.defenses.secagg import crypto
from privfl.defenses.secagg.crypto import U32, MaskTerm
from privfl.defenses.secagg.protocol import MaskedInput, SecAggClient, SecAggConfig, SecAggServer
from privfl.defenses.secagg.quantize import quantize

DHUNET_PARAMS = 55_400_000


def _update(n: int, seed: int, client: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed * 1_000_003 + client)
    return (torch.randn(n, generator=g) * 0.1).numpy()


def _one_round(
    n: int,
    k: int,
    dropouts: int,
    threshold: int,
    clip_range: float,
    seed: int,
    threads: int | None,
    check: bool,
) -> dict[str, Any]:
    """One full protocol run; returns timings, byte counts and (if ``check``) the exactness check."""
    ids = list(range(k))
    weights = [1.0 / k] * k
    wire: dict[str, int] = {}

    def send(kind: str, payload: bytes) -> bytes:
        wire[kind] = wire.get(kind, 0) + len(payload)
        return payload

    t0 = time.perf_counter()
    cfg = SecAggConfig.create(ids, weights, threshold, clip_range)
    server = SecAggServer(cfg, threads=threads)
    clients = {c: SecAggClient(c, threads=threads) for c in ids}
    setup = send("config", cfg.to_bytes())
    for c in ids:
        server.receive_advertisement(send("advertise", clients[c].advertise(setup).to_bytes()))
    keys = server.key_list().to_bytes()
    for c in ids:
        server.receive_shares(send("share_keys", clients[c].share_keys(send("key_list", keys)).to_bytes()))
    for c, d in server.share_deliveries().items():
        clients[c].receive_shares(send("share_delivery", d.to_bytes()))
    setup_s = time.perf_counter() - t0

    survivors = ids[: k - dropouts]
    protect_s, receive_s = [], []
    payload_bytes = 0
    for c in survivors:
        x = _update(n, seed, c)
        t0 = time.perf_counter()
        payload = clients[c].masked_input(x).to_bytes()
        protect_s.append(time.perf_counter() - t0)
        payload_bytes = len(payload)
        del x
        t0 = time.perf_counter()
        server.receive_masked_input(payload)
        receive_s.append(time.perf_counter() - t0)
        del payload
    t0 = time.perf_counter()
    request = send("unmask_request", server.unmask_request().to_bytes())
    for c in survivors:
        server.receive_unmask_response(send("unmask_response", clients[c].unmask(request).to_bytes()))
    result = server.finish()
    unmask_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean = result.mean(np.float32)
    dequantize_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "setup_s": setup_s,
        "protect_s": protect_s,
        "receive_s": receive_s,
        "unmask_s": unmask_s,
        "reconstruct_s": result.timings["reconstruct_s"],
        "self_masks_s": result.timings["self_masks_s"],
        "dropout_recovery_s": result.timings["dropout_recovery_s"],
        "dequantize_s": dequantize_s,
        "payload_bytes": payload_bytes,
        "wire": wire,
        "scale_bits": cfg.scale_bits,
        "max_error_bound": result.max_error,
    }
    if check:
        exact = np.zeros(n, dtype=np.int64)
        ref = np.zeros(n, dtype=np.float64)
        step = 1 << 22
        for c in survivors:
            x = _update(n, seed, c)
            for a in range(0, n, step):
                exact[a : a + step] += quantize(x[a : a + step], weights[c], clip_range, cfg.scale_bits)[0]
                ref[a : a + step] += weights[c] * x[a : a + step]
            del x
        out["exact_sum"] = bool(np.array_equal(exact, result.sum.astype(np.int64)))
        del exact
        ref /= sum(weights[c] for c in survivors)
        out["max_abs_error"] = float(np.max(np.abs(mean.astype(np.float64) - ref)))
        del ref
    return out


def _anchor(n: int, masks: int, seed: int, threads: int | None) -> tuple[float, float]:
    """(ChaCha20 masks time, RandomState masks time) for ``masks`` masks added to the same vector."""
    x = _update(n, seed, 0)
    q = quantize(x, 1.0, 1.0, 28)[0].astype(U32)
    del x
    terms = [MaskTerm(os.urandom(32), 1 if j % 2 else -1) for j in range(masks)]
    t0 = time.perf_counter()
    crypto.add_masks(q, terms, threads=threads)
    secure = time.perf_counter() - t0
    seeds = [struct.unpack("<I", os.urandom(4))[0] for _ in range(masks)]
    t0 = time.perf_counter()
    for j, s in enumerate(seeds):
        m = np.random.RandomState(s).randint(0, 2**32, size=n, dtype=np.uint32)
        if j % 2:
            q += m
        else:
            q -= m
        del m
    anchor = time.perf_counter() - t0
    return secure, anchor


def measure_secagg(
    params: int = 1_000_000,
    clients: int = 5,
    dropouts: int = 0,
    threshold: int | None = None,
    repeats: int = 3,
    warmup: int = 1,
    clip_range: float = 1.0,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark; see the module docstring. Times are wall-clock seconds (medians)."""
    if params < 1 or clients < 2 or not 0 <= dropouts < clients or repeats < 1 or warmup < 0:
        raise ValueError(
            f"need params >= 1, clients >= 2, 0 <= dropouts < clients, repeats >= 1, warmup >= 0; "
            f"got {params}, {clients}, {dropouts}, {repeats}, {warmup}"
        )
    t = threshold if threshold is not None else max(2, clients // 2 + 1)
    if not 2 <= t <= clients - dropouts:
        raise ValueError(f"threshold {t} must be in [2, clients - dropouts = {clients - dropouts}]")
    load_before = os.getloadavg()[0]
    runs, anchors = [], []
    survivors = clients - dropouts
    server_masks = survivors + dropouts * survivors
    for i in range(warmup + repeats):
        run = _one_round(params, clients, dropouts, t, clip_range, seed + i, threads, check=(i == warmup))
        client_anchor = _anchor(params, clients, seed + i, threads)
        server_anchor = _anchor(params, server_masks, seed + i, threads)
        if i >= warmup:
            runs.append(run)
            anchors.append((client_anchor, server_anchor))
    med = statistics.median
    first = runs[0]
    protect = med([s for r in runs for s in r["protect_s"]])
    receive = med([s for r in runs for s in r["receive_s"]])
    unmask = med([r["unmask_s"] for r in runs])
    deq = med([r["dequantize_s"] for r in runs])
    secure_mask = med([a[0][0] for a in anchors])
    rs_mask = med([a[0][1] for a in anchors])
    secure_unmask = med([a[1][0] for a in anchors])
    rs_unmask = med([a[1][1] for a in anchors])
    wire = first["wire"]
    # bytes one (surviving) client sends / receives in the other rounds (0, 1 and 4): constant in params
    per_client_other = (
        wire["advertise"] / clients + wire["share_keys"] / clients + wire["unmask_response"] / survivors
    )
    per_client_received = (wire["config"] + wire["key_list"] + wire["share_delivery"]) / clients + wire[
        "unmask_request"
    ] / survivors
    return {
        "params": params,
        "clients": clients,
        "dropouts": dropouts,
        "threshold": t,
        "clip_range": clip_range,
        "scale_bits": first["scale_bits"],
        "repeats": repeats,
        "warmup": warmup,
        "setup_s": med([r["setup_s"] for r in runs]),
        "client_protect_s": protect,
        "server_receive_s_per_input": receive,
        "server_unmask_s": unmask,
        "reconstruct_s": med([r["reconstruct_s"] for r in runs]),
        "self_masks_s": med([r["self_masks_s"] for r in runs]),
        "dropout_recovery_s": med([r["dropout_recovery_s"] for r in runs]),
        "dequantize_s": deq,
        "server_total_s": receive * survivors + unmask + deq,
        "anchor": {
            "client_masks": clients,
            "chacha20_masks_s": secure_mask,
            "randomstate_masks_s": rs_mask,
            "mask_ratio": secure_mask / rs_mask,
            "server_masks": server_masks,
            "chacha20_server_masks_s": secure_unmask,
            "randomstate_server_masks_s": rs_unmask,
            "server_mask_ratio": secure_unmask / rs_unmask,
        },
        "no_slower": secure_mask <= rs_mask,
        "wire": {
            "masked_input_bytes": first["payload_bytes"],
            "bytes_per_param": first["payload_bytes"] / params,
            "overhead_bytes": first["payload_bytes"] - 4 * params,
            "masked_input_overhead_constant": MaskedInput.OVERHEAD,
            "other_rounds_bytes_per_client": per_client_other,
            "other_rounds_bytes_received_per_client": per_client_received,
            "by_message_kind": wire,
        },
        "exact_sum": first["exact_sum"],
        "max_abs_error": first["max_abs_error"],
        "max_error_bound": first["max_error_bound"],
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,  # whole process, checks included
        "load_avg_1min": [load_before, os.getloadavg()[0]],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params",
        type=int,
        default=1_000_000,
        help=f"parameters per update (default 1,000,000; DHU-Net has {DHUNET_PARAMS:,})",
    )
    p.add_argument("--clients", type=int, default=5, help="clients in the round (default 5)")
    p.add_argument(
        "--dropouts",
        type=int,
        default=0,
        help="clients that drop after sharing keys, before sending their input (default 0)",
    )
    p.add_argument(
        "--threshold", type=int, default=None, help="Shamir threshold t (default clients // 2 + 1)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed protocol runs; medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--clip-range", type=float, default=1.0, help="clip range R (update units)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic updates")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file; default results/secagg/<timestamp>.json"
    )


def run(args: argparse.Namespace) -> int:
    console = console_for(args)
    out = json_out(args, "secagg")
    console.print(
        f"secagg: {args.params:,} parameters, {args.clients} clients, {args.dropouts} dropouts, "
        f"{args.warmup} warm-up + {args.repeats} timed runs, {torch.get_num_threads()} threads → {out}"
    )
    r = measure_secagg(
        args.params,
        args.clients,
        args.dropouts,
        args.threshold,
        args.repeats,
        args.warmup,
        args.clip_range,
        args.seed,
    )
    a, w = r["anchor"], r["wire"]
    table = Table(
        title=f"Secure aggregation, {args.params:,} params, {args.clients} clients, "
        f"{args.dropouts} dropouts, t = {r['threshold']} (median of {args.repeats})"
    )
    table.add_column("step", justify="left")
    table.add_column("seconds", justify="right")
    rows = [
        ("setup (rounds 0-1, all clients)", r["setup_s"]),
        ("client protect (quantize + mask + sign + bytes)", r["client_protect_s"]),
        ("server receive, per input (verify + add)", r["server_receive_s_per_input"]),
        ("server unmask (reconstruct + remove masks)", r["server_unmask_s"]),
        ("  of which dropout recovery (pairwise masks)", r["dropout_recovery_s"]),
        ("dequantize", r["dequantize_s"]),
        ("server total", r["server_total_s"]),
        (f"{a['client_masks']} ChaCha20 masks (privfl)", a["chacha20_masks_s"]),
        (f"{a['client_masks']} RandomState masks (anchor)", a["randomstate_masks_s"]),
        (f"{a['server_masks']} ChaCha20 masks, server side", a["chacha20_server_masks_s"]),
        (f"{a['server_masks']} RandomState masks, server side", a["randomstate_server_masks_s"]),
    ]
    for label, secs in rows:
        table.add_row(label, f"{secs:.3f}")
    console.print(table)
    console.print(
        f"mask ratio ChaCha20 / RandomState: client {a['mask_ratio']:.2f}, server "
        f"{a['server_mask_ratio']:.2f} ({'no slower' if r['no_slower'] else 'SLOWER'})"
    )
    console.print(
        f"wire: {w['masked_input_bytes']:,} bytes per masked input = {w['bytes_per_param']:.6f} B/param "
        f"(4 B/param + {w['overhead_bytes']} B); other rounds: a client sends "
        f"{w['other_rounds_bytes_per_client']:.0f} B and receives "
        f"{w['other_rounds_bytes_received_per_client']:.0f} B"
    )
    console.print(
        f"exact integer sum: {r['exact_sum']}; max |mean - float mean| = {r['max_abs_error']:.3g} "
        f"(quantization bound {r['max_error_bound']:.3g} + float32 rounding); scale 2^{r['scale_bits']}"
    )
    load = r["load_avg_1min"]
    console.print(
        f"{load_text(load)} on {os.cpu_count()} cores "
        f"(this benchmark's own threads count too); peak RSS {r['peak_rss_mb']:.0f} MB"
    )
    return finish_measurement(args, console, out, r)
