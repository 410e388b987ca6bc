"""``SecureAggregation`` as a Defense: exact weighted mean over the survivors, dropouts, tampering,
Compose with clipping and distributed DP noise, configuration checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.defenses.base import Compose, Defense, RoundContext
from privfl.defenses.dp import ClipUpdate, GaussianMechanism
from privfl.defenses.rng import SeededNoise
from privfl.defenses.secagg import (
    InsufficientClientsError,
    OverflowRiskError,
    SaturationWarning,
    SecAggClient,
    SecAggIntegrityError,
    SecAggProtocolError,
    SecAggTransport,
    SecureAggregation,
)
from privfl.defenses.secagg.protocol import MaskedInput
from privfl.defenses.secagg.quantize import quantize
from privfl.updates import InvalidUpdateError, flatten, unflatten


def _update(g: torch.Generator, scale: float = 0.3, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": (torch.randn(4, 3, 3, generator=g) * scale).to(dtype),
        "conv.bias": (torch.randn(4, generator=g) * scale).to(dtype),
        "fc": (torch.randn(17, generator=g) * scale).to(dtype),
    }


def _ctx(n: int, weights=None, r: int = 0, ids=None) -> RoundContext:
    ids = tuple(ids) if ids is not None else tuple(range(n))
    w = weights if weights is not None else [1.0 / n] * n
    return RoundContext(round=r, num_clients=max(ids) + 1, sampled=ids, weights=tuple(w))


def _run(defense: Defense, updates, ctx, drop_before_input=()):
    defense.before_round(ctx)
    payloads = [
        None if c in drop_before_input else defense.protect(u, ctx.for_client(c))
        for c, u in zip(ctx.sampled, updates)
    ]
    return defense.aggregate(payloads, ctx), payloads


def _check_exact(sa: SecureAggregation, mean, updates, ctx, survivors):
    """The integer sum is exactly the survivors' quantized inputs; the mean is its dequantization."""
    res = sa.last_result
    rep = sa.last_report
    idx = [ctx.sampled.index(c) for c in survivors]
    vecs = [flatten(updates[i])[0].numpy() for i in idx]
    q = sum(quantize(v, ctx.weights[i], rep.clip_range, rep.scale_bits)[0] for v, i in zip(vecs, idx))
    np.testing.assert_array_equal(res.sum.astype(np.int64), q)
    vec, spec = flatten(mean)
    expected = torch.from_numpy(q.astype(np.float64) / (res.weight_total * 2.0**rep.scale_bits)).to(
        spec.dtype
    )
    assert torch.equal(vec, expected)
    w = sum(ctx.weights[i] for i in idx)
    ref = (
        sum(
            ctx.weights[i] * np.clip(v.astype(np.float64), -rep.clip_range, rep.clip_range)
            for v, i in zip(vecs, idx)
        )
        / w
    )
    ulp = np.finfo(vec.numpy().dtype).eps * np.abs(ref)
    assert np.all(np.abs(vec.numpy().astype(np.float64) - ref) <= rep.max_dequantization_error + ulp)


def test_weighted_mean_all_clients_and_report():
    g = torch.Generator().manual_seed(0)
    ups = [_update(g) for _ in range(4)]
    ctx = _ctx(4, [0.1, 0.2, 0.3, 0.4])
    sa = SecureAggregation(3, clip_range=1.0, keep_result=True, block_words=32)
    mean, payloads = _run(sa, ups, ctx)
    assert all(isinstance(p, bytes) and len(p) == 4 * 57 + MaskedInput.OVERHEAD for p in payloads)
    assert set(mean) == set(ups[0]) and all(mean[k].shape == ups[0][k].shape for k in mean)
    _check_exact(sa, mean, ups, ctx, ctx.sampled)
    rep = sa.last_report
    assert rep.survivors == (0, 1, 2, 3) and rep.saturated == 0 and rep.scale_bits == 30
    assert rep.max_dequantization_error == pytest.approx(4 / 2**31)
    assert rep.wire_bytes["masked_input"] == 4 * len(payloads[0])


def test_acceptance_five_clients_threshold_three():
    g = torch.Generator().manual_seed(1)
    ups = [_update(g) for _ in range(5)]
    ctx = _ctx(5, [0.15, 0.25, 0.2, 0.3, 0.1])
    sa = SecureAggregation(3, clip_range=1.0, keep_result=True)
    mean, _ = _run(sa, ups, ctx, drop_before_input={1, 3})  # 2 drop after sharing keys
    assert sa.last_report.dropped_before_input == (1, 3)
    _check_exact(sa, mean, ups, ctx, (0, 2, 4))

    report = sa.last_report
    with pytest.raises(InsufficientClientsError, match="only 2 of 5"):
        _run(sa, ups, ctx, drop_before_input={0, 1, 3})  # 3 drop: refused, nothing returned
    assert sa.last_report is report  # no partial report or sum from the failed round


