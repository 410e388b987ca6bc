"""CKKSAggregation (TenSEAL): the encrypted weighted mean, key separation, payload checks, Compose."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import tenseal as ts
import torch
from helpers import ctx_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfl.defenses.base import Compose
from privfl.defenses.ckks import (
    PRESETS,
    CKKSAggregation,
    CKKSClient,
    CKKSKeys,
    CKKSPayloadError,
    CKKSServer,
)
from privfl.defenses.dp import ClipUpdate, GaussianMechanism
from privfl.defenses.rng import SeededNoise
from privfl.updates import InvalidUpdateError, flatten, weighted_mean

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*not cryptographically secure", "ignore:GaussianMechanism\\(placement='distributed'\\)"
)


@pytest.fixture(scope="module")
def keysets() -> dict[str, list[CKKSKeys]]:
    return {name: [CKKSKeys.generate(name) for _ in range(2)] for name in PRESETS}


def make_update(
    sizes: list[int], scale: float, seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"layer{i}.weight": (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
        for i, n in enumerate(sizes)
    }


def max_abs(u: dict[str, torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in u.values())


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --------------------------------------------------------------------------------------------
# the weighted mean, property-tested


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    preset=st.sampled_from(sorted(PRESETS)),
    key=st.integers(0, 1),
    sizes=st.lists(st.integers(1, 1500), min_size=1, max_size=4),
    n_clients=st.integers(1, 5),
    sent_mask=st.integers(1, 31),
    scale_exp=st.floats(-4, 2),
    bound_exp=st.floats(-4.5, 6),
    raw_weights=st.lists(st.floats(0.05, 1.0), min_size=5, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_mean_within_stated_error(
    keysets, preset, key, sizes, n_clients, sent_mask, scale_exp, bound_exp, raw_weights, seed
):
    """Decrypted mean = plain weighted mean of the clients that sent, within the preset's stated bound."""
    weights = [w / sum(raw_weights[:n_clients]) for w in raw_weights[:n_clients]]
    sent = [i for i in range(n_clients) if sent_mask >> i & 1] or [0]
    updates = [make_update(sizes, 10.0**scale_exp, seed + i) for i in range(n_clients)]
    m = max(max_abs(updates[i]) for i in sent)
    bound = max(max_abs(u) for u in updates) * 2.0**bound_exp
    bound = max(bound, max(max_abs(u) for u in updates) / 2 ** PRESETS[preset].headroom_bits)
    d = CKKSAggregation(preset, bound=bound, keys=keysets[preset][key], measure_error=True)
    ctx = ctx_for(weights)
    payloads = [d.protect(u, ctx.for_client(i)) if i in sent else None for i, u in enumerate(updates)]
    out = d.aggregate(payloads, ctx)
    ref = weighted_mean([updates[i] for i in sent], [weights[i] for i in sent])
    w_sum = math.fsum(weights[i] for i in sent)
    err_bound = PRESETS[preset].max_abs_error(bound, len(sent), w_sum)
    r = d.last_report
    assert r.max_abs_error is not None and r.max_abs_error <= err_bound
    assert r.error_bound == pytest.approx(err_bound)
    assert r.max_abs_value == pytest.approx(m)
    assert r.dropped == tuple(i for i in range(n_clients) if i not in sent)
    assert all(out[k].dtype == torch.float32 and out[k].shape == ref[k].shape for k in ref)
    # float32 output: the CKKS error plus one rounding of each side to float32
    assert max_diff(out, ref) <= err_bound + 2.0**-23 * m
    # the relative target holds whenever max |value| is above the preset's dynamic-range floor
    if err_bound <= PRESETS[preset].error_target * m:
        assert r.relative_error <= PRESETS[preset].error_target


def test_dropouts_renormalise_over_survivors(keysets):
    d = CKKSAggregation("precise", bound=4.0, keys=keysets["precise"][0])
    updates = [{"w": torch.full((10,), float(i + 1))} for i in range(4)]
    ctx = ctx_for([0.1, 0.2, 0.3, 0.4])
    payloads = [d.protect(u, ctx.for_client(i)) for i, u in enumerate(updates)]
    payloads[1] = payloads[3] = None
    out = d.aggregate(payloads, ctx)
    expected = (0.1 * 1 + 0.3 * 3) / 0.4
    assert torch.allclose(out["w"].double(), torch.full((10,), expected, dtype=torch.float64), atol=1e-6)
    assert d.last_report.weight_sum == pytest.approx(0.4)
    assert d.last_report.dropped == (1, 3)
    with pytest.raises(ValueError, match="every client dropped out"):
        d.aggregate([None] * 4, ctx)


