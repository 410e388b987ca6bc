"""Tests for privfl.updates: flatten/unflatten exactness, arithmetic, norms, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfl import updates as U
from privfl.updates import InvalidUpdateError

settings.register_profile(
    "privfl-updates", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
SETTINGS = settings.get_profile("privfl-updates")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_BITS = {
    torch.float16: (torch.int16, 16),
    torch.bfloat16: (torch.int16, 16),
    torch.float32: (torch.int32, 32),
    torch.float64: (torch.int64, 64),
}

KEYS = st.text(alphabet="abcdefgh._0123", min_size=1, max_size=10)
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.dtype][0]) if t.dtype in _BITS else t


@st.composite
def raw_tensors(draw, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Arbitrary bit patterns (NaN, Inf, -0.0, subnormals included); int64 within +-2**53."""
    if shape is None:
        shape = draw(SHAPES)
    n = math.prod(shape)
    if dtype == torch.int64:
        vals = draw(st.lists(st.integers(-(2**53), 2**53), min_size=n, max_size=n))
        return torch.tensor(vals, dtype=torch.int64).reshape(shape)
    itype, w = _BITS[dtype]
    vals = draw(st.lists(st.integers(-(2 ** (w - 1)), 2 ** (w - 1) - 1), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=itype).reshape(shape).view(dtype)


@st.composite
def bounded_tensors(draw, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Finite values in [-1000, 1000] (integers for int64), exactly representable in ``dtype``."""
    n = math.prod(shape)
    if dtype == torch.int64:
        vals = draw(st.lists(st.integers(-1000, 1000), min_size=n, max_size=n))
        return torch.tensor(vals, dtype=torch.int64).reshape(shape)
    vals = draw(st.lists(st.floats(-1000, 1000, width=32), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float32).reshape(shape).to(dtype)


@st.composite
def dyadic_tensors(draw, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Multiples of 1/8 small enough that sums/differences of two are exact in ``dtype``."""
    n = math.prod(shape)
    k = 127 if dtype == torch.bfloat16 else 1000
    vals = draw(st.lists(st.integers(-k, k), min_size=n, max_size=n))
    t = torch.tensor(vals, dtype=torch.float64).reshape(shape)
    return t.to(torch.int64) if dtype == torch.int64 else (t / 8).to(dtype)


@st.composite
def structures(draw, dtypes=DTYPES, min_keys: int = 0) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    keys = draw(st.lists(KEYS, min_size=min_keys, max_size=5, unique=True))
    return [(k, draw(SHAPES), draw(st.sampled_from(dtypes))) for k in keys]


@st.composite
def raw_updates(draw, dtypes=DTYPES) -> U.Update:
    return {k: draw(raw_tensors(dt, shape)) for k, shape, dt in draw(structures(dtypes))}


def _of(draw, struct, kind) -> U.Update:
    return {k: draw(kind(dt, shape)) for k, shape, dt in struct}


def assert_bitwise_equal(a: U.Update, b: U.Update) -> None:
    assert list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype, k
        assert x.shape == y.shape, k
        assert x.device == y.device, k
        if x.dtype.is_floating_point:
            nan = torch.isnan(x)
            assert torch.equal(nan, torch.isnan(y)), k
            assert torch.equal(_bits(x)[~nan], _bits(y)[~nan]), k
        else:
            assert torch.equal(x, y), k


# ---------------------------------------------------------------------------------------------
# flatten / unflatten
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(raw_updates())
def test_flatten_unflatten_roundtrip_is_bitwise(u: U.Update) -> None:
    vec, spec = U.flatten(u)
    assert vec.dim() == 1
    assert vec.numel() == spec.numel == sum(t.numel() for t in u.values())
    wide = any(t.dtype in (torch.float64, torch.int64) for t in u.values())
    assert vec.dtype == (torch.float64 if wide else torch.float32)
    assert spec.keys == tuple(u)
    offset = 0
    for e, (k, t) in zip(spec.entries, u.items()):
        assert (e.name, e.shape, e.dtype, e.numel, e.offset) == (
            k,
            tuple(t.shape),
            t.dtype,
            t.numel(),
            offset,
        )
        offset += t.numel()
    assert_bitwise_equal(U.unflatten(vec, spec), u)


@SETTINGS
@given(raw_updates(dtypes=[torch.float32, torch.float16, torch.bfloat16]))
def test_low_precision_updates_flatten_to_float32(u: U.Update) -> None:
    vec, spec = U.flatten(u)
    assert vec.dtype == torch.float32 == spec.dtype


def test_flatten_int_limits() -> None:
    ok = {"bn.num_batches_tracked": torch.tensor(2**53), "neg": torch.tensor([-(2**53)])}
    vec, spec = U.flatten(ok)
    assert vec.dtype == torch.float64
    assert_bitwise_equal(U.unflatten(vec, spec), ok)
    with pytest.raises(InvalidUpdateError, match="bn.num_batches_tracked"):
        U.flatten({"w": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(2**53 + 1)})
    with pytest.raises(InvalidUpdateError, match="bn.num_batches_tracked"):
        U.flatten({"bn.num_batches_tracked": torch.tensor(-(2**63))})


def test_flatten_forced_float32() -> None:
    u = {"w": torch.randn(3, 2), "bn.num_batches_tracked": torch.tensor(1234)}
    vec, spec = U.flatten(u, dtype=torch.float32)
    assert vec.dtype == torch.float32
    assert_bitwise_equal(U.unflatten(vec, spec), u)
    with pytest.raises(InvalidUpdateError, match="bn.num_batches_tracked"):
        U.flatten({"bn.num_batches_tracked": torch.tensor(2**24 + 1)}, dtype=torch.float32)
    with pytest.raises(InvalidUpdateError, match="'d'"):
        U.flatten({"d": torch.zeros(2, dtype=torch.float64)}, dtype=torch.float32)
    with pytest.raises(ValueError):
        U.flatten(u, dtype=torch.int32)


def test_flatten_other_dtypes_and_empty() -> None:
    u = {
        "b": torch.tensor([True, False]),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "i32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
    }
    vec, spec = U.flatten(u)
    assert vec.dtype == torch.float64  # int32 does not fit float32
    assert_bitwise_equal(U.unflatten(vec, spec), u)
    vec, spec = U.flatten({"b": u["b"], "i8": u["i8"]})
    assert vec.dtype == torch.float32
    vec, spec = U.flatten({})
    assert vec.shape == (0,) and spec.numel == 0 and U.unflatten(vec, spec) == {}
    with pytest.raises(InvalidUpdateError, match="'c'"):
        U.flatten({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(InvalidUpdateError, match="'x'"):
        U.flatten({"x": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(InvalidUpdateError, match="'m'"):
        U.flatten({"a": torch.zeros(1), "m": torch.zeros(1, device="meta")})


def test_unflatten_errors_and_no_aliasing() -> None:
    u = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    vec, spec = U.flatten(u)
    with pytest.raises(InvalidUpdateError, match="8"):
        U.unflatten(vec[:-1], spec)
    with pytest.raises(InvalidUpdateError):
        U.unflatten(torch.cat([vec, vec]), spec)
    with pytest.raises(InvalidUpdateError):
        U.unflatten(vec.reshape(2, 4), spec)
    back = U.unflatten(vec, spec)
    back["a"][0, 0] = 99.0
    assert vec[0] == 0.0
    # an aggregated (non-integral, wider) vector: integer entries are rounded
    v2, s2 = U.flatten({"n": torch.tensor([3, 4]), "w": torch.zeros(1)})
    got = U.unflatten(v2 + 0.4, s2)
    assert got["n"].dtype == torch.int64 and got["n"].tolist() == [3, 4]
    assert spec["b"].offset == 6 and len(spec) == 2


# ---------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------


@st.composite
def mean_cases(draw):
    struct = draw(structures())
    n = draw(st.integers(1, 4))
    ups = [_of(draw, struct, bounded_tensors) for _ in range(n)]
    weights = draw(
        st.one_of(
            st.none(),
            st.lists(st.floats(0, 10), min_size=n, max_size=n).filter(lambda w: sum(w) > 1e-3),
        )
    )
    return ups, weights


@SETTINGS
@given(mean_cases())
def test_weighted_mean_matches_hand_computation(case) -> None:
    ups, weights = case
    got = U.weighted_mean(ups, weights)
    w = np.ones(len(ups)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    assert list(got) == list(ups[0])
    for k, t0 in ups[0].items():
        expected = sum(wi * u[k].double().numpy() for wi, u in zip(w, ups))
        expected = torch.as_tensor(np.asarray(expected, dtype=np.float64)).reshape(t0.shape)
        assert got[k].dtype == t0.dtype and got[k].shape == t0.shape
        if t0.dtype == torch.int64:
            torch.testing.assert_close(got[k], torch.round(expected).long(), rtol=0, atol=1)
        else:
            eps = torch.finfo(t0.dtype).eps
            torch.testing.assert_close(got[k].double(), expected, rtol=max(eps, 1e-12), atol=1e-6)


@SETTINGS
@given(st.data())
def test_weighted_mean_of_identical_updates_is_exact(data) -> None:
    u = data.draw(raw_updates())
    u = {k: torch.where(torch.isfinite(t), t, 0) if t.dtype.is_floating_point else t for k, t in u.items()}
    n = data.draw(st.integers(1, 4))
    weights = data.draw(st.lists(st.floats(0.01, 10), min_size=n, max_size=n))
    assert_bitwise_equal(U.weighted_mean([U.clone(u) for _ in range(n)], weights), u)
    assert_bitwise_equal(U.weighted_mean([u] * n), u)


def test_weighted_mean_simple_and_weight_errors() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(4)}
    got = U.weighted_mean([a, b], [1.0, 3.0])
    assert got["w"].tolist() == [2.5, 5.0]
    assert got["n"].item() == 3  # 3.25 rounded
    assert U.weighted_mean([a, b])["w"].tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match="negative"):
        U.weighted_mean([a, b], [1.0, -1.0])
    with pytest.raises(ValueError, match="zero"):
        U.weighted_mean([a, b], [0.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        U.weighted_mean([a, b], [1.0])
    with pytest.raises(ValueError, match="no updates"):
        U.weighted_mean([])
    with pytest.raises(ValueError, match="finite"):
        U.weighted_mean([a, b], [1.0, float("nan")])
    with pytest.raises(InvalidUpdateError, match="'extra.key'"):
        U.weighted_mean([a, {**b, "extra.key": torch.zeros(1)}])
    with pytest.raises(InvalidUpdateError, match="'n'"):
        U.weighted_mean([a, {"w": b["w"]}])
    with pytest.raises(InvalidUpdateError, match="'w'"):
        U.weighted_mean([a, {**b, "w": torch.zeros(3)}])
    with pytest.raises(InvalidUpdateError, match="'w'"):
        U.weighted_mean([a, {**b, "w": b["w"].double()}])


@SETTINGS
@given(st.data())
def test_global_norm_equals_norm_of_flat_float_vector(data) -> None:
    struct = data.draw(structures())
    u = _of(data.draw, struct, bounded_tensors)
    floats = [t.double().reshape(-1) for t in u.values() if t.dtype.is_floating_point]
    flat = torch.cat(floats) if floats else torch.zeros(0, dtype=torch.float64)
    expected = float(torch.linalg.vector_norm(flat))
    assert U.global_l2_norm(u) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    per = U.per_key_l2_norms(u)
    assert list(per) == [k for k, t in u.items() if t.dtype.is_floating_point]
    assert math.fsum(v * v for v in per.values()) == pytest.approx(expected**2, rel=1e-12, abs=1e-12)
    for k, v in per.items():
        assert v == pytest.approx(float(torch.linalg.vector_norm(u[k].double())), rel=1e-12)


def test_norm_ignores_integer_entries() -> None:
    u = {
        "w": torch.tensor([3.0, 4.0]),
        "n": torch.tensor(1000),
        "h": torch.tensor([12.0], dtype=torch.float16),
    }
    assert U.global_l2_norm(u) == 13.0
    assert U.per_key_l2_norms(u) == {"w": 5.0, "h": 12.0}
    assert U.global_l2_norm({"n": torch.tensor(3)}) == 0.0
    assert U.global_l2_norm({}) == 0.0


@SETTINGS
@given(st.data())
def test_difference_apply_inverse_exact_on_dyadic_values(data) -> None:
    struct = data.draw(structures())
    old = _of(data.draw, struct, dyadic_tensors)
    new = _of(data.draw, struct, dyadic_tensors)
    d = U.difference(new, old)
    assert all(d[k].dtype == new[k].dtype for k in new)
    assert_bitwise_equal(U.apply(old, d), new)
    assert_bitwise_equal(U.difference(U.apply(old, d), old), d)
    assert_bitwise_equal(U.apply(new, d, scale=-1.0), old)
    assert_bitwise_equal(U.add(old, d), new)


@SETTINGS
@given(st.data())
def test_difference_apply_inverse_general(data) -> None:
    struct = data.draw(structures(dtypes=FLOATS))
    old = _of(data.draw, struct, bounded_tensors)
    new = _of(data.draw, struct, bounded_tensors)
    back = U.apply(old, U.difference(new, old))
    for k in new:
        eps = torch.finfo(new[k].dtype).eps
        tol = 2 * eps * (old[k].double().abs() + new[k].double().abs()) + 1e-30
        assert bool(((back[k].double() - new[k].double()).abs() <= tol).all()), k


def test_arithmetic_helpers() -> None:
    u = {
        "w": torch.tensor([1.0, -2.0]),
        "n": torch.tensor([5]),
        "h": torch.tensor([1.5], dtype=torch.bfloat16),
    }
    s = U.scale(u, 0.5)
    assert s["w"].tolist() == [0.5, -1.0] and s["n"].tolist() == [2] and s["n"].dtype == torch.int64
    assert s["h"].dtype == torch.bfloat16 and s["h"].item() == 0.75
    z = U.zeros_like(u)
    assert all(torch.equal(z[k], torch.zeros_like(u[k])) and z[k].dtype == u[k].dtype for k in u)
    applied = U.apply(
        u, {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor([1]), "h": torch.ones(1)}, scale=0.25
    )
    assert applied["w"].tolist() == [1.25, -1.75] and applied["n"].tolist() == [5]
    partial = U.apply(u, {"w": torch.ones(2)}, allow_missing=True)
    assert partial["w"].tolist() == [2.0, -1.0] and torch.equal(partial["n"], u["n"])
    with pytest.raises(InvalidUpdateError, match="'n'"):
        U.apply(u, {"w": torch.ones(2), "h": torch.ones(1)})
    with pytest.raises(InvalidUpdateError, match="'zz'"):
        U.apply(u, {**u, "zz": torch.ones(1)})
    with pytest.raises(InvalidUpdateError, match="'w'"):
        U.difference(u, {**u, "w": torch.ones(3)})
    c = U.clone(u)
    c["w"][0] = 100.0
    assert u["w"][0] == 1.0


def test_to_converts_only_floating_entries() -> None:
    u = {"w": torch.randn(2, requires_grad=True), "n": torch.tensor(3), "b": torch.tensor([True])}
    v = U.to(u, dtype=torch.float64)
    assert v["w"].dtype == torch.float64 and not v["w"].requires_grad
    assert v["n"].dtype == torch.int64 and v["b"].dtype == torch.bool
    m = U.to(u, device="meta")
    assert all(t.device.type == "meta" for t in m.values())
    with pytest.raises(ValueError):
        U.to(u, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------

KEY = "decoder.head.weight"


def _ref() -> U.Update:
    return {
        "encoder.conv.weight": torch.zeros(4, 3),
        KEY: torch.zeros(2, 2),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def test_validate_accepts_valid_update() -> None:
    ref = _ref()
    U.validate(U.clone(ref), ref)
    partial = {KEY: torch.ones(2, 2)}
    U.validate(partial, ref, allow_missing=True)
    with pytest.raises(InvalidUpdateError, match="encoder.conv.weight"):
        U.validate(partial, ref)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda u: u.__setitem__(KEY, [[0.0, 0.0], [0.0, 0.0]]), "Tensor"),
        (lambda u: u[KEY].__setitem__((0, 1), float("nan")), "NaN"),
        (lambda u: u[KEY].__setitem__((1, 1), float("inf")), "Inf"),
        (lambda u: u[KEY].__setitem__((1, 0), -float("inf")), "Inf"),
        (lambda u: u.pop(KEY), "missing"),
        (lambda u: u.__setitem__(KEY + ".extra", torch.zeros(1)), "unexpected"),
        (lambda u: u.__setitem__(KEY, torch.zeros(2, 3)), "shape"),
        (lambda u: u.__setitem__(KEY, torch.zeros(4)), "shape"),
        (lambda u: u.__setitem__(KEY, torch.zeros(2, 2, dtype=torch.float64)), "dtype"),
        (lambda u: u.__setitem__(KEY, torch.zeros(2, 2, device="meta")), "device"),
    ],
    ids=["non-tensor", "nan", "inf", "-inf", "missing", "extra", "shape", "shape-numel", "dtype", "device"],
)
def test_validate_failure_modes_name_the_key(mutate, words: str) -> None:
    ref = _ref()
    u = U.clone(ref)
    mutate(u)
    with pytest.raises(InvalidUpdateError) as info:
        U.validate(u, ref)
    msg = str(info.value)
    assert KEY in msg
    assert words in msg
    assert isinstance(info.value, ValueError)


def test_validate_rejects_non_mapping() -> None:
    with pytest.raises(InvalidUpdateError):
        U.validate([torch.zeros(1)], _ref())  # type: ignore[arg-type]