def test_drop_before_unmask_counts_their_input():
    g = torch.Generator().manual_seed(2)
    ups = [_update(g) for _ in range(5)]
    ctx = _ctx(5)
    sa = SecureAggregation(3, clip_range=1.0, keep_result=True, drop_before_unmask={0, 4})
    mean, _ = _run(sa, ups, ctx)
    assert sa.last_report.dropped_before_unmask == (0, 4)
    _check_exact(sa, mean, ups, ctx, ctx.sampled)
    sa.drop_before_unmask = {0, 2, 4}
    with pytest.raises(InsufficientClientsError, match="answered the unmask request"):
        _run(sa, ups, ctx)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_exact_after_dequantization_property(data):
    n = data.draw(st.integers(2, 6), label="clients")
    t = data.draw(st.integers(2, n), label="threshold")
    raw = data.draw(st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n), label="weights")
    weights = [w / sum(raw) for w in raw]
    ids = data.draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n, unique=True), label="ids")
    senders = data.draw(st.lists(st.sampled_from(ids), min_size=t, max_size=n, unique=True), label="senders")
    responders = data.draw(
        st.lists(st.sampled_from(senders), min_size=t, max_size=len(senders), unique=True), label="responders"
    )
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    g = torch.Generator().manual_seed(seed)
    ups = [_update(g, scale=0.5, dtype=dtype) for _ in ids]
    ctx = _ctx(n, weights, ids=ids)
    sa = SecureAggregation(
        t, clip_range=1.0, keep_result=True, block_words=16, drop_before_unmask=set(senders) - set(responders)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SaturationWarning)
        mean, _ = _run(sa, ups, ctx, drop_before_input=set(ids) - set(senders))
    assert all(v.dtype == dtype for v in mean.values())
    _check_exact(sa, mean, ups, ctx, tuple(c for c in ids if c in senders))


