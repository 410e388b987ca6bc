"""The secure-aggregation protocol (rounds, messages as bytes, dropouts, tampering, Bonawitz's rule)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.defenses.secagg import crypto
from privfl.defenses.secagg.errors import (
    InsufficientClientsError,
    OverflowRiskError,
    SecAggIntegrityError,
    SecAggProtocolError,
)
from privfl.defenses.secagg.protocol import (
    AdvertiseKeys,
    EncryptedShare,
    KeyList,
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    decode,
)
from privfl.defenses.secagg.quantize import dequantize, quantize

BW = 32  # small blocks so that short vectors span several blocks


class Round:
    """Drives one protocol round through bytes, step by step."""

    def __init__(self, ids, weights, t, clip_range=1.0, scale_bits=None, known=None, signing=None):
        self.cfg = SecAggConfig.create(ids, weights, t, clip_range, scale_bits, block_words=BW)
        self.server = SecAggServer(self.cfg, known_signing_keys=known)
        signing = signing or {}
        self.clients = {
            c: SecAggClient(c, signing_key=signing.get(c), known_signing_keys=known, threads=2) for c in ids
        }
        self.ids = list(ids)

    def setup(self):
        cfg = self.cfg.to_bytes()
        for c in self.ids:
            self.server.receive_advertisement(self.clients[c].advertise(cfg).to_bytes())
        keys = self.server.key_list().to_bytes()
        for c in self.ids:
            self.server.receive_shares(self.clients[c].share_keys(keys).to_bytes())
        self.deliveries = self.server.share_deliveries()
        for c, d in self.deliveries.items():
            self.clients[c].receive_shares(d.to_bytes())
        return self

    def send_inputs(self, updates, senders):
        self.payloads = {c: self.clients[c].masked_input(updates[c]).to_bytes() for c in senders}
        for c in senders:
            self.server.receive_masked_input(self.payloads[c])

    def unmask(self, responders):
        request = self.server.unmask_request().to_bytes()
        for c in responders:
            self.server.receive_unmask_response(self.clients[c].unmask(request).to_bytes())
        return self.server.finish()


def _updates(rng, ids, n, spread=0.5):
    return {c: (rng.standard_normal(n) * spread).astype(np.float32) for c in ids}


def _expected(cfg, updates, survivors):
    q = [quantize(updates[c], cfg.weight_of(c), cfg.clip_range, cfg.scale_bits) for c in survivors]
    return sum(x for x, _ in q), sum(s for _, s in q)


def _assert_exact(cfg, result, updates, survivors):
    int_sum, saturated = _expected(cfg, updates, survivors)
    np.testing.assert_array_equal(result.sum.astype(np.int64), int_sum)  # exact integer sum
    assert result.saturated == saturated
    w = sum(cfg.weight_of(c) for c in survivors)
    assert result.weight_total == pytest.approx(w, abs=1e-15)
    mean = result.mean(np.float64)
    np.testing.assert_array_equal(
        mean, int_sum.astype(np.float64) / (result.weight_total * 2.0**cfg.scale_bits)
    )
    ref = (
        sum(
            cfg.weight_of(c) * np.clip(updates[c].astype(np.float64), -cfg.clip_range, cfg.clip_range)
            for c in survivors
        )
        / w
    )
    assert np.max(np.abs(mean - ref)) <= result.max_error * (1 + 1e-9)


# ------------------------------------------------------------------------------ acceptance: dropouts

IDS5 = [0, 1, 2, 3, 4]
W5 = [0.1, 0.3, 0.2, 0.25, 0.15]


def test_two_drop_after_sharing_keys_exact_sum_of_three_survivors():
    rng = np.random.default_rng(0)
    r = Round(IDS5, W5, 3).setup()
    ups = _updates(rng, IDS5, 300)
    r.send_inputs(ups, [0, 2, 4])  # 1 and 3 masked nothing / sent nothing: dropped before input
    result = r.unmask([0, 2, 4])
    assert result.survivors == (0, 2, 4) and result.dropped_before_input == (1, 3)
    _assert_exact(r.cfg, result, ups, [0, 2, 4])


def test_three_drop_after_sharing_keys_raises_before_anything_is_revealed():
    r = Round(IDS5, W5, 3).setup()
    r.send_inputs(_updates(np.random.default_rng(1), IDS5, 50), [0, 4])
    with pytest.raises(InsufficientClientsError, match="only 2 of 5 clients sent masked inputs, threshold 3"):
        r.server.unmask_request()
    assert r.server.phase == "aborted" and r.server._acc is None
    assert all(not c._revealed for c in r.clients.values())  # no client was asked for a share
    with pytest.raises(SecAggProtocolError):
        r.server.finish()


def test_two_drop_before_unmasking_their_inputs_count():
    rng = np.random.default_rng(2)
    r = Round(IDS5, W5, 3).setup()
    ups = _updates(rng, IDS5, 257)
    r.send_inputs(ups, IDS5)
    result = r.unmask([1, 2, 4])
    assert result.dropped_before_unmask == (0, 3) and result.survivors == tuple(IDS5)
    _assert_exact(r.cfg, result, ups, IDS5)


def test_three_drop_before_unmasking_raises():
    r = Round(IDS5, W5, 3).setup()
    r.send_inputs(_updates(np.random.default_rng(3), IDS5, 20), IDS5)
    with pytest.raises(InsufficientClientsError, match="only 2 clients answered"):
        r.unmask([1, 2])


def test_mixed_dropouts():
    rng = np.random.default_rng(4)
    ids = [3, 10, 11, 40, 41, 99]
    r = Round(ids, [1 / 6] * 6, 3).setup()
    ups = _updates(rng, ids, 100)
    r.send_inputs(ups, [3, 11, 40, 99])  # 10 and 41 drop before input
    result = r.unmask([3, 40, 99])  # 11 drops before unmasking
    _assert_exact(r.cfg, result, ups, [3, 11, 40, 99])


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_exact_sum_property(data):
    n = data.draw(st.integers(2, 6), label="clients")
    t = data.draw(st.integers(2, n), label="threshold")
    ids = data.draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n, unique=True), label="ids")
    weights = data.draw(st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n), label="weights")
    total = sum(weights)
    weights = [w / total for w in weights]
    senders = data.draw(st.lists(st.sampled_from(ids), min_size=t, max_size=n, unique=True), label="senders")
    responders = data.draw(
        st.lists(st.sampled_from(senders), min_size=t, max_size=len(senders), unique=True), label="responders"
    )
    length = data.draw(st.integers(1, 120), label="length")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    clip = data.draw(st.sampled_from([0.5, 1.0, 3.0]), label="clip")
    rng = np.random.default_rng(seed)
    r = Round(ids, weights, t, clip_range=clip).setup()
    ups = _updates(rng, ids, length, spread=1.0)  # some coordinates beyond the clip range: saturated
    r.send_inputs(ups, senders)
    result = r.unmask(responders)
    _assert_exact(r.cfg, result, ups, senders)


def test_extreme_inputs_do_not_wrap():
    """All clients at +R (or -R) everywhere: the sum reaches the bound and still decodes exactly."""
    ids = list(range(6))
    r = Round(ids, [1 / 6] * 6, 2, clip_range=2.0).setup()
    ups = {c: np.array([2.0, -2.0, 5.0, -5.0] * 10, dtype=np.float32) for c in ids}
    r.send_inputs(ups, ids)
    result = r.unmask(ids)
    _assert_exact(r.cfg, result, ups, ids)
    assert result.saturated == 6 * 20
    assert int(np.abs(result.sum.astype(np.int64)).max()) > 2**30  # near the int32 edge, not past it


def test_overflowing_configuration_refused():
    with pytest.raises(OverflowRiskError):
        SecAggConfig.create([0, 1, 2], [1.0, 1.0, 1.0], 2, 1.0, scale_bits=30)  # unweighted 3·2^30 > 2^31
    SecAggConfig.create([0, 1, 2], [1.0, 1.0, 1.0], 2, 1.0, scale_bits=29)


# ------------------------------------------------------------------------------ tampering


def test_tampered_share_detected_by_recipient():
    r = Round(IDS5, W5, 3)
    cfg = r.cfg.to_bytes()
    for c in IDS5:
        r.server.receive_advertisement(r.clients[c].advertise(cfg))
    keys = r.server.key_list()
    for c in IDS5:
        r.server.receive_shares(r.clients[c].share_keys(keys))
    deliveries = r.server.share_deliveries()
    d = deliveries[2]
    e = d.shares[1]
    bad_ct = bytearray(e.ciphertext)
    bad_ct[40] ^= 0x04
    tampered = ShareDelivery(
        d.session_id,
        d.recipient,
        (d.shares[0], EncryptedShare(e.sender, e.recipient, bytes(bad_ct)), *d.shares[2:]),
    )
    with pytest.raises(SecAggIntegrityError, match=f"shares from client {e.sender} to client 2"):
        r.clients[2].receive_shares(tampered.to_bytes())
    assert r.clients[2].phase == "aborted"
    # a share re-addressed to another client fails too (the AEAD key and associated data bind both ids)
    swapped = ShareDelivery(d.session_id, 3, d.shares)
    with pytest.raises((SecAggIntegrityError, SecAggProtocolError)):
        r.clients[3].receive_shares(swapped)


def test_tampered_masked_input_rejected_and_rolled_back():
    rng = np.random.default_rng(5)
    r = Round(IDS5, W5, 3).setup()
    ups = _updates(rng, IDS5, 100)
    honest = {c: r.clients[c].masked_input(ups[c]).to_bytes() for c in IDS5}
    for c in (0, 1):
        r.server.receive_masked_input(honest[c])
    bad = bytearray(honest[2])
    bad[6 + 32 + 16 + 4 * 37] ^= 0x01  # one bit of one word
    with pytest.raises(SecAggIntegrityError, match="masked input of client 2"):
        r.server.receive_masked_input(bytes(bad))
    forged = bytearray(honest[3])
    forged[-1] ^= 0x80  # the signature itself
    with pytest.raises(SecAggIntegrityError):
        r.server.receive_masked_input(bytes(forged))
    for c in (2, 3, 4):  # the server's running sum was restored: the honest inputs still add up exactly
        r.server.receive_masked_input(honest[c])
    result = r.unmask(IDS5)
    _assert_exact(r.cfg, result, ups, IDS5)


def test_masked_input_from_one_client_cannot_be_claimed_by_another():
    r = Round(IDS5, W5, 3).setup()
    msg = MaskedInput.from_bytes(r.clients[1].masked_input(np.zeros(10, np.float32)).to_bytes())
    stolen = dataclasses.replace(msg, client_id=2)
    with pytest.raises(SecAggIntegrityError):
        r.server.receive_masked_input(stolen.to_bytes())


def _signed_lie(r, liar_id: int, request, about: int) -> UnmaskResponse:
    """Client ``liar_id``'s unmask response with one bit of its share of ``b_about`` flipped, validly
    signed: only the Shamir consistency check or the commitment can catch it."""
    honest = r.clients[liar_id].unmask(request)
    b = dict(honest.b_shares)
    share = bytearray(b[about])
    share[-1] ^= 1
    b[about] = bytes(share)
    lie = UnmaskResponse(honest.session_id, honest.client_id, tuple(sorted(b.items())), honest.s_shares)
    return dataclasses.replace(lie, signature=crypto.sign(r.clients[liar_id]._sign_key, lie.signed_payload()))


def test_tampered_unmask_response_and_lying_client_detected():
    rng = np.random.default_rng(6)
    r = Round(IDS5, W5, 3).setup()
    ups = _updates(rng, IDS5, 40)
    r.send_inputs(ups, [0, 1, 2, 3])  # client 4 dropped before input
    request = r.server.unmask_request()
    resp = r.clients[0].unmask(request)
    raw = bytearray(resp.to_bytes())
    raw[60] ^= 1
    with pytest.raises((SecAggIntegrityError, SecAggProtocolError)):
        r.server.receive_unmask_response(bytes(raw))
    # client 1 lies about its share of b_2 but signs the lie: with 4 responders > t the Shamir
    # consistency check catches it at reconstruction
    lie = _signed_lie(r, 1, request, about=2)
    r.server.receive_unmask_response(resp)
    r.server.receive_unmask_response(lie)
    for c in (2, 3):
        r.server.receive_unmask_response(r.clients[c].unmask(request))
    with pytest.raises(SecAggIntegrityError, match="inconsistent"):
        r.server.finish()


def test_wrong_share_with_exactly_t_responders_caught_by_commitment():
    r = Round(IDS5, W5, 3).setup()
    r.send_inputs(_updates(np.random.default_rng(7), IDS5, 10), IDS5)
    request = r.server.unmask_request()
    r.server.receive_unmask_response(_signed_lie(r, 0, request, about=3))
    for c in (1, 2):
        r.server.receive_unmask_response(r.clients[c].unmask(request))
    with pytest.raises(SecAggIntegrityError, match="commitment"):
        r.server.finish()


def test_corrupted_sum_fails_the_range_check():
    r = Round(IDS5, W5, 3).setup()
    r.send_inputs(_updates(np.random.default_rng(8), IDS5, 64), IDS5)
    r.server._acc[7] += np.uint32(1 << 31)  # e.g. a mask removed with the wrong key
    with pytest.raises(SecAggIntegrityError, match="range"):
        r.unmask(IDS5)


def test_substituted_keys_detected_by_clients():
    r = Round(IDS5, W5, 3)
    cfg = r.cfg.to_bytes()
    adverts = [r.clients[c].advertise(cfg) for c in IDS5]
    for a in adverts:
        r.server.receive_advertisement(a)
    keys = r.server.key_list()
    _, evil_pk = crypto.new_x25519()
    altered = dataclasses.replace(keys.adverts[1], s_public=evil_pk)
    bad = KeyList(keys.session_id, (keys.adverts[0], altered, *keys.adverts[2:]))
    with pytest.raises(SecAggIntegrityError):
        r.clients[1].share_keys(bad)  # its own keys were altered
    with pytest.raises(SecAggIntegrityError, match="advertisement of client 1"):
        r.clients[0].share_keys(bad)  # a peer's signature no longer verifies


def test_known_signing_keys_pki():
    keys = {c: crypto.new_signing_key() for c in IDS5}
    known = {c: crypto.signing_public(k) for c, k in keys.items()}
    r = Round(IDS5, W5, 3, known=known, signing=keys).setup()  # registered keys: accepted
    r.send_inputs(_updates(np.random.default_rng(9), IDS5, 5), IDS5)
    assert r.unmask(IDS5).survivors == tuple(IDS5)
    imposter = Round(IDS5, W5, 3, known=known, signing={**keys, 2: crypto.new_signing_key()})
    cfg = imposter.cfg.to_bytes()
    with pytest.raises(SecAggIntegrityError, match="registered key"):
        imposter.server.receive_advertisement(imposter.clients[2].advertise(cfg))


# ----------------------------------------------------------------------------- Bonawitz's rule, state machine


def test_client_never_reveals_both_shares_of_a_peer():
    r = Round(IDS5, W5, 3).setup()
    r.send_inputs(_updates(np.random.default_rng(10), IDS5, 5), IDS5)
    sid = r.cfg.session_id
    client = r.clients[0]
    first = client.unmask(UnmaskRequest(sid, (0, 1, 2, 3, 4)))  # b-shares of everyone
    assert [o for o, _ in first.b_shares] == IDS5 and first.s_shares == ()
    with pytest.raises(SecAggProtocolError, match="refuses"):
        client.unmask(UnmaskRequest(sid, (0, 1, 2, 3)))  # now claims 4 dropped: would reveal s-share of 4
    again = client.unmask(UnmaskRequest(sid, (0, 1, 2, 3, 4)))  # the same story is fine
    assert again.b_shares == first.b_shares

    other = r.clients[1]
    other.unmask(UnmaskRequest(sid, (0, 1, 2)))  # s-shares of 3 and 4
    with pytest.raises(SecAggProtocolError, match="refuses"):
        other.unmask(UnmaskRequest(sid, (0, 1, 2, 3)))  # would reveal b-share of 3
    assert other._revealed == {0: "b", 1: "b", 2: "b", 3: "s", 4: "s"}


@pytest.mark.parametrize(
    "survivors,error",
    [
        ((1, 2, 3), SecAggProtocolError),  # the client itself is not listed
        ((0, 1, 2, 3, 4, 9), SecAggProtocolError),  # not a subset of U2
        ((0, 1), InsufficientClientsError),  # fewer than t
    ],
)
def test_client_refuses_bad_unmask_requests(survivors, error):
    r = Round(IDS5, W5, 3).setup()
    r.send_inputs(_updates(np.random.default_rng(11), IDS5, 5), IDS5)
    with pytest.raises(error):
        r.clients[0].unmask(UnmaskRequest(r.cfg.session_id, survivors))
    assert r.clients[0]._revealed == {}


def test_state_machine_and_replays():
    r = Round(IDS5, W5, 3).setup()
    c = r.clients[0]
    with pytest.raises(SecAggProtocolError):
        c.unmask(UnmaskRequest(r.cfg.session_id, tuple(IDS5)))  # before masking
    c.masked_input(np.zeros(4, np.float32))
    with pytest.raises(SecAggProtocolError, match="masked_input called in phase 'masked'"):
        c.masked_input(np.zeros(4, np.float32))  # mask reuse would leak the difference of two inputs
    with pytest.raises(SecAggProtocolError):
        r.server.receive_advertisement(b"junk")
    other = Round(IDS5, W5, 3).setup()
    payload = other.clients[1].masked_input(np.zeros(4, np.float32)).to_bytes()
    with pytest.raises(SecAggProtocolError, match="another session"):
        r.server.receive_masked_input(payload)
    p1 = r.clients[1].masked_input(np.zeros(4, np.float32)).to_bytes()
    r.server.receive_masked_input(p1)
    with pytest.raises(SecAggProtocolError, match="repeated"):
        r.server.receive_masked_input(p1)
    p2 = r.clients[2].masked_input(np.zeros(5, np.float32)).to_bytes()
    with pytest.raises(SecAggProtocolError, match="parameters"):
        r.server.receive_masked_input(p2)


def test_too_few_clients_at_setup_abort():
    r = Round(IDS5, W5, 3)
    cfg = r.cfg.to_bytes()
    for c in (0, 1):
        r.server.receive_advertisement(r.clients[c].advertise(cfg))
    with pytest.raises(InsufficientClientsError, match="advertised"):
        r.server.key_list()


# ------------------------------------------------------------------------------ messages as bytes


def test_every_message_round_trips_through_bytes():
    r = Round(IDS5, W5, 3)
    cfg = r.cfg
    assert SecAggConfig.from_bytes(cfg.to_bytes()) == cfg
    msgs = []
    for c in IDS5:
        a = r.clients[c].advertise(cfg.to_bytes())
        msgs.append(a)
        r.server.receive_advertisement(a)
    keys = r.server.key_list()
    msgs.append(keys)
    for c in IDS5:
        s = r.clients[c].share_keys(keys.to_bytes())
        msgs.append(s)
        r.server.receive_shares(s)
    deliveries = r.server.share_deliveries()
    msgs.extend(deliveries.values())
    for c, d in deliveries.items():
        r.clients[c].receive_shares(d)
    inputs = {c: r.clients[c].masked_input(np.linspace(-1, 1, 70, dtype=np.float32)) for c in IDS5}
    for m in inputs.values():
        r.server.receive_masked_input(m)  # as objects
    request = r.server.unmask_request()
    msgs.append(request)
    msgs.extend(r.clients[c].unmask(request) for c in IDS5)
    kinds = set()
    for m in msgs:
        raw = m.to_bytes()
        back = type(m).from_bytes(raw)
        assert back == m and decode(raw) == m and back.to_bytes() == raw
        kinds.add(type(m))
    assert kinds == {AdvertiseKeys, KeyList, ShareKeys, ShareDelivery, UnmaskRequest, UnmaskResponse}
    for m in inputs.values():
        raw = m.to_bytes()
        assert len(raw) == 4 * 70 + MaskedInput.OVERHEAD
        back = decode(raw)
        assert isinstance(back, MaskedInput) and back.to_bytes() == raw
        np.testing.assert_array_equal(back.data, m.data)
    with pytest.raises(SecAggProtocolError, match="truncated"):
        ShareKeys.from_bytes(msgs[6].to_bytes()[:-70])
    with pytest.raises(SecAggProtocolError, match="trailing"):
        UnmaskRequest.from_bytes(request.to_bytes() + b"\x00")
    with pytest.raises(SecAggProtocolError, match="expected a KeyList"):
        KeyList.from_bytes(request.to_bytes())


def test_dequantized_mean_helper_matches():
    s = np.array([3, -4, 1 << 20], dtype=np.int32)
    np.testing.assert_array_equal(dequantize(s, 10, 0.5, np.float64), s / (0.5 * 1024))


# ------------------------------------------------------------------------------ client state across processes


def _restored(client):
    """The client as a fresh process would see it: only its saved state bytes survive."""
    return SecAggClient.from_state_bytes(client.state_bytes(), threads=2)


def test_client_restored_from_state_bytes_at_every_step_gives_the_same_sum():
    """A client that saves its state after every step and is rebuilt from the bytes (a Flower
    ClientApp in a fresh process) completes the round with an exact sum, dropouts included."""
    rng = np.random.default_rng(11)
    r = Round(IDS5, W5, 3)
    ups = _updates(rng, IDS5, 90)
    cfg = r.cfg.to_bytes()
    for c in IDS5:
        r.server.receive_advertisement(r.clients[c].advertise(cfg).to_bytes())
        r.clients[c] = _restored(r.clients[c])
    keys = r.server.key_list().to_bytes()
    for c in IDS5:
        r.server.receive_shares(r.clients[c].share_keys(keys).to_bytes())
        r.clients[c] = _restored(r.clients[c])
    for c, d in r.server.share_deliveries().items():
        r.clients[c].receive_shares(d.to_bytes())
        r.clients[c] = _restored(r.clients[c])
    senders = [0, 1, 2, 4]  # 3 drops before its input: its s^SK shares are revealed by the others
    for c in senders:
        r.server.receive_masked_input(r.clients[c].masked_input(ups[c]).to_bytes())
        r.clients[c] = _restored(r.clients[c])
    assert r.clients[0].phase == "masked" and r.clients[0].saturated == 0
    result = r.unmask([0, 2, 4])
    assert result.dropped_before_input == (3,)
    _assert_exact(r.cfg, result, ups, senders)


def test_restored_client_keeps_forward_secrecy_and_bonawitz_rule():
    r = Round(IDS5, W5, 3).setup()
    before = r.clients[0].state_bytes()
    assert r.clients[0]._s_sk in before and r.clients[0]._seed in before  # secrets are in it: keep it local
    r.send_inputs(_updates(np.random.default_rng(12), IDS5, 20), [0, 1, 2, 3])
    after = r.clients[0].state_bytes()
    assert len(after) < len(
        before
    )  # s^SK, b and the mask keys are deleted after masking, so not saved either
    restored = _restored(r.clients[0])
    assert (
        "_s_sk" not in restored.__dict__
        and "_seed" not in restored.__dict__
        and "_terms" not in restored.__dict__
    )
    assert restored.state_bytes() == after
    restored.unmask(UnmaskRequest(r.cfg.session_id, (0, 1, 2, 3)))  # reveals b-shares of 0..3
    again = _restored(restored)
    with pytest.raises(SecAggProtocolError, match="already revealed its share of b_3"):
        again.unmask(UnmaskRequest(r.cfg.session_id, (0, 1, 2)))  # would reveal 3's s^SK share too


@pytest.mark.parametrize("cut", [0, 5, 7, 40, -1])
def test_malformed_client_state_is_a_protocol_error(cut):
    r = Round(IDS5, W5, 3).setup()
    state = r.clients[2].state_bytes()
    bad = state[:cut] if cut >= 0 else state + b"\x01\x00\x00\x00x"
    with pytest.raises(SecAggProtocolError):
        SecAggClient.from_state_bytes(bad)
    with pytest.raises(SecAggProtocolError, match="not a saved"):
        SecAggClient.from_state_bytes(r.cfg.to_bytes())
