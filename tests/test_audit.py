"""Tests of privfl.audit: Clopper–Pearson intervals, the ε lower-bound formula, and audits of
mechanisms whose true ε is known exactly (Gaussian via Balle–Wang, Laplace), including one that
must fail (an under-noised Gaussian)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.stats import binom, laplace, norm

import privfl.audit as audit_mod
from privfl.audit import AuditResult, audit_defense, audit_mechanism, clopper_pearson, epsilon_lower_bound
from privfl.defenses.base import Defense, Payload, RoundContext
from privfl.updates import Update, weighted_mean

DELTA = 1e-5
#: Analytic Gaussian (Balle & Wang 2018), Δ=1, ε=1, δ=1e-5 (the oracle in benchmarks/RESULTS.md,
#: "Accountant oracles").
SIGMA_EPS1 = 3.730632


# --------------------------------------------------------------------------------------------
# reference: the exact ε of a Gaussian / Laplace mechanism
# --------------------------------------------------------------------------------------------


def gaussian_delta(eps: float, mu: float) -> float:
    """Balle–Wang: δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ), μ = Δ/σ."""
    return norm.cdf(mu / 2 - eps / mu) - math.exp(eps + norm.logcdf(-mu / 2 - eps / mu))


def gaussian_epsilon(sensitivity: float, sigma: float, delta: float) -> float:
    """Exact ε of x + N(0, σ²) at δ for L2 sensitivity Δ, by bisection on the Balle–Wang δ(ε)."""
    mu = sensitivity / sigma
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    return brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, 10.0 + 10.0 * mu * mu, xtol=1e-12)


def test_reference_gaussian_epsilon_matches_design_oracle():
    assert gaussian_epsilon(1.0, SIGMA_EPS1, DELTA) == pytest.approx(1.0, abs=1e-5)
    assert gaussian_delta(1.0, 1.0 / SIGMA_EPS1) == pytest.approx(DELTA, rel=1e-4)


def gaussian_batched(sigma: float, gen: torch.Generator):
    def batched(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.reshape(1, -1) + sigma * torch.randn(n, x.numel(), generator=gen, dtype=x.dtype)

    return batched


def laplace_batched(b: float, gen: torch.Generator):
    def batched(x: torch.Tensor, n: int) -> torch.Tensor:
        u = torch.rand(n, x.numel(), generator=gen, dtype=torch.float64) - 0.5
        return x.reshape(1, -1) - b * torch.sign(u) * torch.log1p(-2 * u.abs())

    return batched


# --------------------------------------------------------------------------------------------
# Clopper–Pearson
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,n,conf,lo,hi",
    [
        (0, 10, 0.95, 0.0, 0.3084971),  # 1 - 0.025**(1/10)
        (10, 10, 0.95, 0.6915029, 1.0),
        (5, 10, 0.95, 0.1870860, 0.8129140),  # R: binom.test(5, 10)
        (1, 100, 0.95, 0.0002531460, 0.0544593854),
    ],
)
def test_clopper_pearson_known_values(k, n, conf, lo, hi):
    got = clopper_pearson(k, n, conf)
    assert got[0] == pytest.approx(lo, abs=2e-7)
    assert got[1] == pytest.approx(hi, abs=2e-7)


@pytest.mark.parametrize("k,n,conf", [(50, 100, 0.99), (3, 17, 0.9), (1, 2, 0.95), (999, 1000, 0.95)])
def test_clopper_pearson_defining_equations(k, n, conf):
    """The ends are where the observed count becomes an α/2 tail: P(X ≥ k | lo) = P(X ≤ k | hi) = α/2."""
    lo, hi = clopper_pearson(k, n, conf)
    alpha = 1 - conf
    assert binom.sf(k - 1, n, lo) == pytest.approx(alpha / 2, rel=1e-7)
    assert binom.cdf(k, n, hi) == pytest.approx(alpha / 2, rel=1e-7)
    if 2 * k == n:
        assert lo == pytest.approx(1 - hi, abs=1e-12)


def test_clopper_pearson_zero_closed_form():
    for n in (1, 7, 1000):
        assert clopper_pearson(0, n, 0.9)[1] == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-10)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), p=st.floats(0.001, 0.999), conf=st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_clopper_pearson_exact_coverage(n, p, conf):
    """Exact (not Monte Carlo) coverage: Σ_k P(k) [p ∈ CI(k)] ≥ confidence for every p."""
    ks = np.arange(n + 1)
    covered = np.array([lo <= p <= hi for lo, hi in (clopper_pearson(int(k), n, conf) for k in ks)])
    assert float(binom.pmf(ks, n, p)[covered].sum()) >= conf - 1e-9


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), data=st.data())
def test_clopper_pearson_shape(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = clopper_pearson(k, n, 0.95)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo99, hi99 = clopper_pearson(k, n, 0.99)
    assert lo99 <= lo + 1e-12 and hi <= hi99 + 1e-12
    if k < n:
        assert clopper_pearson(k + 1, n, 0.95)[1] > hi


@pytest.mark.parametrize(
    "k,n,conf", [(-1, 10, 0.95), (11, 10, 0.95), (0, 0, 0.95), (1, 10, 1.0), (1, 10, 0.0), (1.5, 10, 0.95)]
)
def test_clopper_pearson_rejects_bad_inputs(k, n, conf):
    with pytest.raises(ValueError):
        clopper_pearson(k, n, conf)


# --------------------------------------------------------------------------------------------
# the ε lower-bound formula
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fpr,fnr,delta,expected",
    [
        (0.5, 0.5, 0.0, 0.0),
        (0.1, 0.1, 0.0, math.log(9.0)),
        (0.1, 0.2, DELTA, math.log((1 - DELTA - 0.2) / 0.1)),  # the larger term of the two
        (0.2, 0.1, DELTA, math.log((1 - DELTA - 0.2) / 0.1)),  # symmetric in the two errors
        (0.01, 0.5, 0.0, math.log(50.0)),
        (0.9, 0.9, 0.0, 0.0),  # worse than guessing: no bound
        (1.0, 0.0, 0.0, 0.0),  # always guess x1: no information
        (0.0, 1.0, DELTA, 0.0),
        (1.0, 1.0, 0.5, 0.0),
        (0.3, 0.3, 0.5, 0.0),  # δ large: nothing to refute
    ],
)
def test_epsilon_lower_bound_cases(fpr, fnr, delta, expected):
    assert epsilon_lower_bound(fpr, fnr, delta) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_epsilon_lower_bound_zero_rates():
    # a perfect test refutes every finite ε; the audit never passes zeros (Clopper–Pearson upper bounds)
    assert epsilon_lower_bound(0.0, 0.5, DELTA) == math.inf
    assert epsilon_lower_bound(0.5, 0.0, DELTA) == math.inf
    assert epsilon_lower_bound(0.0, 0.0, DELTA) == math.inf
    # the upper bounds keep it finite
    ub = clopper_pearson(0, 1000)[1]
    assert math.isfinite(epsilon_lower_bound(ub, clopper_pearson(500, 1000)[1], DELTA))


@pytest.mark.parametrize(
    "fpr,fnr,delta",
    [
        (-0.1, 0.5, DELTA),
        (0.5, 1.1, DELTA),
        (math.nan, 0.5, DELTA),
        (0.5, 0.5, 1.0),
        (0.5, 0.5, -1e-5),
        (0.5, 0.5, math.nan),
        ("0.5", 0.5, DELTA),
    ],
)
def test_epsilon_lower_bound_rejects_bad_inputs(fpr, fnr, delta):
    with pytest.raises(ValueError):
        epsilon_lower_bound(fpr, fnr, delta)


@settings(max_examples=200, deadline=None)
@given(mu=st.floats(0.05, 4.0), t=st.floats(-6.0, 6.0), delta=st.sampled_from([1e-6, 1e-5, 1e-3, 0.05]))
def test_formula_never_exceeds_true_epsilon_on_gaussian_tradeoff(mu, t, delta):
    """Any threshold test against N(0,1) vs N(μ,1) sits on the exact trade-off curve; the bound it
    gives can never exceed the mechanism's true ε (the DP inequality the formula rests on)."""
    fpr, fnr = float(norm.sf(t)), float(norm.cdf(t - mu))
    assert epsilon_lower_bound(fpr, fnr, delta) <= gaussian_epsilon(mu, 1.0, delta) + 1e-6