def test_inside_compose_with_clipping_and_distributed_noise():
    g = torch.Generator().manual_seed(3)
    ups = [_update(g, scale=1.0) for _ in range(4)]
    ctx = _ctx(4, [0.4, 0.3, 0.2, 0.1])
    sa = SecureAggregation(threshold=2, clip_range=4.0, keep_result=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SeededNoise is not secure: fine for a reproducible test
        gauss = GaussianMechanism(noise_multiplier=0.5, placement="distributed", noise=SeededNoise(0))
        warnings.filterwarnings("error", message=".*secure aggregator")  # SecureAggregation counts as one
        pipeline = Compose(ClipUpdate(1.0), gauss, sa)
    assert pipeline.hides_individual_updates
    pipeline.before_round(ctx)
    payloads = [pipeline.protect(u, ctx.for_client(c)) for c, u in zip(ctx.sampled, ups)]
    mean = pipeline.aggregate(payloads, ctx)  # Compose re-runs before_round first: must not restart the keys
    # what the clients masked: the same clip and (seeded) noise, computed again
    noisy = [
        gauss.protect(ClipUpdate(1.0).protect(u, ctx.for_client(c)), ctx.for_client(c))
        for c, u in zip(ctx.sampled, ups)
    ]
    _check_exact(sa, mean, noisy, ctx, ctx.sampled)
    assert sa.last_report.saturated == 0
    assert gauss.accountant.steps == 1  # finalize ran after the secure aggregate: one round accounted


def test_compose_inherits_clip_range_from_clip_update():
    sa = SecureAggregation(2)
    Compose(ClipUpdate(0.05), sa)
    assert sa.clip_range == 0.05 and "ClipUpdate" in sa.clip_source
    g = torch.Generator().manual_seed(4)
    ups = [_update(g) for _ in range(3)]
    ctx = _ctx(3)
    pipe = Compose(ClipUpdate(0.05, per_layer=True), SecureAggregation(2, keep_result=True))
    pipe.before_round(ctx)
    mean = pipe.aggregate([pipe.protect(u, ctx.for_client(c)) for c, u in enumerate(ups)], ctx)
    assert pipe.stages[-1].last_report.saturated == 0  # an L2 bound C bounds every coordinate by C
    clipped = [ClipUpdate(0.05, per_layer=True).protect(u, ctx) for u in ups]
    _check_exact(pipe.stages[-1], mean, clipped, ctx, ctx.sampled)


def test_compose_with_noise_needs_explicit_clip_range():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gauss = GaussianMechanism(noise_multiplier=1.0, placement="distributed", noise=SeededNoise(0))
        with pytest.raises(ValueError, match="clip_range=R explicitly"):
            Compose(ClipUpdate(1.0), gauss, SecureAggregation(2))
    with pytest.raises(ValueError, match="last stage"):
        Compose(SecureAggregation(2, clip_range=1.0), ClipUpdate(1.0))
    sa = SecureAggregation(2)
    with pytest.raises(ValueError, match="needs clip_range"):
        sa.before_round(_ctx(3))


def test_saturation_counted_and_warned():
    ups = [{"w": torch.tensor([0.5, 3.0, -7.0, 0.1])}, {"w": torch.tensor([2.0, 0.0, 0.0, -0.2])}]
    ctx = _ctx(2)
    sa = SecureAggregation(2, clip_range=1.0, keep_result=True)
    with pytest.warns(SaturationWarning, match="3 coordinates"):
        mean, _ = _run(sa, ups, ctx)
    assert sa.last_report.saturated == 3
    torch.testing.assert_close(mean["w"], torch.tensor([0.75, 0.5, -0.5, -0.05]), atol=1e-8, rtol=0)


def test_overflow_configuration_refused():
    sa = SecureAggregation(2, clip_range=1.0, scale_bits=31)
    with pytest.raises(OverflowRiskError, match="use scale_bits <= 30"):
        sa.before_round(_ctx(3))
    with pytest.raises(ValueError):  # OverflowRiskError is a ValueError
        SecureAggregation(2, clip_range=1.0, scale_bits=32).before_round(_ctx(5))


def test_tampered_or_misplaced_payload_raises():
    g = torch.Generator().manual_seed(5)
    ups = [_update(g) for _ in range(3)]
    ctx = _ctx(3)
    sa = SecureAggregation(2, clip_range=1.0)
    sa.before_round(ctx)
    payloads = [sa.protect(u, ctx.for_client(c)) for c, u in enumerate(ups)]
    bad = bytearray(payloads[1])
    bad[100] ^= 0x10
    with pytest.raises(SecAggIntegrityError, match="masked input of client 1"):
        sa.aggregate([payloads[0], bytes(bad), payloads[2]], ctx)
    with pytest.raises(SecAggProtocolError, match="no secure-aggregation round"):
        sa.aggregate(payloads, ctx)  # the round was aborted; its keys are gone
    sa.before_round(ctx)
    payloads = [sa.protect(u, ctx.for_client(c)) for c, u in enumerate(ups)]
    with pytest.raises(SecAggProtocolError, match="slot"):
        sa.aggregate([payloads[1], payloads[0], payloads[2]], ctx)


def test_client_masks_once_per_round_and_keys_are_fresh_every_round():
    u = {"w": torch.full((8,), 0.25)}
    sa = SecureAggregation(2, clip_range=1.0)
    ctx0, ctx1 = _ctx(2, r=0), _ctx(2, r=1)
    p0, _ = _run_payloads(sa, [u, u], ctx0)
    with pytest.raises(SecAggProtocolError, match="masked_input"):
        sa.protect(u, ctx0.for_client(0))  # reusing the round's masks would leak the difference
    sa.aggregate(p0, ctx0)
    p1, _ = _run_payloads(sa, [u, u], ctx1)
    assert (
        p0[0] != p1[0]
        and MaskedInput.from_bytes(p0[0]).session_id != MaskedInput.from_bytes(p1[0]).session_id
    )
    torch.testing.assert_close(sa.aggregate(p1, ctx1)["w"], u["w"], atol=1e-9, rtol=0)
    assert sa.state_dict() == {} and sa._session is None


def _run_payloads(sa, ups, ctx):
    sa.before_round(ctx)
    return [sa.protect(x, ctx.for_client(c)) for c, x in zip(ctx.sampled, ups)], ctx


def test_bad_arguments_and_updates():
    assert SecureAggregation.hides_individual_updates is True
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="threshold"):
            SecureAggregation(bad, clip_range=1.0)
    for r in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip_range"):
            SecureAggregation(2, clip_range=r)
    with pytest.raises(InsufficientClientsError, match="fewer than the threshold"):
        SecureAggregation(3, clip_range=1.0).before_round(_ctx(2))
    sa = SecureAggregation(2, clip_range=1.0)
    ctx = _ctx(2)
    sa.before_round(ctx)
    with pytest.raises(ValueError, match="ctx.for_client"):
        sa.protect({"w": torch.zeros(3)}, ctx)
    with pytest.raises(InvalidUpdateError, match="num_batches_tracked"):
        sa.protect({"n": torch.tensor(3)}, ctx.for_client(0))
    with pytest.raises(InvalidUpdateError, match="NaN or inf"):
        sa.protect({"w": torch.tensor([0.0, float("nan")])}, ctx.for_client(0))
    sa.protect({"w": torch.zeros(3)}, ctx.for_client(0))
    with pytest.raises(InvalidUpdateError, match="layout"):
        sa.protect({"w": torch.zeros(4)}, ctx.for_client(1))
    with pytest.raises(ValueError, match="payloads"):
        sa.aggregate([None], ctx)


