"""SecureNoise tails (docs/privacy.md, "Secure noise"): 64-bit uniforms transformed in float64, the largest
reachable magnitudes, and the per-draw δ floor ``tail_floor``.

White-box: the keystream seam ``SecureNoise._keystream`` is replaced to feed chosen words (the
extremes, or words drawn by hypothesis) and the outputs are checked against the exact formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privfl.defenses.rng import (
    GAUSSIAN_MAX_RADIUS,
    LAPLACE_MAX_MAGNITUDE,
    SecureNoise,
    SeededNoise,
    _uniform64,
)

U64_MAX = 2**64 - 1
FLOATS = [torch.float32, torch.float64]


def _feeding(data: bytes | int, chunk_size: int = 1 << 16) -> tuple[SecureNoise, list]:
    """A SecureNoise whose keystream is ``data`` (bytes, repeated/cut to each chunk's length) or one
    byte value repeated; returns it and a log of ``(call, chunk, nbytes)`` per keystream request."""
    src = SecureNoise(chunk_size=chunk_size, threads=1)
    log: list[tuple[int, int, int]] = []

    def keystream(key, call, chunk, zeros, out):
        assert len(zeros) == out.size and out.dtype == np.uint8
        log.append((call, chunk, out.size))
        if isinstance(data, int):
            out.fill(data)
        else:
            reps = -(-out.size // len(data))
            out[:] = np.frombuffer(data * reps, dtype=np.uint8)[: out.size]

    src._keystream = keystream  # type: ignore[method-assign]
    return src, log


def _gaussian_bytes(radius_words: list[int], angle_words: list[int], f64: bool) -> bytes:
    """One chunk's keystream for a Gaussian draw: the radius words, then the angle words."""
    angle_dtype = np.int64 if f64 else np.int32
    return (
        np.array(radius_words, dtype=np.uint64).tobytes() + np.array(angle_words, dtype=angle_dtype).tobytes()
    )


def _exact_neg_log_u(v: int, bits: int) -> float:
    """``−ln((v+1)·2^-bits)`` computed accurately in double precision from the exact integer."""
    if v + 1 > 2 ** (bits - 1):  # u > 1/2: log1p of the exact (negative) distance to 1
        return -math.log1p((v + 1 - 2**bits) / 2**bits)
    return bits * math.log(2) - math.log(v + 1)


# ---------------------------------------------------------------------------- the maxima


def test_max_constants():
    assert GAUSSIAN_MAX_RADIUS == pytest.approx(math.sqrt(-2 * math.log(2.0**-64)), rel=1e-15)
    assert GAUSSIAN_MAX_RADIUS == pytest.approx(9.41928018, abs=1e-8)
    assert LAPLACE_MAX_MAGNITUDE == pytest.approx(43.66827238, abs=1e-8)
    # the ideal law's mass beyond them is the smallest uniform
    assert math.exp(-(GAUSSIAN_MAX_RADIUS**2) / 2) == pytest.approx(2.0**-64, rel=1e-13)
    assert math.exp(-LAPLACE_MAX_MAGNITUDE) == pytest.approx(2.0**-63, rel=1e-13)


def test_uniform64_extremes():
    words = np.array([0, 1, 2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64 - 2048, U64_MAX], dtype=np.uint64)
    u = np.empty(words.size)
    _uniform64(words.copy().view(np.int64), u)
    assert u[0] == 2.0**-64 and u[1] == 2.0**-63  # the smallest u, exactly, never 0
    assert u[2] == 2.0**-11  # exact while v + 1 <= 2^53
    assert u[-1] == 1.0 and (u > 0).all() and (u <= 1).all()  # never 0, never above 1
    assert (np.diff(u) >= 0).all()  # monotone in v


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, U64_MAX), min_size=1, max_size=64))
def test_uniform64_is_within_an_ulp(vs):
    u = np.empty(len(vs))
    _uniform64(np.array(vs, dtype=np.uint64).view(np.int64), u)
    for v, got in zip(vs, u):
        exact = (v + 1) / 2**64  # Python: correctly rounded from the exact integers
        assert 0 < got <= 1
        assert abs(got - exact) <= 2.0**-52 * exact


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("std", [1.0, 0.37, 1e-20, 1e20])
def test_gaussian_largest_magnitude_from_extreme_words(dtype, std):
    f64 = dtype == torch.float64
    r_max = GAUSSIAN_MAX_RADIUS * std
    # radius words 0 (u = 2⁻⁶⁴, the smallest), angle words 0 (θ = 0) and the lowest (θ = −π)
    low = -(2**63) if f64 else -(2**31)
    src, _ = _feeding(_gaussian_bytes([0, 0], [0, low], f64))
    x = src.gaussian(4, std, dtype=dtype).double()  # one chunk: z1 = r sin θ (2), z2 = r cos θ (2)
    assert torch.isfinite(x).all()
    expected = torch.tensor(r_max, dtype=dtype).double()  # r_max rounded once to the dtype
    assert float(x[2]) == float(expected) and float(x[3]) == -float(expected)
    assert float(x.abs().max()) == pytest.approx(r_max, rel=1e-7 if not f64 else 1e-15)
    # the all-zero keystream everywhere: same maximum, nothing larger, no inf/NaN
    src, _ = _feeding(0)
    x = src.gaussian(10_000, std, dtype=dtype).double()
    assert torch.isfinite(x).all() and float(x.abs().max()) == float(expected)


