"""Fixed-point quantization of weighted updates into Z_2^32, and back.

Client ``u`` with public weight ``w_u`` (``ctx.weights``) and update ``x_u`` sends, per coordinate,

    q_u = rint(clip(x_u, -R, R) · w_u · 2^k)   as a 32-bit two's-complement word (mod 2^32),

with ``R`` the clip range (update units) and ``k`` the scale bits (``scale = 2^k`` steps per update
unit). Coordinates beyond ``±R`` are *saturated* to ``±R`` and counted. The float arithmetic is
float64; ``rint`` rounds half to even.

No wrap-around. ``|q_u| <= b_u = rint(R · (w_u · 2^k))`` for every coordinate (float rounding is
monotone), so the true integer sum over any set of clients lies in ``[-B, B]`` with
``B = Σ_u b_u`` over all clients of the round. A configuration is accepted only if ``B <= 2^31 - 1``
(:func:`check_no_wrap`); then the sum modulo 2^32, read as int32, *is* the integer sum. With weights
summing to 1 this is ``R·2^k + n/2 <= 2^31 - 1`` (unweighted sums, ``w_u = 1``: ``n·R·2^k + n/2``).
:func:`choose_scale_bits` picks the largest ``k`` that satisfies it.

Dequantization. The server divides the integer sum over the survivors ``S`` by ``2^k · W`` with
``W = Σ_{u in S} w_u`` (weights renormalised over survivors), in float64, then casts to the
update's dtype. Error: each client's ``q_u / 2^k`` is within ``1/(2·2^k)`` of ``w_u·clip(x_u)`` (plus
float64 rounding of the product, relative 2^-53), so the mean is within ``|S| / (2·2^k·W)`` of the
weighted mean of the clipped inputs (:func:`max_dequantization_error`), before the final cast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from privfl.defenses.secagg.errors import OverflowRiskError

__all__ = [
    "INT32_MAX",
    "check_no_wrap",
    "choose_scale_bits",
    "client_bound",
    "dequantize",
    "max_dequantization_error",
    "quantize",
    "quantize_into",
    "sum_bound",
]

INT32_MAX = (1 << 31) - 1
_MAX_SCALE_BITS = 512
_MIN_SCALE_BITS = -512


def check_clip_range(clip_range: float) -> float:
    try:
        r = float(clip_range)
    except (TypeError, ValueError) as err:
        raise ValueError(f"clip_range must be a positive real number, got {clip_range!r}") from err
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"clip_range must be positive and finite, got {clip_range!r}")
    return r


def check_weights(weights: Sequence[float]) -> tuple[float, ...]:
    ws = tuple(float(w) for w in weights)
    if not ws:
        raise ValueError("need at least one client weight")
    if any(not (math.isfinite(w) and w >= 0) for w in ws):
        raise ValueError(f"weights must be finite and >= 0, got {ws}")
    if sum(ws) <= 0:
        raise ValueError("weights must not all be zero")
    return ws


def scale_factor(weight: float, scale_bits: int) -> float:
    """``w · 2^k`` in float64 (exact: scaling by a power of two)."""
    return math.ldexp(float(weight), int(scale_bits))


def client_bound(weight: float, clip_range: float, scale_bits: int) -> int:
    """Largest ``|q|`` a client with this weight can produce: ``rint(R · (w · 2^k))``."""
    return int(round(float(clip_range) * scale_factor(weight, scale_bits)))


def sum_bound(weights: Sequence[float], clip_range: float, scale_bits: int) -> int:
    """Largest ``|Σ q_u|`` over any subset of the clients: ``Σ_u client_bound(w_u)``."""
    return sum(client_bound(w, clip_range, scale_bits) for w in weights)


def check_no_wrap(weights: Sequence[float], clip_range: float, scale_bits: int) -> None:
    """Refuse (:class:`OverflowRiskError`) a configuration whose sum could leave the int32 range."""
    ws = check_weights(weights)
    r = check_clip_range(clip_range)
    if (
        not isinstance(scale_bits, (int, np.integer))
        or not _MIN_SCALE_BITS <= int(scale_bits) <= _MAX_SCALE_BITS
    ):
        raise ValueError(
            f"scale_bits must be an int in [{_MIN_SCALE_BITS}, {_MAX_SCALE_BITS}], got {scale_bits!r}"
        )
    bound = sum_bound(ws, r, int(scale_bits))
    if bound > INT32_MAX:
        best = choose_scale_bits(ws, r)
        raise OverflowRiskError(
            f"{len(ws)} clients with clip range {r:g} and scale 2^{scale_bits} could sum to ±{bound:,}, "
            f"beyond the int32 range ±{INT32_MAX:,} of the mod-2^32 sum: use scale_bits <= {best} (or a "
            "smaller clip range)"
        )


def choose_scale_bits(weights: Sequence[float], clip_range: float) -> int:
    """The largest ``k`` with ``sum_bound(weights, clip_range, k) <= 2^31 - 1`` (finest grid that cannot
    wrap)."""
    ws = check_weights(weights)
    r = check_clip_range(clip_range)
    k = math.floor(math.log2(INT32_MAX / (r * sum(ws)))) + 2  # an upper estimate; step down
    k = max(min(k, _MAX_SCALE_BITS), _MIN_SCALE_BITS)
    while k > _MIN_SCALE_BITS and sum_bound(ws, r, k) > INT32_MAX:
        k -= 1
    if sum_bound(ws, r, k) > INT32_MAX:  # pragma: no cover - needs weights ~ 2^500
        raise OverflowRiskError(f"no scale can hold {len(ws)} clients with clip range {r:g}")
    return k


def max_dequantization_error(n_clients: int, scale_bits: int, weight_total: float) -> float:
    """Bound on ``|mean - weighted mean of the clipped inputs|`` per coordinate, in update units:
    ``n / (2 · 2^k · W)`` (before the final cast to the update's dtype)."""
    return n_clients / (2.0 * math.ldexp(float(weight_total), int(scale_bits)))


def quantize_into(
    x: np.ndarray, out: np.ndarray, factor: float, clip_range: float, f64: np.ndarray, i64: np.ndarray
) -> int:
    """Quantize the float block ``x`` into the uint32 block ``out`` (same length) with ``factor = w·2^k``;
    ``f64``/``i64`` are scratch buffers of at least that length. Returns the saturated count.

    Raises ValueError on NaN or infinite values (they cannot be quantized)."""
    n = x.size
    f = f64[:n]
    np.copyto(f, x)
    if not np.isfinite(f).all():
        raise ValueError("update has NaN or infinite values; secure aggregation cannot quantize them")
    saturated = int(np.count_nonzero(f > clip_range)) + int(np.count_nonzero(f < -clip_range))
    if saturated:
        np.clip(f, -clip_range, clip_range, out=f)
    np.multiply(f, factor, out=f)
    np.rint(f, out=f)
    i = i64[:n]
    np.copyto(i, f, casting="unsafe")
    np.copyto(out, i, casting="unsafe")  # int64 -> uint32 keeps the low 32 bits: two's complement
    return saturated


def quantize(x: np.ndarray, weight: float, clip_range: float, scale_bits: int) -> tuple[np.ndarray, int]:
    """Reference (whole-vector) quantization: ``(q as int64, saturated count)``, the same arithmetic as
    :func:`quantize_into`. The unmasked sum equals ``Σ q_u`` over the survivors exactly."""
    f = np.asarray(x, dtype=np.float64).copy()
    if not np.isfinite(f).all():
        raise ValueError("update has NaN or infinite values; secure aggregation cannot quantize them")
    r = float(clip_range)
    saturated = int(np.count_nonzero(f > r)) + int(np.count_nonzero(f < -r))
    np.clip(f, -r, r, out=f)
    f *= scale_factor(weight, scale_bits)
    np.rint(f, out=f)
    return f.astype(np.int64), saturated


def dequantize(
    int_sum: np.ndarray,
    scale_bits: int,
    weight_total: float,
    dtype: np.dtype | type = np.float32,
    block: int = 1 << 18,
) -> np.ndarray:
    """``int_sum / (2^k · W)`` computed in float64 and cast to ``dtype``, block by block (no full-size
    float64 temporary)."""
    if not (math.isfinite(weight_total) and weight_total > 0):
        raise ValueError(f"survivors' weight total must be positive, got {weight_total}")
    d = math.ldexp(float(weight_total), int(scale_bits))
    n = int_sum.size
    out = np.empty(n, dtype=dtype)
    tmp = np.empty(min(block, max(n, 1)), dtype=np.float64)
    for a in range(0, n, block):
        b = min(a + block, n)
        t = tmp[: b - a]
        np.divide(int_sum[a:b], d, out=t)
        out[a:b] = t
    return out