@pytest.mark.parametrize("n", [1, 2048, 2049, 2048 * 128 + 1])
def test_chunk_and_ciphertext_boundaries(keysets, n):
    """One value, a full ciphertext, one value over, one value over a full chunk
    (last chunk = 1 ciphertext)."""
    keys = keysets["compact"][0]
    client, server = CKKSClient(keys.client_context), CKKSServer(keys.server_context)
    vecs = [torch.linspace(-1, 1, n) * (i + 1) / 2 for i in range(2)]
    spec = flatten({"v": vecs[0]})[1]
    payloads = [client.encrypt_vector(v, spec, weight=0.5, bound=1.0) for v in vecs]
    mean, _ = client.decrypt_vector(server.aggregate(payloads, [0.5, 0.5]))
    ref = (vecs[0].double() + vecs[1].double()) / 2
    assert float((mean - ref).abs().max()) <= PRESETS["compact"].max_abs_error(1.0, 2)


def test_dtypes_and_single_client_roundtrip(keysets):
    keys = keysets["precise"][1]
    client = CKKSClient(keys.client_context)
    u = {
        "a": torch.randn(3, 4, dtype=torch.float64),
        "b": torch.randn(7).half(),
        "c": torch.randn(5).bfloat16(),
    }
    payload = client.encrypt(u, weight=0.5, bound=4.0)
    back = client.decrypt(payload)  # a key holder can read any single payload: all clients share the key
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in u.items()}
    assert float((back["a"] - u["a"]).abs().max()) <= PRESETS["precise"].max_abs_error(4.0) / 0.5
    for k in ("b", "c"):
        assert torch.equal(back[k], u[k])  # the CKKS error is far below half an ulp of 16-bit floats


# --------------------------------------------------------------------------------------------
# keys: the server cannot decrypt


def test_server_holds_no_key_and_cannot_decrypt(keysets):
    keys = keysets["precise"][0]
    server = CKKSServer(keys.server_context)
    client = CKKSClient(keys.client_context)
    assert not server.context.has_secret_key() and server.context.is_public()
    assert len(keys.server_context) < 1000 < len(keys.client_context)  # parameters only vs the secret key
    payload = client.encrypt({"x": torch.randn(100)}, weight=1.0, bound=10.0)
    aggregate = server.aggregate([payload], [1.0])
    chunk = client.encrypt_chunk(torch.randn(50).double().numpy())
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_tensor_from(server.context, chunk).decrypt()
    with pytest.raises(CKKSPayloadError, match="server context"):
        CKKSClient(keys.server_context)
    with pytest.raises(CKKSPayloadError, match="secret key"):
        CKKSServer(keys.client_context)
    assert not hasattr(server, "decrypt")
    assert client.decrypt(aggregate)["x"].shape == (100,)
    assert "secret" in repr(keys) and str(keys.client_context[:64]) not in repr(keys)


def test_fresh_keys_differ_and_state_dict_has_no_secret(keysets):
    a = CKKSAggregation("compact", bound=1.0)
    b = CKKSAggregation("compact", bound=1.0)
    assert a.keys.key_id != b.keys.key_id
    state = a.state_dict()
    assert state == {"preset": "compact"} and len(json.dumps(state)) < 100
    b.load_state_dict(state)
    with pytest.raises(ValueError, match="preset"):
        CKKSAggregation("precise", bound=1.0, keys=keysets["precise"][0]).load_state_dict(state)
    with pytest.raises(ValueError, match="keys are for preset"):
        CKKSAggregation("precise", bound=1.0, keys=keysets["compact"][0])


# --------------------------------------------------------------------------------------------
# payloads: bytes, sizes, presets


