"""DP mechanisms on updates: clipping, noise placement and scale, FedDP, budget guard, Compose."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import ctx_for
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.data import SyntheticHistology, partition
from privfl.defenses import (
    ClipUpdate,
    Compose,
    Defense,
    FedDPNoise,
    GaussianMechanism,
    LaplaceMechanism,
    NoDefense,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    RoundContext,
    SeededNoise,
)
from privfl.defenses.dp import clip_vector, safe_norm
from privfl.fl import ClientConfig, load_checkpoint, run_federated
from privfl.models import build_model
from privfl.updates import InvalidUpdateError, clone, flatten, global_l2_norm, weighted_mean

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure")


def zeros(d: int) -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(d // 2), "b": torch.zeros(d - d // 2)}


def noise_of(payload) -> torch.Tensor:
    return flatten(payload)[0].double()


def assert_std(sample: torch.Tensor, expected: float) -> None:
    n = sample.numel()
    se = expected / math.sqrt(2 * n)
    assert abs(float(sample.std()) - expected) < 5 * se, (float(sample.std()), expected)
    assert abs(float(sample.mean())) < 5 * expected / math.sqrt(n)


# --------------------------------------------------------------------------------------------
# clipping


updates = st.lists(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=20), min_size=1, max_size=4
).map(lambda rows: {f"p{i}": torch.tensor(r, dtype=torch.float32) for i, r in enumerate(rows)})


@settings(max_examples=200, deadline=None)
@given(update=updates, c=st.floats(1e-4, 1e3))
def test_clipped_norm_at_most_c_and_direction_kept(update, c):
    before = clone(update)
    out = ClipUpdate(c).protect(update, ctx_for(1))
    for k in update:
        assert torch.equal(update[k], before[k])  # input never mutated
    norm_in, norm_out = global_l2_norm(update), global_l2_norm(out)
    assert norm_out <= c * (1 + 1e-6)
    if norm_in <= c:
        for k in update:
            assert torch.equal(out[k], update[k])
    elif norm_in > 0:
        u, v = flatten(update)[0].double(), flatten(out)[0].double()
        assert float(torch.dot(u, v) / (u.norm() * v.norm())) > 1 - 1e-6
        assert norm_out == pytest.approx(c, rel=1e-5)


@settings(max_examples=100, deadline=None)
@given(update=updates, c=st.floats(1e-3, 1e2))
def test_per_layer_clipping_bounds_each_entry_and_the_total(update, c):
    out = ClipUpdate(c, per_layer=True).protect(update, ctx_for(1))
    per = c / math.sqrt(len(update))
    for k in out:
        assert float(out[k].double().norm()) <= per * (1 + 1e-6)
    assert global_l2_norm(out) <= c * (1 + 1e-6)


def test_mechanisms_clip_to_their_own_sensitivity():
    big = {"w": torch.full((100,), 10.0)}
    mech = GaussianMechanism(noise_multiplier=0.0, sensitivity=1.0, noise=SeededNoise(0))
    assert global_l2_norm(mech.protect(big, ctx_for(1).for_client(0))) <= 1 + 1e-6
    lap = LaplaceMechanism(1e6, sensitivity=2.0, noise=SeededNoise(0))
    out = lap.protect(big, ctx_for(1).for_client(0))
    assert float(out["w"].abs().sum()) == pytest.approx(2.0, rel=1e-3)


# --------------------------------------------------------------------------------------------
# noise scale and placement


@pytest.mark.parametrize("z,c", [(0.5, 1.0), (2.0, 0.05), (1.1, 3.0)])
def test_local_gaussian_std_is_z_times_c(z, c):
    mech = GaussianMechanism(noise_multiplier=z, sensitivity=c)  # default secure source
    sample = noise_of(mech.protect(zeros(200_000), ctx_for(1).for_client(0)))
    assert_std(sample, z * c)


def test_central_noise_is_added_once_by_the_server_scaled_to_the_max_weight():
    z, c, w = 1.5, 0.2, [0.5, 0.3, 0.2]
    mech = GaussianMechanism(noise_multiplier=z, sensitivity=c, placement="central", noise=SeededNoise(1))
    ctx = ctx_for(3, w)
    payloads = [mech.protect(zeros(100_000), ctx.for_client(i)) for i in range(3)]
    for p in payloads:
        assert float(noise_of(p).abs().max()) == 0.0  # clients send clipped updates in the clear
    assert_std(noise_of(mech.aggregate(payloads, ctx)), z * max(w) * c)


@pytest.mark.parametrize("n", [2, 5, 10])
def test_distributed_noise_sums_to_z_c_over_n_clients(n):
    z, c = 0.8, 0.5
    mech = GaussianMechanism(noise_multiplier=z, sensitivity=c, placement="distributed", noise=SeededNoise(2))
    ctx = ctx_for(n)
    payloads = [mech.protect(zeros(60_000), ctx.for_client(i)) for i in range(n)]
    for p in payloads:
        assert_std(noise_of(p), z * c / math.sqrt(n))
    total = sum(noise_of(p) for p in payloads)
    assert_std(total, z * c)  # the sum carries sigma*C, as central noise on the sum would
    with pytest.warns(UserWarning, match="SecureAggregation"):  # aggregated in the clear
        mean = mech.aggregate(payloads, ctx)
    assert_std(noise_of(mean), z * c / n)


def test_laplace_scale_mean_abs_and_tail():
    eps, sens = 0.5, 0.1
    mech = LaplaceMechanism(eps, sens)
    x = noise_of(mech.protect(zeros(400_000), ctx_for(1).for_client(0)))
    b = sens / eps
    n = x.numel()
    assert abs(float(x.abs().mean()) - b) < 5 * b / math.sqrt(n)  # Var|X| = b^2
    for t in (0.5 * b, 2 * b, 4 * b):
        p = math.exp(-t / b)
        frac = float((x.abs() > t).double().mean())
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_calibration_from_epsilon_delta():
    mech = GaussianMechanism(epsilon=1.0, delta=1e-5, sensitivity=1.0)
    assert mech.noise_multiplier == pytest.approx(3.730632, rel=1e-5)
    classical = GaussianMechanism(epsilon=0.5, delta=1e-5, sensitivity=1.0, calibration="classical")
    assert classical.noise_multiplier == pytest.approx(2 * 4.844805, rel=1e-5)
    with pytest.raises(ValueError, match="1"):
        GaussianMechanism(epsilon=1.0, delta=1e-5, sensitivity=1.0, calibration="classical")


def test_seeded_noise_is_reproducible_and_secure_noise_is_not():
    ctx = ctx_for(2).for_client(1)
    a = GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0, noise=SeededNoise(7)).protect(
        zeros(1000), ctx
    )
    b = GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0, noise=SeededNoise(7)).protect(
        zeros(1000), ctx
    )
    assert torch.equal(a["a"], b["a"])
    s = GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0)
    assert not torch.equal(s.protect(zeros(1000), ctx)["a"], s.protect(zeros(1000), ctx)["a"])


def test_seeded_source_warns_that_it_is_not_secure():
    with pytest.warns(UserWarning, match="not cryptographically secure"):
        GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0, noise=SeededNoise(0))


# --------------------------------------------------------------------------------------------
# FedDP and accounting


def test_feddp_is_eq11_as_written_sigma_is_the_noise_multiplier():
    """FedDP (docs/privacy.md, "FedDP, corrected"): N(0, σ²C²I) has std σ·C, so z = σ. The paper's setting
    costs ε ≈ 403.5 over 150 rounds (≈ 10.0 for one), not Eq. 14's C/σ = 0.1, and not the 5.54 privfl reported
    when it read σ as an absolute std (20× the noise)."""
    mech = FedDPNoise(sigma=0.5, clip=0.05, noise=SeededNoise(0))
    assert mech.noise_multiplier == 0.5 and mech.placement == "local"
    assert mech.paper_epsilon == pytest.approx(0.1)
    x = noise_of(mech.protect(zeros(200_000), ctx_for(5).for_client(0)))
    assert_std(x, 0.5 * 0.05)  # σ·C on each client's upload
    ctx = ctx_for(5)
    one = PrivacyAccountant()
    one.record(mech.event(ctx))
    assert one.epsilon(1e-5).epsilon == pytest.approx(10.0, abs=0.05)
    for _ in range(150):
        mech.accountant.record(mech.event(ctx))
    assert mech.epsilon(1e-5).epsilon == pytest.approx(403.5, rel=5e-3)
    assert mech.accountant.steps == 150


def test_feddp_central_is_one_noise_term_on_the_sum_divided_by_k():
    k = 5
    mech = FedDPNoise(sigma=0.5, clip=0.05, placement="central", noise=SeededNoise(1))
    ctx = ctx_for(k)
    payloads = [mech.protect(zeros(100_000), ctx.for_client(i)) for i in range(k)]
    assert all(bool((noise_of(p) == 0).all()) for p in payloads)  # clients send clipped updates only
    assert_std(noise_of(mech.aggregate(payloads, ctx)), 0.5 * 0.05 / k)  # (1/k)·N(0, σ²C²)
    assert mech.effective_noise_multiplier(ctx) == 0.5  # sensitivity of the mean is C/k: z = σ
    with pytest.raises(ValueError, match="placement"):
        FedDPNoise(0.5, 0.05, placement="distributed")  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None)
@given(st.floats(0.05, 50.0), st.floats(1e-4, 10.0), st.integers(1, 8))
def test_feddp_noise_std_is_sigma_times_clip_and_accounts_z_sigma(sigma, clip, k):
    ctx = ctx_for(k)
    local = FedDPNoise(sigma, clip, noise=SeededNoise(0))
    assert local.noise_std(ctx.for_client(0)) == pytest.approx(sigma * clip)
    assert local.event(ctx).noise_multiplier == pytest.approx(sigma)
    central = FedDPNoise(sigma, clip, placement="central", noise=SeededNoise(0))
    assert central.noise_std(ctx) == pytest.approx(sigma * clip / k)
    assert central.event(ctx).noise_multiplier == pytest.approx(sigma)


def test_accountant_records_one_event_per_aggregated_round_and_sampling_rate():
    mech = GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0, noise=SeededNoise(0))
    ctx = RoundContext(0, 10, (0, 1), (0.5, 0.5), sampling_rate=0.2)
    for _ in range(3):
        mech.aggregate([mech.protect(zeros(10), ctx.for_client(i)) for i in range(2)], ctx)
    assert mech.accountant.steps == 3
    reference = PrivacyAccountant()
    reference.record_gaussian(1.0, sample_rate=0.2, steps=3)
    assert mech.epsilon(1e-5).epsilon == pytest.approx(reference.epsilon(1e-5).epsilon)


def test_budget_guard_refuses_the_round_that_would_exceed_and_applies_nothing():
    acct = PrivacyAccountant(max_epsilon=3.0, delta=1e-5)
    mech = GaussianMechanism(noise_multiplier=2.0, sensitivity=1.0, accountant=acct, noise=SeededNoise(0))
    ctx = ctx_for(2)
    done = 0
    with pytest.raises(PrivacyBudgetExceeded, match="3"):
        while True:
            mech.before_round(ctx)
            payloads = [mech.protect(zeros(10), ctx.for_client(i)) for i in range(2)]
            mech.aggregate(payloads, ctx)
            done += 1
    assert done >= 1
    assert acct.steps == done
    assert acct.epsilon().epsilon <= 3.0
    with pytest.raises(PrivacyBudgetExceeded):  # aggregate itself refuses too (for hand-written loops)
        mech.aggregate(payloads, ctx)
    assert acct.steps == done


def test_run_federated_stops_at_the_budget_with_the_last_full_round_checkpointed(tmp_path):
    data = SyntheticHistology(20, size=32, seed=0, sites=2)
    clients = partition(data, "iid", 2, seed=0)
    probe = PrivacyAccountant()
    probe.record_gaussian(5.0, steps=2)
    budget = probe.epsilon(1e-5).epsilon * 1.001  # exactly two rounds fit
    defense = Compose(
        ClipUpdate(1.0), GaussianMechanism(noise_multiplier=5.0, noise=SeededNoise(0), max_epsilon=budget)
    )
    seen = []
    with pytest.raises(PrivacyBudgetExceeded):
        run_federated(
            build_model("unet-tiny", num_classes=4),
            clients,
            None,
            5,
            config=ClientConfig(local_steps=1),
            defense=defense,
            checkpoint_dir=tmp_path,
            progress=False,
            on_round_end=seen.append,
        )
    assert [r["round"] for r in seen] == [0, 1]
    assert seen[-1]["privacy"]["epsilon"] <= budget
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["round"] == 1
    assert defense.accountant.steps == 2


def test_resume_restores_the_accountant_and_seeded_noise_exactly(tmp_path):
    def setup():
        data = SyntheticHistology(20, size=32, seed=0, sites=2)
        torch.manual_seed(0)
        defense = Compose(ClipUpdate(0.5), GaussianMechanism(noise_multiplier=0.3, noise=SeededNoise(5)))
        return build_model("unet-tiny", num_classes=4), partition(data, "iid", 2, seed=0), defense

    cfg = ClientConfig(local_steps=1, batch_size=4)
    model, clients, defense = setup()
    full = run_federated(model, clients, None, 3, config=cfg, defense=defense, progress=False)

    class Crash(Exception):
        pass

    def crash(rec):
        if rec["round"] == 1:
            raise Crash

    model, clients, defense = setup()
    with pytest.raises(Crash):
        run_federated(
            model,
            clients,
            None,
            3,
            config=cfg,
            defense=defense,
            checkpoint_dir=tmp_path,
            progress=False,
            on_round_end=crash,
        )
    model, clients, defense = setup()
    resumed = run_federated(
        model,
        clients,
        None,
        3,
        config=cfg,
        defense=defense,
        checkpoint_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert defense.accountant.steps == 3
    for k in full.global_state:
        assert torch.equal(full.global_state[k], resumed.global_state[k]), k
    assert full.history[-1]["privacy"] == resumed.history[-1]["privacy"]


# --------------------------------------------------------------------------------------------
# Compose


class Tag(Defense):
    """Adds a constant to every entry on the client and records the order of server calls."""

    def __init__(self, value: float, log: list):
        self.value, self.log = value, log

    def protect(self, update, ctx):
        self.log.append(("protect", self.value))
        return {k: v + self.value for k, v in update.items()}

    def aggregate(self, payloads, ctx):
        self.log.append(("aggregate", self.value))
        return weighted_mean(list(payloads), ctx.weights)

    def finalize(self, mean_update, ctx):
        self.log.append(("finalize", self.value))
        return mean_update


def test_compose_runs_clients_in_order_and_server_stages_in_reverse():
    log: list = []
    pipeline = Compose(Tag(1, log), Tag(2, log), Tag(3, log))
    ctx = ctx_for(1)
    out = pipeline.aggregate([pipeline.protect(zeros(4), ctx.for_client(0))], ctx)
    assert torch.equal(out["a"], torch.full((2,), 6.0))
    assert log == [
        ("protect", 1),
        ("protect", 2),
        ("protect", 3),
        ("aggregate", 3),
        ("finalize", 2),
        ("finalize", 1),
    ]


def test_compose_clip_then_noise_inherits_c_and_matches_the_hand_written_pipeline():
    ctx = ctx_for(2).for_client(0)
    update = {"w": torch.full((1000,), 1.0)}
    pipeline = Compose(ClipUpdate(0.1), GaussianMechanism(noise_multiplier=2.0, noise=SeededNoise(3)))
    assert pipeline.stages[1].sensitivity == 0.1
    by_hand = GaussianMechanism(noise_multiplier=2.0, sensitivity=0.1, noise=SeededNoise(3))
    assert torch.equal(pipeline.protect(update, ctx)["w"], by_hand.protect(update, ctx)["w"])
    assert pipeline.accountant is pipeline.stages[1].accountant


def test_compose_rejects_an_opaque_payload_before_the_last_stage():
    class Opaque(NoDefense):
        def protect(self, update, ctx):
            return b"ciphertext"

    with pytest.raises(TypeError, match="only the last stage"):
        Compose(Opaque(), ClipUpdate(1.0)).protect(zeros(4), ctx_for(1).for_client(0))
    with pytest.raises(ValueError):
        Compose()
    with pytest.raises(TypeError):
        Compose(ClipUpdate(1.0), "not a defense")


def test_compose_state_dict_round_trip_and_merged_accountant():
    a = GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0, noise=SeededNoise(0))
    b = LaplaceMechanism(1.0, 1.0, noise=SeededNoise(0))
    pipeline = Compose(a, b)
    ctx = ctx_for(1)
    pipeline.aggregate([pipeline.protect(zeros(4), ctx.for_client(0))], ctx)
    assert a.accountant.steps == b.accountant.steps == 1
    merged = pipeline.accountant
    assert merged.epsilon(1e-5).epsilon > max(a.epsilon(1e-5).epsilon, b.epsilon(1e-5).epsilon)
    fresh = Compose(
        GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0, noise=SeededNoise(0)),
        LaplaceMechanism(1.0, 1.0, noise=SeededNoise(0)),
    )
    fresh.load_state_dict(pipeline.state_dict())
    assert fresh.accountant.epsilon(1e-5).epsilon == pytest.approx(merged.epsilon(1e-5).epsilon)


def test_distributed_noise_without_a_secure_aggregator_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Compose(ClipUpdate(1.0), GaussianMechanism(noise_multiplier=1.0, placement="distributed"))
    assert any("secure aggregator" in str(w.message) for w in caught)


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_parameters_and_updates_raise_clear_errors():
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianMechanism(noise_multiplier=-1.0, sensitivity=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        GaussianMechanism(sensitivity=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        GaussianMechanism(1.0, epsilon=1.0, delta=1e-5, sensitivity=1.0)
    with pytest.raises(ValueError, match="delta"):
        GaussianMechanism(epsilon=1.0, sensitivity=1.0)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="epsilon"):
            GaussianMechanism(epsilon=eps, delta=1e-5, sensitivity=1.0)
        with pytest.raises(ValueError, match="epsilon"):
            LaplaceMechanism(eps, 1.0)
    for delta in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="delta"):
            GaussianMechanism(epsilon=1.0, delta=delta, sensitivity=1.0)
    with pytest.raises(ValueError, match="placement"):
        GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0, placement="everywhere")
    with pytest.raises(ValueError):
        ClipUpdate(0.0)
    with pytest.raises(ValueError, match="sigma"):
        FedDPNoise(sigma=-0.5, clip=0.05)
    with pytest.raises(ValueError, match="sensitivity"):
        GaussianMechanism(noise_multiplier=1.0).protect(zeros(4), ctx_for(1).for_client(0))
    nan = {"w": torch.tensor([1.0, float("nan")])}
    for mech in (
        ClipUpdate(1.0),
        GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0),
        LaplaceMechanism(1, 1),
    ):
        with pytest.raises(InvalidUpdateError, match="NaN"):
            mech.protect(nan, ctx_for(1).for_client(0))
    with pytest.raises(InvalidUpdateError, match="floating"):
        ClipUpdate(1.0).protect({"n": torch.tensor([3])}, ctx_for(1).for_client(0))


# --------------------------------------------------------------------------------------------
# DP-SGD inside run_federated


# --------------------------------------------------------------------------------------------
# the audit against privfl's own mechanisms


@pytest.mark.parametrize(
    "make",
    [
        lambda: GaussianMechanism(noise_multiplier=1.0, sensitivity=1.0),
        lambda: GaussianMechanism(noise_multiplier=0.6, sensitivity=0.5, placement="central"),
        lambda: LaplaceMechanism(2.0, sensitivity=1.0),
    ],
)
def test_audit_lower_bound_stays_below_the_accountant(make):
    from privfl.audit import audit_defense

    mech = make()
    sens = mech.sensitivity
    canary = {"w": torch.tensor([sens, 0.0, 0.0])}
    result = audit_defense(mech, {"w": torch.zeros(3)}, canary, trials=3000, seed=0)
    accounted = mech.accountant.epsilon_if(mech.event(ctx_for(1))).epsilon
    assert mech.accountant.steps == 0  # the audit spends no budget
    assert 0 < result.epsilon_lower_bound <= accounted


def test_audit_catches_a_mechanism_that_adds_less_noise_than_it_accounts():
    from privfl.audit import audit_defense

    class Broken(GaussianMechanism):
        def noise_std(self, ctx):
            return super().noise_std(ctx) / 10  # a bug: the accountant still records z

    mech = Broken(noise_multiplier=2.0, sensitivity=1.0)
    claimed = mech.accountant.epsilon_if(mech.event(ctx_for(1))).epsilon
    result = audit_defense(
        mech,
        {"w": torch.zeros(2)},
        {"w": torch.tensor([1.0, 0.0])},
        trials=3000,
        seed=0,
        claimed_epsilon=claimed,
    )
    assert result.violated and result.epsilon_lower_bound > claimed


# --------------------------------------------------------------------------------------------
# the clip holds at every magnitude and dtype


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize(
    "update, clip",
    [
        ({"w": torch.full((2050,), 3e38)}, 1e-3),  # float32 squares overflow
        ({"w": torch.full((2050,), 1e300, dtype=torch.float64)}, 1e-6),  # float64 squares overflow
        ({"w": torch.full((10,), 1e-300, dtype=torch.float64)}, 1e-310),  # float64 squares underflow
    ],
)
def test_clip_update_holds_its_bound_on_extreme_values(update, clip):
    out = ClipUpdate(clip).protect(update, ctx_for(1).for_client(0))["w"]
    norm = safe_norm(out)
    assert 0 < norm <= clip  # never above C, and never collapsed to zeros
    assert norm >= 0.99 * clip
    assert torch.all(torch.sign(out) == torch.sign(update["w"]))  # direction kept


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(FLOAT_DTYPES),
    st.integers(1, 300),
    st.floats(-300, 300),
    st.floats(-300, 300),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1.0, 2.0]),
)
def test_clip_vector_never_exceeds_its_bound(dtype, n, log_scale, log_clip, seed, p):
    info = torch.finfo(dtype)
    scale = min(10.0**log_scale, info.max / (n + 1))
    clip = 10.0**log_clip
    g = torch.Generator().manual_seed(seed)
    vec = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)
    out = clip_vector(vec, clip, p=p)
    assert out.dtype == dtype and out.shape == vec.shape
    assert safe_norm(out, p) <= clip
    if safe_norm(vec, p) <= clip:
        assert out is vec


def test_safe_norm_matches_the_exact_norm_and_refuses_non_finite():
    vec = torch.tensor([3.0, 4.0], dtype=torch.float64)
    for scale in (1e-300, 1.0, 1e300):
        assert safe_norm(vec * scale) == pytest.approx(5 * scale, rel=1e-12)
    with pytest.raises(ValueError, match="NaN or inf"):
        clip_vector(torch.tensor([math.inf, 1.0]), 1.0)
