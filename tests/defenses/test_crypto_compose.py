"""Partial sharing, clipping, distributed DP noise and a cryptographic aggregator in
one Compose, inside run_federated — and the same run in the clear gives the same model up to the
aggregator's stated error."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.data import SyntheticHistology, partition
from privfl.defenses import (
    CKKSAggregation,
    ClipUpdate,
    Compose,
    GaussianMechanism,
    NoDefense,
    PartialSharing,
    SecureAggregation,
    SeededNoise,
)
from privfl.defenses.base import Defense
from privfl.fl import ClientConfig, run_federated
from privfl.models import build_model
from privfl.updates import weighted_mean

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure")

SHARED = ["down.*", "up.*"]  # unet-tiny: share the encoder/decoder trunk, keep `dec*`/`head*` local
CLIP, Z = 0.5, 0.3


class InTheClear(NoDefense):
    """The plain weighted mean (stands in for the aggregator when checking its error)."""

    def aggregate(self, payloads, ctx):
        return weighted_mean(list(payloads), ctx.weights)


def run(aggregator: Defense, rounds: int = 2):
    data = SyntheticHistology(24, size=32, seed=0, sites=3)
    clients = partition(data, "iid", 3, seed=0)
    torch.manual_seed(0)
    model = build_model("unet-tiny", num_classes=4)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    defense = Compose(
        PartialSharing(share=SHARED),
        ClipUpdate(CLIP),
        GaussianMechanism(noise_multiplier=Z, placement="distributed", colluders=0, noise=SeededNoise(1)),
        aggregator,
    )
    result = run_federated(
        model,
        clients,
        None,
        rounds,
        config=ClientConfig(local_steps=1, batch_size=4),
        defense=defense,
        progress=False,
        val_fraction=0.25,
    )
    return result, defense, initial


@pytest.fixture(scope="module")
def clear():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # distributed noise without a secure aggregator: the reference run
        return run(InTheClear())


@pytest.mark.parametrize(
    "make,tol",
    [
        (lambda: SecureAggregation(threshold=2, clip_range=4 * CLIP), 1e-5),
        (lambda: CKKSAggregation("precise"), 1e-6),
        (lambda: CKKSAggregation("compact"), 1e-3),
    ],
)
def test_partial_clip_noise_and_crypto_aggregation_in_run_federated(clear, make, tol):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(secure aggregator|in the clear)")  # must not fire here
        aggregator = make()
        result, defense, initial = run(aggregator)
    ref, ref_defense, _ = clear
    assert defense.accountant.steps == 2
    report = result.history[-1]["defense_report"]
    assert list(report) == [f"3:{type(aggregator).__name__}"]  # bytes on the wire etc., per round
    assert result.history[-1]["privacy"] == ref.history[-1]["privacy"]
    for k, v in result.global_state.items():
        shared = any(k.startswith(p[:-1]) for p in SHARED)
        if not shared:  # kept local: the global copy never moves
            assert torch.equal(v, initial[k]), k
        else:
            assert not torch.equal(v, initial[k]), k
            torch.testing.assert_close(v, ref.global_state[k], rtol=0, atol=tol, msg=k)


def test_dropouts_under_distributed_noise_are_accounted_with_the_noise_that_survived():
    from privfl.defenses import PrivacyAccountant, RoundContext

    n, z = 5, 1.0
    gauss = GaussianMechanism(noise_multiplier=z, placement="distributed", colluders=0, noise=SeededNoise(0))
    defense = Compose(ClipUpdate(1.0), gauss, SecureAggregation(threshold=3, clip_range=8.0))
    ctx = RoundContext(0, n, tuple(range(n)), (0.2,) * n)
    defense.before_round(ctx)
    updates = [{"w": torch.full((50,), 0.01 * (i + 1))} for i in range(n)]
    payloads = [defense.protect(u, ctx.for_client(i)) if i < 3 else None for i, u in enumerate(updates)]
    mean = defense.aggregate(payloads, ctx)
    # 3 of 5 survived: each added std z*C/sqrt(5), so the survivors' mean has z_eff = z*sqrt(3/5)
    assert gauss.effective_noise_multiplier(ctx) == z  # without survivors: as configured
    reference = PrivacyAccountant()
    reference.record_gaussian(z * (3 / 5) ** 0.5)
    assert defense.accountant.epsilon(1e-5).epsilon == pytest.approx(reference.epsilon(1e-5).epsilon)
    assert mean["w"].shape == (50,)


# --------------------------------------------------------------------------------------------
# no release escapes the accountant; colluders are accounted (docs/privacy.md, "Dropouts and colluders")


def _distributed(n: int, threshold: int, **kw):
    from privfl.defenses import RoundContext

    gauss = GaussianMechanism(noise_multiplier=1.0, placement="distributed", noise=SeededNoise(0), **kw)
    defense = Compose(ClipUpdate(1.0), gauss, SecureAggregation(threshold=threshold, clip_range=8.0))
    return gauss, defense, RoundContext(0, n, tuple(range(n)), (1 / n,) * n)


def test_distributed_noise_withstands_threshold_minus_one_colluders_by_default():
    """n = 5, t = 3: two colluders know their shares, z_eff = sqrt(3/5)·z; z = 1 over 10 rounds:
    ε 17.9 → 25.1."""
    from privfl.defenses import PrivacyAccountant

    gauss, _, ctx = _distributed(5, 3)
    assert gauss.colluders == 2 and gauss.assumed_colluders == 2
    assert gauss.effective_noise_multiplier(ctx) == pytest.approx((3 / 5) ** 0.5)
    for z, expected in ((1.0, 17.9), ((3 / 5) ** 0.5, 25.1)):
        acct = PrivacyAccountant()
        acct.record_gaussian(z, steps=10)
        assert acct.epsilon(1e-5).epsilon == pytest.approx(expected, abs=0.06)
    explicit, _, _ = _distributed(5, 3, colluders=0)
    assert explicit.colluders == 0 and explicit.effective_noise_multiplier(ctx) == 1.0
    ckks = GaussianMechanism(noise_multiplier=1.0, placement="distributed", noise=SeededNoise(0))
    Compose(ClipUpdate(1.0), ckks, CKKSAggregation("compact", bound=1.0))
    assert ckks.assumed_colluders == 0  # the CKKS threat model: no client colludes with the server
    with pytest.raises(ValueError, match="distributed"):
        GaussianMechanism(noise_multiplier=1.0, placement="local", colluders=1)
    with pytest.raises(ValueError, match="colluders"):
        GaussianMechanism(noise_multiplier=1.0, placement="distributed", colluders=-1)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.data())
def test_colluders_and_dropouts_only_ever_lower_the_effective_noise(n, data):
    from privfl.defenses import RoundContext

    raw = data.draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n))
    weights = tuple(w / sum(raw) for w in raw)
    ctx = RoundContext(0, n, tuple(range(n)), weights)
    survivors = tuple(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))))
    seen = replace(ctx, survivors=survivors)
    previous = math.inf
    for k in range(n):
        z = GaussianMechanism(
            noise_multiplier=1.0, placement="distributed", colluders=k
        ).effective_noise_multiplier(seen)
        assert 0 < z <= previous + 1e-12  # more colluders never add noise
        previous = z
        if k == 0 and len(survivors) == n:
            assert z == pytest.approx(1.0)
        if k >= len(survivors) - 1:  # only the protected client's own share is left
            share = max(weights) / math.sqrt(sum(w * w for w in weights))
            assert z == pytest.approx(share)
    if len(survivors) == n and len(set(weights)) == 1:
        for k in range(n):
            z = GaussianMechanism(
                noise_multiplier=1.0, placement="distributed", colluders=k
            ).effective_noise_multiplier(seen)
            assert z == pytest.approx(math.sqrt(max(1, n - k) / n))


def _budget_between_full_and_dropped(gauss, ctx, survivors):
    from privfl.defenses import PrivacyAccountant

    full, dropped = PrivacyAccountant(), PrivacyAccountant()
    full.record(gauss.event(ctx))
    dropped.record(gauss.event(replace(ctx, survivors=survivors)))
    lo, hi = full.epsilon().epsilon, dropped.epsilon().epsilon
    assert lo < hi
    return (lo + hi) / 2, hi


@pytest.mark.parametrize("aggregator", ["secagg", "ckks"])
def test_dropouts_that_cross_the_budget_abort_the_round_before_anything_is_revealed(aggregator, monkeypatch):
    """With 2 of 5 dropped the survivors' aggregate carries less noise than the budget allows.
    The round must stop after the survivors are known and before unmasking / decryption, with nothing
    recorded because nothing was revealed; a round that fits is revealed and recorded."""
    from privfl.defenses import PrivacyAccountant, PrivacyBudgetExceeded, RoundContext
    from privfl.defenses.secagg import protocol

    n = 5
    ctx = RoundContext(0, n, tuple(range(n)), (0.2,) * n)
    probe = GaussianMechanism(noise_multiplier=1.0, placement="distributed", colluders=0)
    budget, _ = _budget_between_full_and_dropped(probe, ctx, (0, 1, 2))
    acct = PrivacyAccountant(max_epsilon=budget)
    gauss = GaussianMechanism(
        noise_multiplier=1.0, placement="distributed", colluders=0, accountant=acct, noise=SeededNoise(0)
    )
    last = (
        SecureAggregation(threshold=3, clip_range=8.0)
        if aggregator == "secagg"
        else CKKSAggregation("compact", bound=4.0)
    )
    defense = Compose(ClipUpdate(1.0), gauss, last)
    reveals: list[str] = []
    if aggregator == "secagg":
        original = protocol.SecAggServer.receive_unmask_response
        monkeypatch.setattr(
            protocol.SecAggServer,
            "receive_unmask_response",
            lambda self, *a, **k: (reveals.append("unmask"), original(self, *a, **k))[1],
        )
    else:
        original = type(last.keyholder).decrypt_vector
        monkeypatch.setattr(
            type(last.keyholder),
            "decrypt_vector",
            lambda self, *a, **k: (reveals.append("decrypt"), original(self, *a, **k))[1],
        )
    updates = [{"w": torch.full((40,), 0.01 * (i + 1))} for i in range(n)]

    def round_with(alive: set[int], r: int):
        c = replace(ctx, round=r)
        defense.before_round(c)
        payloads = [
            defense.protect(u, c.for_client(i)) if i in alive else None for i, u in enumerate(updates)
        ]
        return defense.aggregate(payloads, c)

    with pytest.raises(PrivacyBudgetExceeded):
        round_with({0, 1, 2}, 0)
    assert reveals == [] and acct.steps == 0  # aborted before the reveal: nothing to record
    round_with(set(range(n)), 1)  # full participation fits: revealed and recorded
    assert reveals and acct.steps == 1
    assert acct.epsilon().epsilon <= budget
    assert acct.delta_floor > 0  # the floating-point floor of the survivors' shares is in the reported δ


@settings(max_examples=12, deadline=None)
@given(st.sets(st.integers(0, 4), min_size=3), st.floats(0.2, 0.9), st.integers(0, 2))
def test_whatever_survives_a_round_is_either_refused_unrevealed_or_recorded_within_budget(
    alive, fraction, colluders
):
    """Property: for any survivor set and budget, SecAgg either aborts before unmasking
    (accountant unchanged) or reveals the sum and records exactly the survivors' effective noise."""
    from privfl.defenses import PrivacyAccountant, PrivacyBudgetExceeded, RoundContext

    n = 5
    ctx = RoundContext(0, n, tuple(range(n)), (0.2,) * n)
    seen = replace(ctx, survivors=tuple(sorted(alive)))
    probe = GaussianMechanism(noise_multiplier=1.0, placement="distributed", colluders=colluders)
    lo, hi = _budget_between_full_and_dropped(probe, ctx, (0, 1, 2))
    budget = lo * (1 - fraction) + hi * fraction
    acct = PrivacyAccountant(max_epsilon=budget)
    gauss = GaussianMechanism(
        noise_multiplier=1.0,
        placement="distributed",
        colluders=colluders,
        accountant=acct,
        noise=SeededNoise(0),
    )
    defense = Compose(ClipUpdate(1.0), gauss, SecureAggregation(threshold=3, clip_range=8.0))
    defense.before_round(ctx)
    payloads = [
        defense.protect({"w": torch.full((16,), 0.1)}, ctx.for_client(i)) if i in alive else None
        for i in range(n)
    ]
    expected = PrivacyAccountant()
    expected.record(gauss.event(seen))
    fits = expected.epsilon().epsilon <= budget
    if fits:
        defense.aggregate(payloads, ctx)
        assert acct.steps == 1
        assert acct.epsilon().epsilon == pytest.approx(expected.epsilon().epsilon)
        assert acct.delta_floor == pytest.approx(len(alive) * SeededNoise(0).tail_floor("gaussian", 16))
    else:
        with pytest.raises(PrivacyBudgetExceeded):
            defense.aggregate(payloads, ctx)
        assert acct.steps == 0
