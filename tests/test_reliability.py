"""Bad input never crashes or hangs privfl: every row of docs/reliability.md is one test here.

Each case ends in a clean :class:`privfl.errors.PrivflError` subclass naming what was wrong (or, for
the fuzzed payloads, in a result the protocol allows), with the server's state unchanged.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import ctx_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfl.defenses import ClipUpdate, Compose, GaussianMechanism
from privfl.defenses.base import Defense
from privfl.defenses.ckks import CKKSClient, CKKSKeys, CKKSPayloadError, CKKSServer
from privfl.defenses.rng import SeededNoise
from privfl.defenses.secagg import SecAggClient, SecAggConfig, SecAggServer, SecureAggregation
from privfl.defenses.secagg.protocol import decode
from privfl.errors import PayloadTooLargeError, PrivflError
from privfl.fl import ClientConfig, run_federated
from privfl.fl.server import Server
from privfl.updates import InvalidUpdateError, flatten

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------ updates


def _state():
    return {"w": torch.zeros(3, 4), "b": torch.zeros(4), "steps": torch.zeros((), dtype=torch.long)}


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"w": torch.full((3, 4), float("nan"))}, "non-finite values"),
        ({"w": torch.full((3, 4), float("inf"))}, "non-finite values"),
        ({"w": torch.zeros(3, 4, dtype=torch.float64)}, "dtype torch.float64"),
        ({"w": torch.zeros(3, 4, device="meta")}, "device meta"),
        ({"w": torch.zeros(4, 3)}, r"shape \(4, 3\)"),
        ({"nope": torch.zeros(1)}, "unexpected key"),
        ({"w": np.zeros((3, 4), dtype=np.float32)}, "expected a torch.Tensor"),
    ],
)
def test_bad_update_is_refused_naming_client_and_entry_and_nothing_is_applied(bad, reason):
    server = Server(_state(), ClipUpdate(100.0), 2)
    before = copy.deepcopy(server.global_state)
    good = {"w": torch.ones(3, 4)}
    with pytest.raises(InvalidUpdateError, match=f"client 1: update\\[.*{reason}"):
        server.aggregate([good, bad], ctx_for(2))
    assert all(torch.equal(before[k], server.global_state[k]) for k in before)


def test_defenses_refuse_non_finite_and_integer_updates_before_noising():
    pipe = Compose(ClipUpdate(1.0), GaussianMechanism(noise_multiplier=1.0, noise=SeededNoise(0)))
    ctx = ctx_for(2).for_client(0)
    with pytest.raises(InvalidUpdateError, match="NaN or inf"):
        pipe.protect({"w": torch.tensor([1.0, float("nan")])}, ctx)
    with pytest.raises(InvalidUpdateError, match="only floating entries"):
        pipe.protect({"steps": torch.ones(2, dtype=torch.long)}, ctx)


# ------------------------------------------------------------------------------ CKKS payloads


@pytest.fixture(scope="module")
def ckks():
    keys = CKKSKeys.generate("compact")
    client = CKKSClient(keys.client_context)
    update = {"w": torch.linspace(-0.5, 0.5, 40)}
    payloads = [client.encrypt(update, weight=0.5, bound=1.0) for _ in range(2)]
    return keys, payloads


def _ckks_server(keys, **kw):
    return CKKSServer(keys.server_context, **kw)


def _aggregate_or_refuse(server, payloads, weights=(0.5, 0.5)):
    """The protocol's only two outcomes: an aggregate (bytes), or a PrivflError."""
    try:
        out = server.aggregate(payloads, list(weights))
    except PrivflError:
        return None
    assert isinstance(out, bytes)
    return out


@FUZZ
@given(blob=st.binary(max_size=2048))
def test_ckks_random_bytes_are_refused_cleanly(ckks, blob):
    keys, good = ckks
    with pytest.raises(PrivflError):
        _ckks_server(keys).aggregate([good[0], blob], [0.5, 0.5])