def test_unflatten_roundtrip_of_mean_keeps_structure():
    g = torch.Generator().manual_seed(6)
    ups = [_update(g, dtype=torch.float64) for _ in range(3)]
    sa = SecureAggregation(2, clip_range=1.0)
    mean, _ = _run(sa, ups, _ctx(3))
    vec, spec = flatten(mean)
    assert spec.dtype == torch.float64
    assert unflatten(vec, spec).keys() == ups[0].keys()


# ------------------------------------------------------------------------------ over a transport


class _NetworkOfClients(SecAggTransport):
    """A fault-tolerant transport whose clients live apart from the server's defense: each is a
    separate ``SecureAggregation`` client instance with its own ``SecAggClient``, restored from its
    saved state bytes before every message (as a fresh process would be)."""

    fault_tolerant = True

    def __init__(self, ids, tamper=None, offline=None):
        self.saved = {c: None for c in ids}
        self.tamper, self.offline = tamper or {}, offline or {}  # {step: client}

    def exchange(self, step, messages):
        out = {}
        for c, m in messages.items():
            if self.offline.get(step) == c:
                continue
            client = SecAggClient(c) if step == "advertise" else SecAggClient.from_state_bytes(self.saved[c])
            reply = client.handle(step, m)
            self.saved[c] = client.state_bytes()
            if self.tamper.get(step) == c:
                reply = reply[:-1] + bytes([reply[-1] ^ 1])  # breaks the signature
            out[c] = reply
        return out

    def protect(self, update, ctx):
        client_side = SecureAggregation(3, clip_range=1.0)
        party = SecAggClient.from_state_bytes(self.saved[ctx.client_id])
        client_side.use_client(party)
        payload = client_side.protect(update, ctx)
        self.saved[ctx.client_id] = party.state_bytes()
        return payload, client_side.layout


def _remote_round(transport, updates, ctx, drop_before_input=()):
    server = SecureAggregation(3, clip_range=1.0, keep_result=True, transport=transport)
    server.before_round(ctx)
    payloads, layouts = [], []
    for c, u in zip(ctx.sampled, updates):
        if c in drop_before_input or c not in server.ready_clients:
            payloads.append(None)
            continue
        payload, layout = transport.protect(u, ctx.for_client(c))
        payloads.append(payload)
        layouts.append(layout)
    server.set_layout(layouts[0])
    return server, server.aggregate(payloads, ctx)


def test_remote_clients_give_the_in_process_mean():
    g = torch.Generator().manual_seed(21)
    ups = [_update(g) for _ in range(5)]
    ctx = _ctx(5, [0.1, 0.3, 0.2, 0.25, 0.15])
    server, mean = _remote_round(
        _NetworkOfClients(range(5), offline={"unmask": 4}), ups, ctx, drop_before_input={1}
    )
    assert server.last_report.dropped_before_input == (1,) and server.last_report.dropped_before_unmask == (
        4,
    )
    _check_exact(server, mean, ups, ctx, [0, 2, 3, 4])
    assert server.aggregated_clients == (0, 2, 3, 4) and server.last_report.rejected == {}


@pytest.mark.parametrize(
    "step, culprit, where",
    [("advertise", 2, "clients"), ("share_keys", 3, "ready"), ("unmask", 0, "responders")],
)
def test_remote_client_with_a_bad_message_is_dropped_and_named(step, culprit, where, caplog):
    g = torch.Generator().manual_seed(22)
    ups = [_update(g) for _ in range(5)]
    ctx = _ctx(5)
    server, mean = _remote_round(_NetworkOfClients(range(5), tamper={step: culprit}), ups, ctx)
    rep = server.last_report
    assert "SecAggIntegrityError" in rep.rejected[culprit] and f"client {culprit} dropped" in caplog.text
    survivors = [c for c in range(5) if c != culprit] if step != "unmask" else list(range(5))
    assert list(rep.survivors) == survivors  # an unmask responder's input still counts
    _check_exact(server, mean, ups, ctx, survivors)


def test_remote_server_cannot_protect_and_client_checks_its_round():
    ctx = _ctx(3)
    server = SecureAggregation(2, clip_range=1.0, transport=_NetworkOfClients(range(3)))
    server.before_round(ctx)
    with pytest.raises(SecAggProtocolError, match="protect runs on the clients"):
        server.protect(_update(torch.Generator().manual_seed(0)), ctx.for_client(0))
    client_side = SecureAggregation(2, clip_range=1.0)
    client_side.use_client(SecAggClient.from_state_bytes(server.transport.saved[1]))
    with pytest.raises(SecAggProtocolError, match="another round or client"):
        client_side.protect(_update(torch.Generator().manual_seed(0)), ctx.for_client(2))
    with pytest.raises(SecAggProtocolError, match="layout is unknown"):
        server.aggregate([None, None, None], ctx)