def test_payload_is_bytes_and_report_matches(keysets):
    n = 2048 * 128  # one full chunk of 128 ciphertexts
    sizes = {"precise": (31.0, 32.5), "compact": (25.5, 27.5)}
    for name, (lo, hi) in sizes.items():
        d = CKKSAggregation(name, bound=1.0, keys=keysets[name][0], measure_error=True)
        ctx = ctx_for([0.5, 0.5])
        ups = [make_update([n // 2, n // 2], 0.05, s) for s in range(2)]
        payloads = [d.protect(u, ctx.for_client(i)) for i, u in enumerate(ups)]
        assert all(type(p) is bytes for p in payloads)
        d.aggregate(payloads, ctx)
        r = d.last_report
        assert r.bytes_per_client == {0: len(payloads[0]), 1: len(payloads[1])}
        assert r.ciphertexts_per_client == 128 and r.params == n
        assert lo <= r.bytes_per_param <= hi, (name, r.bytes_per_param)
        assert r.bytes_per_param <= 35.0
        assert r.relative_error <= PRESETS[name].error_target
        assert set(r.protect_seconds) == {0, 1} and r.aggregate_seconds > 0 and r.decrypt_seconds > 0


def test_compact_error_and_bytes_per_param(keysets):
    keys = keysets["compact"][1]
    client, server = CKKSClient(keys.client_context), CKKSServer(keys.server_context)
    vecs = [torch.empty(300_000).uniform_(-1, 1) for _ in range(3)]
    spec = flatten({"v": vecs[0]})[1]
    w = [0.2, 0.3, 0.5]
    payloads = [client.encrypt_vector(v, spec, weight=wi, bound=1.0) for v, wi in zip(vecs, w)]
    mean, _ = client.decrypt_vector(server.aggregate(payloads, w))
    ref = sum(wi * v.double() for wi, v in zip(w, vecs))
    err = float((mean - ref).abs().max())
    m = max(float(v.abs().max()) for v in vecs)
    assert err <= PRESETS["compact"].max_abs_error(1.0, 3) and err <= 1e-4 * m
    assert max(len(p) for p in payloads) / 300_000 <= 35.0


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_updates_raise(keysets):
    d = CKKSAggregation("precise", bound=1.0, keys=keysets["precise"][0])
    ctx = ctx_for([1.0]).for_client(0)
    with pytest.raises(InvalidUpdateError, match="NaN or inf.*'b'"):
        d.protect({"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")])}, ctx)
    with pytest.raises(InvalidUpdateError, match="NaN or inf"):
        d.protect({"a": torch.tensor([float("inf")])}, ctx)
    with pytest.raises(InvalidUpdateError, match="num_batches_tracked.*only floating entries"):
        d.protect({"a": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(3)}, ctx)
    with pytest.raises(InvalidUpdateError, match="dict"):
        d.protect([torch.zeros(3)], ctx)  # type: ignore[arg-type]
    with pytest.raises(InvalidUpdateError, match="empty"):
        d.protect({"a": torch.zeros(0)}, ctx)
    with pytest.raises(ValueError, match="above the representable"):
        d.protect({"a": torch.tensor([0.5, 33.0])}, ctx)
    with pytest.raises(ValueError, match="for_client"):
        d.protect({"a": torch.zeros(3)}, ctx_for([1.0]))
    with pytest.raises(ValueError, match="needs a public bound"):
        CKKSAggregation("precise", keys=keysets["precise"][0]).protect({"a": torch.zeros(3)}, ctx)
    with pytest.raises(ValueError, match="positive finite"):
        CKKSAggregation("precise", bound=float("nan"), keys=keysets["precise"][0])
    with pytest.raises(ValueError, match="unknown CKKS preset"):
        CKKSAggregation("tiny")
    client = CKKSClient(keysets["precise"][0].client_context)
    with pytest.raises(ValueError, match="weight"):
        client.encrypt({"a": torch.zeros(3)}, weight=1.5, bound=1.0)