@FUZZ
@given(data=st.data())
def test_ckks_truncated_payloads_are_refused_cleanly(ckks, data):
    keys, good = ckks
    cut = data.draw(st.integers(0, len(good[1]) - 1))
    with pytest.raises(PrivflError):
        _ckks_server(keys).aggregate([good[0], good[1][:cut]], [0.5, 0.5])


@FUZZ
@given(data=st.data())
def test_ckks_bit_flips_are_refused_or_aggregated_never_a_crash(ckks, data):
    """CKKS has no integrity: a flip inside a ciphertext may aggregate (to a wrong sum, as the
    threat model says); anywhere else it is refused. Never another exception, never a crash."""
    keys, good = ckks
    blob = bytearray(good[1])
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    _aggregate_or_refuse(_ckks_server(keys), [good[0], bytes(blob)])


def test_ckks_oversized_and_padded_payloads(ckks):
    keys, good = ckks
    with pytest.raises(PayloadTooLargeError, match="exceed the limit"):
        _ckks_server(keys, max_payload_bytes=len(good[0]) - 1).aggregate(good, [0.5, 0.5])
    with pytest.raises(CKKSPayloadError):
        _ckks_server(keys).aggregate([good[0], good[1] + b"\x00" * 64], [0.5, 0.5])


def test_ckks_replayed_payloads_are_refused(ckks):
    keys, good = ckks
    server = _ckks_server(keys)
    with pytest.raises(CKKSPayloadError, match="identical to payload 0"):
        server.aggregate([good[0], good[0]], [0.5, 0.5])  # one client re-sends another's ciphertext
    server.aggregate(good, [0.5, 0.5])
    with pytest.raises(CKKSPayloadError, match="earlier round"):
        server.aggregate([good[1], None], [0.5, 0.5])  # last round's ciphertext, again
    with pytest.raises(CKKSPayloadError, match="earlier round"):
        server.check_payload(good[0], 0.5)


# ------------------------------------------------------------------------------ secure-aggregation payloads


def _secagg_round(n=3, t=2, length=50):
    cfg = SecAggConfig.create(list(range(n)), [1 / n] * n, t, 1.0, block_words=32)
    server = SecAggServer(cfg)
    clients = {c: SecAggClient(c, threads=1) for c in range(n)}
    for c in clients.values():
        server.receive_advertisement(c.advertise(cfg.to_bytes()).to_bytes())
    keys = server.key_list().to_bytes()
    for c in clients.values():
        server.receive_shares(c.share_keys(keys).to_bytes())
    for c, d in server.share_deliveries().items():
        clients[c].receive_shares(d.to_bytes())
    inputs = {c: clients[c].masked_input(np.linspace(-0.5, 0.5, length)).to_bytes() for c in clients}
    return server, clients, inputs


@FUZZ
@given(blob=st.binary(max_size=1024))
def test_secagg_random_bytes_are_refused_cleanly(blob):
    with pytest.raises(PrivflError):
        decode(blob)
    with pytest.raises(PrivflError):
        SecAggClient.from_state_bytes(blob)


@pytest.fixture(scope="module")
def secagg_inputs():
    return _secagg_round()[2]


@FUZZ
@given(data=st.data())
def test_secagg_truncated_or_flipped_masked_inputs_are_refused(secagg_inputs, data):
    """Every bit of a masked input is covered by its signature: any change is refused, and the
    server's running sum is left as it was."""
    server, _, _ = _secagg_round()  # fresh keys: the fixture's inputs belong to another session
    raw = bytearray(secagg_inputs[1])
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(PrivflError):
        server.receive_masked_input(bytes(raw))
    assert server._acc is None


def test_secagg_replayed_and_oversized_inputs():
    server, clients, inputs = _secagg_round()
    server.receive_masked_input(inputs[0])
    with pytest.raises(PrivflError, match="repeated"):
        server.receive_masked_input(inputs[0])  # the same input twice in a round
    other, _, old = _secagg_round()
    with pytest.raises(PrivflError, match="another session"):
        server.receive_masked_input(old[1])  # an input from another round (fresh session id, keys)
    with pytest.raises(PrivflError, match="trailing"):
        server.receive_masked_input(inputs[1] + b"\x00" * 8)
    # the defense: a size limit checked before parsing
    sa = SecureAggregation(2, clip_range=1.0, max_payload_bytes=100)
    ctx = ctx_for(3)
    sa.before_round(ctx)
    payloads = [sa.protect({"w": torch.zeros(50)}, ctx.for_client(c)) for c in range(3)]
    with pytest.raises(PayloadTooLargeError, match="masked input of client 0"):
        sa.aggregate(payloads, ctx)