@pytest.mark.parametrize("dtype", FLOATS)
def test_gaussian_all_ones_words_give_zero_not_nan(dtype):
    src, _ = _feeding(0xFF)  # v = 2⁶⁴−1: u = 1 exactly (never above), r = 0
    x = src.gaussian(1001, 2.0, dtype=dtype)
    assert not torch.isnan(x).any() and not x.any()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("b", [1.0, 0.25, 1e-30, 1e30])
def test_laplace_largest_magnitude_from_extreme_words(dtype, b):
    m_max = LAPLACE_MAX_MAGNITUDE * b
    expected = float(torch.tensor(m_max, dtype=dtype))
    # 0: sign +, v₆₃ = 0 (u = 2⁻⁶³); 2⁶³: sign −, v₆₃ = 0; 2⁶⁴−1: sign −, u = 1 → −0.0; 2⁶³−1: +0.0
    src, _ = _feeding(np.array([0, 2**63, U64_MAX, 2**63 - 1, 1], dtype=np.uint64).tobytes())
    x = src.laplace(5, b, dtype=dtype)
    assert torch.isfinite(x).all()
    assert x.tolist()[:4] == [expected, -expected, 0.0, 0.0]
    assert [math.copysign(1.0, v) for v in x.tolist()[2:4]] == [-1.0, 1.0]  # the sign bit is the sign
    assert float(x[4]) == pytest.approx(-b * math.log(2.0**-62), rel=1e-6)  # v₆₃ = 1: u = 2·2⁻⁶³
    src, _ = _feeding(0)
    assert torch.equal(src.laplace(3000, b, dtype=dtype), torch.full((3000,), expected, dtype=dtype))
    src, _ = _feeding(0xFF)
    x = src.laplace(3001, b, dtype=dtype)
    assert not torch.isnan(x).any() and not x.any()


def test_float16_and_bfloat16_keep_the_float32_maximum():
    src, _ = _feeding(0)
    for dtype in (torch.float16, torch.bfloat16):
        x = src.gaussian(8, 1.0, dtype=dtype)
        assert torch.isfinite(x).all()
        assert float(x.abs().max()) == float(torch.tensor(GAUSSIAN_MAX_RADIUS, dtype=torch.float32).to(dtype))


# ------------------------------------------------- hypothesis: outputs follow the exact formulas


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.integers(0, U64_MAX), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=40
    ),
    f64=st.booleans(),
    std=st.sampled_from([1.0, 3.5, 1e-12]),
)
def test_gaussian_matches_box_muller_on_any_words(pairs, f64, std):
    p = len(pairs)
    radius = [v for v, _ in pairs]
    angle = [a if f64 else a >> 32 for _, a in pairs]  # float32 requests read 32-bit angle words
    src, log = _feeding(_gaussian_bytes(radius, angle, f64))
    x = src.gaussian(2 * p, std, dtype=torch.float64 if f64 else torch.float32).double().tolist()
    assert log[0][2] == p * (16 if f64 else 12)  # keystream bytes per pair
    scale = 2.0**-64 if f64 else 2.0**-32
    tol = 1e-12 if f64 else 2e-6
    for j, (v, a) in enumerate(zip(radius, angle)):
        r = std * math.sqrt(2 * _exact_neg_log_u(v, 64))
        theta = 2 * math.pi * a * scale
        assert r <= GAUSSIAN_MAX_RADIUS * std * (1 + 1e-15)
        # absolute slack: u = 1 − tiny rounds to 1 (r ~ 1e-8 instead of 0)
        slack = tol * max(r, std) + 2e-8 * std
        assert x[j] == pytest.approx(r * math.sin(theta), rel=tol, abs=slack)
        assert x[p + j] == pytest.approx(r * math.cos(theta), rel=tol, abs=slack)


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.integers(0, U64_MAX), min_size=1, max_size=40),
    f64=st.booleans(),
    b=st.sampled_from([1.0, 0.2, 1e-12]),
)
def test_laplace_matches_inverse_cdf_on_any_words(words, f64, b):
    src, log = _feeding(np.array(words, dtype=np.uint64).tobytes())
    x = src.laplace(len(words), b, dtype=torch.float64 if f64 else torch.float32).double().tolist()
    assert log[0][2] == 8 * len(words)
    tol = 1e-13 if f64 else 1e-6
    for got, v in zip(x, words):
        sign = -1.0 if v >> 63 else 1.0
        mag = b * _exact_neg_log_u(v & (2**63 - 1), 63)
        assert mag <= LAPLACE_MAX_MAGNITUDE * b * (1 + 1e-15)
        assert got == pytest.approx(sign * mag, rel=tol, abs=1e-15 * b)
        assert math.copysign(1.0, got) == sign