@settings(max_examples=200, deadline=None)
@given(eps=st.floats(0.05, 5.0), t=st.floats(-5.0, 6.0))
def test_formula_is_tight_on_laplace_tradeoff(eps, t):
    """Laplace(b) vs shifted by Δ is pure ε-DP with ε = Δ/b; thresholds at or below 0 reach it."""
    fpr, fnr = float(laplace.sf(t, 0.0, 1.0 / eps)), float(laplace.cdf(t, 1.0, 1.0 / eps))
    lb = epsilon_lower_bound(fpr, fnr, 0.0)
    # tolerance: 1 − FPR loses digits to cancellation when FPR is within ~1e-11 of 1
    assert lb <= eps + 1e-4
    if t <= 0.0:
        assert lb == pytest.approx(eps, abs=1e-4)


# --------------------------------------------------------------------------------------------
# audits of mechanisms with known ε
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "z,sens,d,trials",
    [
        (0.5, 1.0, 1, 20000),
        (1.0, 1.0, 10, 20000),
        (1.0, 1.0, 10, 2000),
        (2.0, 3.0, 10, 20000),
        (1.0, 0.05, 100, 4000),
        (4.0, 1.0, 1, 20000),
    ],
)
def test_gaussian_audit_is_below_true_epsilon(z, sens, d, trials):
    gen = torch.Generator().manual_seed(11)
    x0 = torch.zeros(d, dtype=torch.float64)
    x1 = x0.clone()
    x1[: min(d, 3)] = sens / math.sqrt(min(d, 3))  # ||x1 - x0|| = Δ, spread over a few coordinates
    true_eps = gaussian_epsilon(sens, z * sens, DELTA)
    r = audit_mechanism(
        None,
        x0,
        x1,
        trials=trials,
        batched=gaussian_batched(z * sens, gen),
        delta=DELTA,
        claimed_epsilon=true_eps,
        seed=1,
    )
    assert 0.0 <= r.epsilon_lower_bound <= true_eps
    assert not r.violated
    if z <= 2.0:
        assert r.epsilon_lower_bound > 0.25 * true_eps  # and the audit has real power
    assert r.fpr <= r.fpr_upper and r.fnr <= r.fnr_upper


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("sens", [1.0, 0.2])
def test_laplace_audit_is_below_true_epsilon(eps, sens):
    gen = torch.Generator().manual_seed(5)
    x0, x1 = torch.zeros(1, dtype=torch.float64), torch.full((1,), sens, dtype=torch.float64)
    r = audit_mechanism(
        None,
        x0,
        x1,
        trials=4000,
        batched=laplace_batched(sens / eps, gen),
        delta=DELTA,
        claimed_epsilon=eps,
        seed=2,
    )
    assert 0.3 * eps < r.epsilon_lower_bound <= eps  # Laplace is tight: the audit gets close
    assert not r.violated