def test_flower_payload_limit_is_checked_before_decoding():
    pytest.importorskip("flwr")
    from privfl.integrations.flower.codec import content_to_payload, payload_to_content

    with pytest.raises(PayloadTooLargeError, match="'privfl.bytes'"):
        content_to_payload(payload_to_content(b"x" * 101), max_bytes=100)
    with pytest.raises(PayloadTooLargeError, match="'privfl.state'"):
        content_to_payload(payload_to_content({"w": torch.zeros(100)}), max_bytes=100)
    assert content_to_payload(payload_to_content(b"x" * 100), max_bytes=100) == b"x" * 100


# ------------------------------------------------------------------------------ a crash mid-round


class _CrashOnce(Defense):
    """Clipping that crashes (once) while protecting client 1's update in round 2: mid-round, after
    client 0 has trained and been protected."""

    crashed = False

    def __init__(self):
        self.clip = ClipUpdate(0.5)

    def protect(self, update, ctx):
        if ctx.round == 2 and ctx.client_id == 1 and not _CrashOnce.crashed:
            _CrashOnce.crashed = True
            raise KeyboardInterrupt  # the process dies here
        return self.clip.protect(update, ctx)

    def aggregate(self, payloads, ctx):
        return self.clip.aggregate(payloads, ctx)


def test_crash_mid_round_then_resume_loses_no_round_and_applies_none_twice(tmp_path):
    from privfl.data import SyntheticHistology, partition
    from privfl.models import build_model

    def setup():
        torch.manual_seed(0)
        data = SyntheticHistology(12, size=32, seed=0, sites=3)
        return build_model("unet-tiny", num_classes=4), partition(data, "by_site", 3, seed=0)

    cfg = ClientConfig(local_steps=1, batch_size=2)
    model, clients = setup()
    _CrashOnce.crashed = True  # the reference run does not crash
    full = run_federated(
        model, clients, None, 4, config=cfg, defense=_CrashOnce(), seed=1, progress=False, val_fraction=0.0
    )
    _CrashOnce.crashed = False
    model, clients = setup()
    with pytest.raises(KeyboardInterrupt):
        run_federated(
            model,
            clients,
            None,
            4,
            config=cfg,
            defense=_CrashOnce(),
            seed=1,
            progress=False,
            val_fraction=0.0,
            checkpoint_dir=tmp_path,
        )
    model, clients = setup()
    resumed = run_federated(
        model,
        clients,
        None,
        4,
        config=cfg,
        defense=_CrashOnce(),
        seed=1,
        progress=False,
        val_fraction=0.0,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3]
    for k, v in full.global_state.items():
        assert torch.equal(v, resumed.global_state[k]), k
    assert (
        flatten({k: v for k, v in resumed.global_state.items() if v.is_floating_point()})[0].isfinite().all()
    )


def test_every_row_of_the_reliability_table_names_tests_that_exist():
    """docs/reliability.md: each row names the tests behind it; each named test is defined."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = [
        line
        for line in (root / "docs" / "reliability.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| case") and not line.startswith("| ---")
    ]
    assert len(rows) >= 15
    defined = {
        m
        for f in (root / "tests").rglob("test_*.py")
        for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)
    }
    for row in rows:
        tests = re.findall(r"`(test_\w+)`", row)
        files = re.findall(r"`tests/([\w/]+)\.py`", row)
        assert tests or files, f"row without a test: {row[:80]}"
        missing = [t for t in tests if t not in defined]
        missing += [f for f in files if not (root / "tests" / f"{f}.py").exists()]
        assert not missing, f"{missing} named in docs/reliability.md do not exist"