@settings(max_examples=40, deadline=None)
@given(std=st.floats(1e-30, 1e30), seed=st.binary(min_size=64, max_size=64), f64=st.booleans())
def test_gaussian_scale_is_exact_on_the_same_keystream(std, seed, f64):
    """std enters as a factor: the fused (−2·std²) and unfused paths give std × the unit draw."""
    dtype = torch.float64 if f64 else torch.float32
    unit = _feeding(seed)[0].gaussian(32, 1.0, dtype=dtype).double()
    scaled = _feeding(seed)[0].gaussian(32, std, dtype=dtype).double()
    # float32: absolute slack for values that std pushes into the subnormal range
    assert torch.allclose(scaled, std * unit, rtol=1e-12 if f64 else 3e-6, atol=0.0 if f64 else 1e-6 * std)


# ------------------------------------------------------------------ keystream use (nonces)


@pytest.mark.parametrize(
    "draw, per_value",
    [("gaussian32", 6), ("gaussian64", 8), ("laplace32", 8), ("laplace64", 8), ("bernoulli", 8)],
)
def test_every_chunk_and_call_has_its_own_nonce(draw, per_value):
    src, log = _feeding(0x5A, chunk_size=1000)
    for _ in range(2):
        if draw == "bernoulli":
            src.bernoulli(10_001, 0.5)
        else:
            kind, bits = draw[:-2], draw[-2:]
            getattr(src, kind)(10_001, 1.0, dtype=torch.float64 if bits == "64" else torch.float32)
    nonces = [(call, chunk) for call, chunk, _ in log]
    assert len(set(nonces)) == len(nonces) == 22  # 11 chunks per call, calls 0 and 1
    assert {call for call, _ in nonces} == {0, 1}
    values = 10_002 if draw.startswith("gaussian") else 10_001  # Gaussian: whole pairs
    assert sum(nb for call, _, nb in log if call == 0) == values * per_value


# ------------------------------------------------------------------------------ tail_floor


@pytest.mark.parametrize("make", [SecureNoise, lambda: SeededNoise(3)], ids=["secure", "seeded"])
def test_tail_floor_values(make):
    src = make()
    assert src.tail_floor("gaussian", 0) == 0.0 and src.tail_floor("laplace", 0) == 0.0
    assert src.tail_floor("gaussian", 1) == src.tail_floor("gaussian", 2) == 2.0**-64  # one pair
    assert src.tail_floor("gaussian", 3) == 2 * 2.0**-64
    assert src.tail_floor("laplace", 3) == 3 * 2.0**-63
    n = 55_400_001
    assert src.tail_floor("gaussian", n) == 27_700_001 * 2.0**-64
    assert src.tail_floor("gaussian", n) == pytest.approx(1.5016e-12, rel=1e-4)
    assert src.tail_floor("laplace", np.int64(n)) == n * 2.0**-63
    assert isinstance(src.tail_floor("gaussian", 10), float)


@given(n=st.integers(0, 2**40), kind=st.sampled_from(["gaussian", "laplace"]))
def test_seeded_and_secure_report_the_same_floor(n, kind):
    assert SeededNoise(0).tail_floor(kind, n) == SecureNoise().tail_floor(kind, n)


@pytest.mark.parametrize(
    "kind, n",
    [
        ("uniform", 4),
        ("Gaussian", 4),
        ("gaussian", -1),
        ("laplace", 2.5),
        ("gaussian", True),
        ("laplace", None),
    ],
)
def test_tail_floor_rejects_bad_arguments(kind, n):
    with pytest.raises(ValueError):
        SecureNoise().tail_floor(kind, n)
    with pytest.raises(ValueError):
        SeededNoise(0).tail_floor(kind, n)


@pytest.mark.parametrize("dtype", FLOATS)
def test_laplace_sign_is_the_top_bit_even_at_zero(dtype):
    # v₆₃ = 2⁶³−1 and just below (u rounds to 1): magnitude 0, sign from the top bit
    words = [2**63 - 1, 2**63 - 2, U64_MAX, U64_MAX - 1]
    src, _ = _feeding(np.array(words, dtype=np.uint64).tobytes())
    x = src.laplace(4, 1.0, dtype=dtype).tolist()
    assert [math.copysign(1.0, v) for v in x] == [1.0, 1.0, -1.0, -1.0]


@pytest.mark.parametrize("dtype", FLOATS)
def test_deep_tails_keep_their_mass(dtype):
    """Well beyond the body: P(|Z| > 4) and P(|X| > 10 b) match the exact laws (1 − 1e-6 Clopper–Pearson)."""
    n = 2_000_000
    src = SecureNoise()
    checks = [
        (src.gaussian(n, 1.5, dtype=dtype).double().abs() / 1.5, 4.0, 2 * stats.norm.sf(4.0)),
        (src.laplace(n, 0.5, dtype=dtype).double().abs() / 0.5, 10.0, math.exp(-10.0)),
    ]
    for values, t, p in checks:
        k = int((values > t).sum())
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 1e-6, method="exact")
        assert ci.low <= p <= ci.high, (t, k, p * n)