def test_laplace_audit_rarely_exceeds_true_epsilon():
    """Validity as a frequency: at 95% confidence the bound may exceed ε in ≤ 5% of audits (the
    conservative Clopper–Pearson bounds make it rarer). Laplace is where the audit is tightest."""
    eps, exceed = 2.0, 0
    for s in range(40):
        gen = torch.Generator().manual_seed(100 + s)
        r = audit_mechanism(
            None, torch.zeros(1), torch.ones(1), trials=1000, batched=laplace_batched(1.0 / eps, gen), seed=s
        )
        exceed += r.epsilon_lower_bound > eps
    assert exceed <= 2


def test_detects_under_noised_mechanism():
    """A mechanism that claims ε=1 at δ=1e-5 but adds 10× too little noise must fail its audit."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.zeros(20)
    x1 = x0.clone()
    x1[7] = 1.0
    r = audit_mechanism(
        None,
        x0,
        x1,
        trials=2000,
        batched=gaussian_batched(SIGMA_EPS1 / 10, gen),
        delta=DELTA,
        claimed_epsilon=1.0,
        seed=0,
    )
    assert r.epsilon_lower_bound > 1.0
    assert r.violated
    assert "VIOLATED" in str(r)
    # the correctly noised mechanism passes the same audit
    ok = audit_mechanism(
        None,
        x0,
        x1,
        trials=2000,
        batched=gaussian_batched(SIGMA_EPS1, gen),
        delta=DELTA,
        claimed_epsilon=1.0,
        seed=0,
    )
    assert not ok.violated


def test_unbatched_mechanism_seed_is_reproducible_and_restores_rng():
    def mech(x: torch.Tensor) -> torch.Tensor:  # draws from torch's global RNG
        return x + torch.randn(x.shape)

    x0, x1 = torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0])
    state = torch.get_rng_state()
    r1 = audit_mechanism(mech, x0, x1, trials=300, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    r2 = audit_mechanism(mech, x0, x1, trials=300, seed=7)
    assert r1 == r2
    assert r1.epsilon_lower_bound <= gaussian_epsilon(1.0, 1.0, DELTA)
    assert r1.trials == 300


def test_custom_statistic_and_direction():
    gen = torch.Generator().manual_seed(9)
    x0, x1 = torch.zeros(2, 3), torch.zeros(2, 3)
    x1[1, 2] = 1.0
    true_eps = gaussian_epsilon(1.0, 0.5, DELTA)
    seen_shapes = set()

    def neg_stat(y: torch.Tensor) -> float:
        seen_shapes.add(tuple(y.shape))
        return -float(y[1, 2])

    r = audit_mechanism(
        None, x0, x1, trials=600, batched=gaussian_batched(0.5, gen), statistic=neg_stat, seed=0
    )
    assert seen_shapes == {(2, 3)}  # batched rows come back in x0's shape
    assert r.direction == -1  # guesses x1 when the (negated) statistic is small
    assert 0.5 < r.epsilon_lower_bound <= true_eps

    def mech(x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.randn(x.shape, generator=gen)

    r2 = audit_mechanism(mech, x0, x1, trials=600, statistic=lambda y: float(y[1, 2]), seed=0)
    assert r2.direction == 1
    assert 0.5 < r2.epsilon_lower_bound <= true_eps


def test_batched_is_chunked(monkeypatch):
    monkeypatch.setattr(audit_mod, "_MAX_BATCH_ELEMENTS", 1000)
    gen = torch.Generator().manual_seed(0)
    inner = gaussian_batched(1.0, gen)
    sizes: list[int] = []

    def batched(x: torch.Tensor, n: int) -> torch.Tensor:
        sizes.append(n)
        return inner(x, n)

    x0, x1 = torch.zeros(100), torch.zeros(100)
    x1[0] = 1.0
    audit_mechanism(None, x0, x1, trials=95, batched=batched, seed=0)
    assert max(sizes) == 10 and sum(sizes) == 2 * 95


def test_progress_bar_runs():
    gen = torch.Generator().manual_seed(0)
    r = audit_mechanism(
        None, torch.zeros(3), torch.ones(3), trials=100, batched=gaussian_batched(1.0, gen), progress=True
    )
    assert isinstance(r, AuditResult)


def test_result_dict_and_str():
    gen = torch.Generator().manual_seed(0)
    r = audit_mechanism(
        None, torch.zeros(1), torch.ones(1), trials=1000, batched=gaussian_batched(1.0, gen), seed=0
    )
    d = r.to_dict()
    assert d["violated"] is False and d["claimed_epsilon"] is None and d["trials"] == 1000
    assert set(d) >= {
        "epsilon_lower_bound",
        "delta",
        "fpr",
        "fnr",
        "fpr_upper",
        "fnr_upper",
        "threshold",
        "confidence",
    }
    assert "no claimed ε" in str(r) and "95% confidence" in str(r)
    assert AuditResult(
        **{**{k: v for k, v in d.items() if k != "violated"}, "claimed_epsilon": 0.0}
    ).violated == (r.epsilon_lower_bound > 0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"trials": 1}, "trials"),
        ({"trials": 0}, "trials"),
        ({"trials": 2.5}, "trials"),
        ({"trials": True}, "trials"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -1e-5}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"confidence": 1.0}, "confidence"),
        ({"claimed_epsilon": -1.0}, "claimed_epsilon"),
    ],
)
def test_audit_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        audit_mechanism(lambda x: x, torch.zeros(2), torch.ones(2), **kw)


def test_audit_rejects_bad_inputs():
    with pytest.raises(ValueError, match="identical"):
        audit_mechanism(lambda x: x, torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        audit_mechanism(lambda x: x, torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        audit_mechanism(lambda x: x, torch.zeros(2), torch.tensor([1.0, math.inf]))
    with pytest.raises(TypeError):
        audit_mechanism(None, torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="batched"):
        audit_mechanism(
            None, torch.zeros(2), torch.ones(2), trials=10, batched=lambda x, n: torch.zeros(n, 3)
        )
    with pytest.raises(ValueError, match="entries"):
        audit_mechanism(lambda x: torch.zeros(5), torch.zeros(2), torch.ones(2), trials=10)


# --------------------------------------------------------------------------------------------
# audit_defense
# --------------------------------------------------------------------------------------------


class NoisyMean(Defense):
    """Test defense: each client adds N(0, σ²) to every entry; the server takes the weighted mean.
    Counts its rounds in its state (to check the audit leaves the state as it found it)."""

    def __init__(self, sigma: float, gen: torch.Generator, drop: str | None = None):
        self.sigma, self.gen, self.drop = sigma, gen, drop
        self.rounds = 0
        self.seen_rounds: list[int] = []

    def protect(self, update: Update, ctx: RoundContext) -> Payload:
        assert ctx.client_id is not None
        return {
            k: v + self.sigma * torch.randn(v.shape, generator=self.gen, dtype=v.dtype)
            for k, v in update.items()
            if k != self.drop
        }

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        assert ctx.client_id is None
        self.rounds += 1
        self.seen_rounds.append(ctx.round)
        return weighted_mean(list(payloads), ctx.weights)

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = state["rounds"]


def _updates() -> tuple[Update, Update]:
    u0 = {"conv.weight": torch.zeros(3, 2), "conv.bias": torch.zeros(2), "head.weight": torch.zeros(4)}
    u1 = {k: v.clone() for k, v in u0.items()}
    u1["conv.weight"][1, 1] = 0.6
    u1["conv.bias"][0] = 0.8  # canary with ||u1 - u0|| = 1
    return u0, u1


def test_audit_defense_gaussian():
    u0, u1 = _updates()
    defense = NoisyMean(sigma=1.0, gen=torch.Generator().manual_seed(4))
    defense.rounds = 17
    true_eps = gaussian_epsilon(1.0, 1.0, DELTA)
    r = audit_defense(defense, u0, u1, trials=1500, delta=DELTA, claimed_epsilon=true_eps, seed=0)
    assert 0.3 < r.epsilon_lower_bound <= true_eps and not r.violated
    assert defense.rounds == 17  # state restored: the audit spends none of the defense's budget
    assert len(set(defense.seen_rounds)) == 3000  # every trial a fresh round
    # under-noised: claims ε=1 but adds a tenth of the noise it needs
    weak = NoisyMean(sigma=SIGMA_EPS1 / 10, gen=torch.Generator().manual_seed(4))
    bad = audit_defense(
        weak,
        u0,
        u1,
        RoundContext(round=5, num_clients=10, sampled=(3,), weights=(1.0,)),
        trials=1000,
        claimed_epsilon=1.0,
        seed=0,
    )
    assert bad.violated and min(weak.seen_rounds) == 5


def test_audit_defense_dropped_keys_and_bad_context():
    u0, u1 = _updates()
    # the defense withholds head.weight (partial sharing): dropped keys count as zeros
    r = audit_defense(
        NoisyMean(1.0, torch.Generator().manual_seed(1), drop="head.weight"), u0, u1, trials=400, seed=0
    )
    assert r.epsilon_lower_bound <= gaussian_epsilon(1.0, 1.0, DELTA)
    two = RoundContext(round=0, num_clients=2, sampled=(0, 1), weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="one sampled client"):
        audit_defense(NoisyMean(1.0, torch.Generator()), u0, u1, two)
    with pytest.raises(ValueError, match="identical"):
        audit_defense(NoisyMean(1.0, torch.Generator()), u0, u0, trials=10)
    with pytest.raises(ValueError, match="same keys"):
        audit_defense(NoisyMean(1.0, torch.Generator()), u0, {"x": torch.zeros(14)}, trials=10)
    with pytest.raises(TypeError, match="batched"):
        audit_defense(NoisyMean(1.0, torch.Generator()), u0, u1, batched=lambda x, n: x)
