"""NoiseSource.bernoulli: secure (ChaCha20 word < round(p·2⁶⁴)) and seeded coin flips for Poisson
sampling. Rates are checked with 1 − 1e-6 Clopper–Pearson intervals (false alarm ≈ 1e-6 per check)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import cp_contains as _cp_contains

from privfl.defenses.rng import SecureNoise, SeededNoise

SOURCES = {
    "secure": lambda: SecureNoise(),
    "seeded": lambda: SeededNoise(99),
    "secure-small-chunks-3-threads": lambda: SecureNoise(chunk_size=4096, threads=3),
}


@pytest.fixture(params=list(SOURCES), ids=list(SOURCES))
def source(request):
    return SOURCES[request.param]()


def test_edges_are_exact(source):
    for n in (0, 1, 7, 100_001):
        zeros, ones = source.bernoulli(n, 0.0), source.bernoulli(n, 1)
        assert zeros.dtype == ones.dtype == torch.bool and zeros.shape == ones.shape == (n,)
        assert not zeros.any() and bool(ones.all())
    assert source.bernoulli(0, 0.5).shape == (0,)


@pytest.mark.parametrize("p", [1e-3, 0.01, 0.3, 0.5, 0.97])
def test_rate(source, p):
    n = 200_000
    x = source.bernoulli(n, p, key=("rate", p))
    assert x.dtype == torch.bool and x.shape == (n,) and x.device.type == "cpu"
    assert _cp_contains(int(x.sum()), n, p), (p, float(x.float().mean()))


def test_odd_size_and_chunk_boundaries_are_independent_flips():
    x = SecureNoise(chunk_size=1000, threads=2).bernoulli(10_001, 0.5)
    assert x.shape == (10_001,)
    assert _cp_contains(int(x.sum()), 10_001, 0.5)
    chunks = {tuple(x[i : i + 64].tolist()) for i in range(0, 10_000, 1000)}
    assert len(chunks) == 10  # every chunk its own nonce


def test_secure_threshold_is_round_p_times_2_64():
    src = SecureNoise(threads=1)
    words = np.array([0, 2**63 - 1, 2**63, 2**64 - 1], dtype=np.uint64)
    src._keystream = lambda key, call, chunk, zeros, out: out.__setitem__(slice(None), words.view(np.uint8))
    assert src.bernoulli(4, 0.5).tolist() == [True, True, False, False]  # threshold 2⁶³
    assert src.bernoulli(4, 1 - 2**-53).tolist() == [True, True, True, False]  # threshold 2⁶⁴ − 2¹¹
    assert src.bernoulli(4, 2.0**-64).tolist() == [True, False, False, False]  # threshold 1
    assert src.bernoulli(4, 2.0**-66).tolist() == [False] * 4  # rounds to threshold 0


def test_seeded_is_reproducible_and_matches_torch_rand():
    a, b = SeededNoise(5), SeededNoise(5)
    key = ("poisson", 3, "client-1")
    x = a.bernoulli(10_000, 0.2, key=key)
    assert torch.equal(x, b.bernoulli(10_000, 0.2, key=key))
    assert not torch.equal(x, a.bernoulli(10_000, 0.2, key=("poisson", 4, "client-1")))
    assert not torch.equal(x, SeededNoise(6).bernoulli(10_000, 0.2, key=key))
    assert torch.equal(x, torch.rand(10_000, generator=a._generator(key), dtype=torch.float64) < 0.2)
    before = torch.get_rng_state()
    a.bernoulli(100, 0.5)
    assert torch.equal(torch.get_rng_state(), before)


def test_secure_is_not_reproducible():
    a = SecureNoise()
    x = a.bernoulli(10_000, 0.5, key=("same",))
    assert not torch.equal(x, a.bernoulli(10_000, 0.5, key=("same",)))
    assert not torch.equal(x, SecureNoise().bernoulli(10_000, 0.5, key=("same",)))


@pytest.mark.parametrize(
    "n, p",
    [
        (-1, 0.5),
        (2.5, 0.5),
        (True, 0.5),
        (None, 0.5),
        ("3", 0.5),
        (4, -0.1),
        (4, 1.0001),
        (4, float("nan")),
        (4, float("inf")),
        (4, "x"),
        (4, None),
    ],
)
def test_bad_arguments_raise(source, n, p):
    with pytest.raises(ValueError):
        source.bernoulli(n, p)


def test_numpy_ints_and_floats_are_accepted(source):
    x = source.bernoulli(np.int64(5), np.float32(0.5))
    assert x.shape == (5,) and x.dtype == torch.bool
