"""Noise sources: calibration of Gaussian and Laplace noise, secure vs reproducible behaviour, API.

Statistical checks use 5-standard-error or 1 − 1e-6 Clopper–Pearson bounds (false alarm ≈ 1e-6 per
check) and KS tests at p > 1e-4, so a correct source practically never fails them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import cp_contains as _cp_contains
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privfl.defenses.rng import (
    GAUSSIAN_MAX_RADIUS,
    LAPLACE_MAX_MAGNITUDE,
    NoiseSource,
    SecureNoise,
    SeededNoise,
    default_noise,
)

N = 200_000
SOURCES = {
    "secure": lambda: SecureNoise(),
    "seeded": lambda: SeededNoise(1234),
    "secure-small-chunks-3-threads": lambda: SecureNoise(chunk_size=4096, threads=3),
    "secure-1-thread": lambda: SecureNoise(chunk_size=10_000, threads=1),
}


@pytest.fixture(params=list(SOURCES), ids=list(SOURCES))
def source(request) -> NoiseSource:
    return SOURCES[request.param]()


def _assert_gaussian(x: torch.Tensor, std: float) -> None:
    v = x.double().flatten()
    n = v.numel()
    assert torch.isfinite(v).all()
    assert abs(float(v.mean())) <= 5 * std / math.sqrt(n)
    assert abs(float(v.std()) - std) <= 5 * std / math.sqrt(2 * n)


def _assert_laplace(x: torch.Tensor, b: float) -> None:
    v = x.double().flatten()
    n = v.numel()
    assert torch.isfinite(v).all()
    assert abs(float(v.mean())) <= 5 * math.sqrt(2) * b / math.sqrt(n)  # Var X = 2b²
    assert abs(float(v.abs().mean()) - b) <= 5 * b / math.sqrt(n)  # |X| ~ Exp(b): sd b
    for t in (0.25 * b, b, 3 * b, 8 * b):
        k = int((v.abs() > t).sum())
        assert _cp_contains(k, n, math.exp(-t / b)), (t, k / n, math.exp(-t / b))
    assert _cp_contains(int((v > 0).sum()), n, 0.5)


# ---------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("std", [0.05, 1.0, 7.5])
def test_gaussian_mean_and_std(source, std):
    _assert_gaussian(source.gaussian(N, std, key=("t", 1)), std)


@pytest.mark.parametrize("b", [0.01, 1.0, 4.0])
def test_laplace_abs_mean_tails_and_symmetry(source, b):
    _assert_laplace(source.laplace(N, b, key=("t", 2)), b)


def test_gaussian_ks_and_tails(source):
    x = source.gaussian(N, 2.0, key=("ks",)).double().numpy()
    assert stats.kstest(x / 2.0, "norm").pvalue > 1e-4
    for t in (1.0, 2.0, 3.0):
        k = int((np.abs(x) > 2.0 * t).sum())
        assert _cp_contains(k, N, 2 * stats.norm.sf(t)), t


def test_laplace_ks(source):
    x = source.laplace(N, 0.7, key=("ks",)).double().numpy()
    assert stats.kstest(x, "laplace", args=(0.0, 0.7)).pvalue > 1e-4


@pytest.mark.parametrize("make", [SecureNoise, lambda: SeededNoise(5)], ids=["secure", "seeded"])
def test_float64_path(make):
    src = make()
    g = src.gaussian(N, 3.0, dtype=torch.float64)
    lap = src.laplace(N, 0.5, dtype=torch.float64)
    assert g.dtype == lap.dtype == torch.float64
    _assert_gaussian(g, 3.0)
    _assert_laplace(lap, 0.5)
    assert stats.kstest(g.numpy() / 3.0, "norm").pvalue > 1e-4
    assert stats.kstest(lap.numpy(), "laplace", args=(0.0, 0.5)).pvalue > 1e-4
    # float64 transforms of 64-bit words: nearly no value is representable in float32
    assert (g.float().double() == g).float().mean() < 0.01
    assert (lap.float().double() == lap).float().mean() < 0.01


def test_box_muller_pairs_are_uncorrelated():
    """Both Box–Muller outputs are used; within a chunk z1 sits in the first half, z2 in the second."""
    p = 50_000
    x = SecureNoise(chunk_size=2 * p).gaussian(2 * p, 1.0).double()
    z1, z2 = x[:p], x[p:]
    bound = 5 / math.sqrt(p)
    assert abs(float(torch.corrcoef(torch.stack([z1, z2]))[0, 1])) < bound
    assert abs(float(torch.corrcoef(torch.stack([z1**2, z2**2]))[0, 1])) < bound


@pytest.mark.parametrize("std", [1e-20, 1e20])
def test_extreme_std_keeps_its_scale(std):
    """-2·std² would under/overflow float32; the unfused path scales by std instead."""
    _assert_gaussian(SecureNoise().gaussian(20_000, std), std)


def test_secure_tails_are_bounded_by_the_64_bit_uniforms():
    """64-bit uniforms in float64 for every dtype (tests/test_rng_tails.py feeds the extreme words)."""
    for dtype in (torch.float32, torch.float64):
        x = SecureNoise().gaussian(1_000_000, 1.0, dtype=dtype)
        assert float(x.abs().max()) <= GAUSSIAN_MAX_RADIUS * (1 + 2**-23)
        lap = SecureNoise().laplace(1_000_000, 1.0, dtype=dtype)
        assert float(lap.abs().max()) <= LAPLACE_MAX_MAGNITUDE * (1 + 2**-23)
    assert GAUSSIAN_MAX_RADIUS == pytest.approx(math.sqrt(-2 * math.log(2.0**-64)))
    assert LAPLACE_MAX_MAGNITUDE == pytest.approx(-math.log(2.0**-63))


def test_odd_sizes_and_chunk_boundaries():
    src = SecureNoise(chunk_size=1000)
    x = src.gaussian(10_001, 1.0)
    lap = src.laplace(10_001, 1.0)
    assert x.shape == lap.shape == (10_001,)
    assert torch.isfinite(x).all() and torch.isfinite(lap).all()
    # every chunk has its own nonce: no two chunks repeat
    chunks = {tuple(x[i : i + 8].tolist()) for i in range(0, 10_000, 1000)}
    assert len(chunks) == 10
    assert stats.kstest(x.double().numpy(), "norm").pvalue > 1e-4
    assert stats.kstest(lap.double().numpy(), "laplace").pvalue > 1e-4
    assert src.gaussian(1, 1.0).shape == (1,)


# ------------------------------------------------------------------------- secure vs seeded


def test_secure_noise_never_repeats():
    a, b = SecureNoise(), SecureNoise()
    x1 = a.gaussian(1000, 1.0, key=("same",))
    x2 = a.gaussian(1000, 1.0, key=("same",))
    y = b.gaussian(1000, 1.0, key=("same",))
    assert not torch.equal(x1, x2) and not torch.equal(x1, y)
    assert not torch.equal(a.laplace(1000, 1.0), a.laplace(1000, 1.0))
    assert a.secure and a.name == "chacha20 (secure)"


def test_secure_noise_rekeys_after_fork():
    src = SecureNoise()
    old = src._key
    src._pid = -1  # as a forked child sees it
    src.gaussian(10, 1.0)
    assert src._key != old and len(src._key) == 32


def test_seeded_noise_is_reproducible_per_seed_and_key():
    a, b = SeededNoise(7), SeededNoise(7)
    key = ("GaussianMechanism", 3, "client-2")
    assert torch.equal(a.gaussian(500, 1.0, key=key), b.gaussian(500, 1.0, key=key))
    assert torch.equal(a.laplace(500, 1.0, key=key), b.laplace(500, 1.0, key=key))
    assert torch.equal(
        a.gaussian(500, 1.0, key=key, dtype=torch.float64), b.gaussian(500, 1.0, key=key, dtype=torch.float64)
    )
    assert not torch.equal(
        a.gaussian(500, 1.0, key=key), a.gaussian(500, 1.0, key=("GaussianMechanism", 4, "client-2"))
    )
    assert not torch.equal(a.gaussian(500, 1.0, key=key), SeededNoise(8).gaussian(500, 1.0, key=key))
    # same stream scaled: the std multiplies the same draw
    assert torch.allclose(a.gaussian(500, 2.0, key=key), 2 * a.gaussian(500, 1.0, key=key))
    # keys that derive_seed cannot take directly (negative ints, None, floats) are hashed as str
    assert torch.equal(a.gaussian(5, 1.0, key=(-1, None, 0.5)), b.gaussian(5, 1.0, key=(-1, None, 0.5)))
    assert not a.secure and "NOT secure" in a.name


def test_seeded_noise_leaves_global_rng_alone():
    before = torch.get_rng_state()
    SeededNoise(0).gaussian(100, 1.0)
    SeededNoise(0).laplace(100, 1.0)
    assert torch.equal(torch.get_rng_state(), before)


def test_default_noise_is_secure():
    src = default_noise()
    assert isinstance(src, SecureNoise) and src.secure
    assert src is not default_noise()


# ------------------------------------------------------------------------------------- API


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    which=st.sampled_from(["secure", "seeded"]),
    laplace=st.booleans(),
)
def test_shapes(shape, which, laplace):
    src = SecureNoise() if which == "secure" else SeededNoise(0)
    draw = src.laplace if laplace else src.gaussian
    x = draw(shape, 1.0)
    assert x.shape == torch.Size(shape) and x.dtype == torch.float32
    assert x.numel() == math.prod(shape)  # () -> a scalar with one value
    assert draw(torch.Size(shape), 1.0).shape == torch.Size(shape)
    assert draw(list(shape), 1.0).shape == torch.Size(shape)


def test_int_and_scalar_shapes(source):
    assert source.gaussian(7, 1.0).shape == (7,)
    assert source.gaussian(np.int64(3), 1.0).shape == (3,)
    s = source.laplace((), 1.0)
    assert s.dim() == 0 and s.numel() == 1 and math.isfinite(float(s))
    assert source.gaussian((0, 4), 1.0).shape == (0, 4)


def test_zero_std_gives_zeros(source):
    z = source.gaussian((3, 4), 0.0, dtype=torch.float64)
    assert z.dtype == torch.float64 and z.shape == (3, 4) and not z.any()
    assert not source.laplace(5, 0).any()


@pytest.mark.parametrize("bad", [-1.0, -1e-12, float("nan"), float("inf"), "x", None])
def test_bad_scale_raises(source, bad):
    with pytest.raises(ValueError):
        source.gaussian(4, bad)
    with pytest.raises(ValueError):
        source.laplace(4, bad)


def test_bad_shape_and_dtype_raise(source):
    with pytest.raises(ValueError):
        source.gaussian((2, -1), 1.0)
    with pytest.raises(ValueError):
        source.gaussian(None, 1.0)
    with pytest.raises(TypeError):
        source.gaussian(4, 1.0, dtype=torch.int32)
    for bad in ({"chunk_size": 1}, {"chunk_size": 2**31}, {"threads": 0}):
        with pytest.raises(ValueError):
            SecureNoise(**bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dtypes(source, dtype):
    x = source.gaussian(10_000, 1.0, dtype=dtype, device=torch.device("cpu"))
    assert x.dtype == dtype and torch.isfinite(x).all()
    _assert_gaussian(x, 1.0)  # rounding to 8–11 bits moves the std by far less than 5 SE here


def test_noise_reaches_the_mechanisms():
    from privfl.defenses.base import RoundContext
    from privfl.defenses.dp import GaussianMechanism

    mech = GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0)
    assert isinstance(mech.noise, SecureNoise)
    ctx = RoundContext(round=0, num_clients=1, sampled=(0,), weights=(1.0,)).for_client(0)
    out = mech.protect({"w": torch.zeros(20_000)}, ctx)
    _assert_gaussian(out["w"], mech.noise_std(ctx))


# ------------------------------------------------------------------------------- benchmark


def test_bench_noise_cli_json(tmp_path, capsys):
    from privfl.bench.__main__ import main

    out = tmp_path / "noise.json"
    assert (
        main(["noise", "--params", "20001", "--repeats", "2", "--warmup", "0", "--out", str(out), "--json"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    saved = json.loads(out.read_text())
    assert printed["result"]["params"] == saved["result"]["params"] == 20001
    cases = {r["case"]: r for r in saved["result"]["rows"]}
    assert set(cases) == {
        "torch.randn",
        "SeededNoise gaussian",
        "SecureNoise gaussian",
        "SeededNoise laplace",
        "SecureNoise laplace",
    }
    assert cases["torch.randn"]["ratio_vs_randn"] == 1.0
    assert all(len(r["times_s"]) == 2 and r["median_s"] > 0 for r in cases.values())
    assert saved["result"]["secure_gaussian_ratio"] == cases["SecureNoise gaussian"]["ratio_vs_randn"]
    assert "cpu" in saved["machine"] and len(saved["result"]["load_avg_1min"]) == 2