def test_mismatched_payloads_raise(keysets):
    k0, k1 = keysets["precise"]
    c0, c1 = CKKSClient(k0.client_context), CKKSClient(k1.client_context)
    server = CKKSServer(k0.server_context)
    u = {"a": torch.randn(50), "b": torch.randn(20)}
    good = c0.encrypt(u, weight=0.5, bound=8.0)
    cases = {
        "key": c1.encrypt(u, weight=0.5, bound=8.0),
        "layout": c0.encrypt({"a": torch.randn(50), "c": torch.randn(20)}, weight=0.5, bound=8.0),
        "bound": c0.encrypt(u, weight=0.5, bound=4.0),
        "round's weight": c0.encrypt(u, weight=0.25, bound=8.0),
        "truncated": good[:-10],
        "bad magic": b"not a payload" + good,
        "expected bytes": {"a": torch.zeros(3)},
    }
    for match, bad in cases.items():
        with pytest.raises(CKKSPayloadError, match=match):
            server.aggregate([good, bad], [0.5, 0.5])
    compact_payload = CKKSClient(keysets["compact"][0].client_context).encrypt(u, weight=0.5, bound=8.0)
    with pytest.raises(CKKSPayloadError, match="key"):
        server.aggregate([good, compact_payload], [0.5, 0.5])
    with pytest.raises(CKKSPayloadError, match="key"):  # a key holder of another key set refuses too
        c1.decrypt(server.aggregate([good, c0.encrypt(u, weight=0.5, bound=8.0)], [0.5, 0.5]))
    with pytest.raises(ValueError, match="sum to"):
        server.aggregate([c0.encrypt(u, weight=0.9, bound=8.0) for _ in range(2)])


# --------------------------------------------------------------------------------------------
# inside a pipeline


def test_inside_compose_with_distributed_noise():
    def pipeline(last):
        stages = [
            ClipUpdate(1.0),
            GaussianMechanism(noise_multiplier=0.5, placement="distributed", noise=SeededNoise(0)),
        ]
        return Compose(*stages, *([last] if last is not None else []))

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "without a secure aggregator" warning
        warnings.filterwarnings("ignore", message=".*not cryptographically secure")
        warnings.filterwarnings("ignore", message="GaussianMechanism\\(placement='distributed'\\)")
        ckks = CKKSAggregation("precise", measure_error=True)
        defense = pipeline(ckks)
    with pytest.warns(UserWarning, match="without a secure aggregator"):  # the same pipeline in the clear
        plain = pipeline(None)
    assert defense.hides_individual_updates and ckks.bound == 1.0
    assert ckks.bound_source == "GaussianMechanism.sensitivity"
    weights = [0.2, 0.3, 0.5]
    updates = [make_update([400, 300], 0.2, s) for s in range(3)]
    for rnd in range(2):
        ctx = ctx_for(weights, rnd=rnd)
        payloads = [defense.protect(u, ctx.for_client(i)) for i, u in enumerate(updates)]
        assert all(isinstance(p, bytes) for p in payloads)
        out = defense.aggregate(payloads, ctx)
        ref = plain.aggregate([plain.protect(u, ctx.for_client(i)) for i, u in enumerate(updates)], ctx)
        bound = PRESETS["precise"].max_abs_error(1.0, 3)
        assert max_diff(out, ref) <= bound + 2.0**-23 * max_abs(ref) + 1e-7
        assert ckks.last_report.max_abs_error <= bound
    assert defense.accountant.steps == 2  # the Gaussian stage accounted both rounds after CKKS aggregated
    assert math.isfinite(float(defense.accountant.epsilon(1e-5)))
    with pytest.raises(ValueError, match="last stage"):
        Compose(CKKSAggregation("compact", bound=1.0), ClipUpdate(1.0))


def test_bench_smoke():
    from privfl.bench.he import run_benchmark

    result = run_benchmark(params=30_000, clients=3, dropouts=1, anchor_params=10_000)
    names = [r["recipe"] for r in result["rows"]]
    assert names == ["precise", "compact"] and result["senders"] == 2
    a = result["anchor"]
    assert a["extrapolated"] and a["measured_params"] <= 10_000 and a["ciphertexts_per_client"] >= 8
    for r in result["rows"]:
        assert r["error_ok"] and r["bytes_per_param"] > 20
        assert r["protect_speedup_vs_anchor"] > 0 and r["bytes_ratio_vs_anchor"] > 1


def test_keys_from_distributed_contexts():
    from privfl.defenses.ckks import CKKSKeys, CKKSPayloadError

    keys = CKKSKeys.generate("compact")
    again = CKKSKeys.from_contexts(keys.client_context, keys.server_context)
    assert again.key_id == keys.key_id and again.preset == keys.preset
    other = CKKSKeys.generate("compact")
    with pytest.raises(CKKSPayloadError, match="different keys"):
        CKKSKeys.from_contexts(keys.client_context, other.server_context)
    with pytest.raises(CKKSPayloadError, match="must hold the secret key"):
        CKKSKeys.from_contexts(keys.server_context, keys.server_context)
