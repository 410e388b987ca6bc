"""Single-release noise calibration: analytic (Balle–Wang) and classical Gaussian, Laplace, validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.defenses.calibration import (
    analytic_gaussian_sigma,
    balle_wang_delta,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sensitivity,
    classical_gaussian_sigma,
    gaussian_epsilon,
    laplace_scale,
)

epsilons = st.floats(0.01, 20.0)
small_epsilons = st.floats(0.01, 0.99)
deltas = st.floats(-12.0, math.log10(0.5)).map(lambda e: 10.0**e)  # log-uniform in [1e-12, 0.5]
sensitivities = st.floats(0.01, 100.0)


def test_design_oracles():
    assert analytic_gaussian_sigma(1.0, 1e-5) == pytest.approx(3.730632, rel=1e-6)
    assert analytic_gaussian_sigma(1.0, 1e-5, sensitivity=2.5) == pytest.approx(2.5 * 3.730632, rel=1e-6)
    # the classical formula σ·ε = sqrt(2 ln(1.25/δ)) = 4.844805 at δ = 1e-5, shown at ε = 0.5
    assert classical_gaussian_sigma(0.5, 1e-5) == pytest.approx(2 * 4.844805, rel=1e-6)
    assert classical_gaussian_sigma(0.5, 1e-5, 3.0) == pytest.approx(6 * 4.844805, rel=1e-6)
    assert gaussian_epsilon(3.730632, 1e-5) == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(epsilons, deltas, sensitivities)
def test_analytic_sigma_meets_the_balle_wang_condition_and_is_the_smallest(eps, delta, sens):
    sigma = analytic_gaussian_sigma(eps, delta, sens)
    achieved = balle_wang_delta(sigma, eps, sens)
    assert achieved <= delta  # never under-noised
    assert abs(achieved - delta) <= max(1e-9 * delta, 1e-300)  # and tight: relative 1e-9
    assert balle_wang_delta(sigma * (1 - 1e-6), eps, sens) > delta  # any less noise breaks (ε, δ)
    assert gaussian_epsilon(sigma, delta, sens) == pytest.approx(eps, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(small_epsilons, deltas, sensitivities)
def test_analytic_sigma_is_below_the_classical_one(eps, delta, sens):
    analytic = analytic_gaussian_sigma(eps, delta, sens)
    classical = classical_gaussian_sigma(eps, delta, sens)
    assert analytic < classical
    assert balle_wang_delta(classical, eps, sens) <= delta  # the classical σ is valid, just larger


@settings(max_examples=40, deadline=None)
@given(st.floats(0.05, 50.0), st.floats(0.0, 10.0), sensitivities)
def test_balle_wang_delta_falls_with_sigma_and_epsilon(sigma, eps, sens):
    d = balle_wang_delta(sigma * sens, eps, sens)
    assert 0.0 <= d <= 1.0
    assert balle_wang_delta(1.1 * sigma * sens, eps, sens) <= d
    assert balle_wang_delta(sigma * sens, eps + 0.5, sens) <= d
    # depends on σ/Δ only
    assert balle_wang_delta(sigma, eps, 1.0) == pytest.approx(d, rel=1e-9, abs=1e-300)


def test_balle_wang_delta_edges_and_known_value():
    assert balle_wang_delta(0.0, 1.0) == 1.0
    assert balle_wang_delta(math.inf, 1.0) == 0.0
    # ε = 0: δ = Φ(1/2σ) − Φ(−1/2σ) = 2Φ(1/2σ) − 1, total variation of two Gaussians
    assert balle_wang_delta(1.0, 0.0) == pytest.approx(math.erf(0.5 / math.sqrt(2)), rel=1e-12)
    assert gaussian_epsilon(0.0, 1e-5) == math.inf


@pytest.mark.parametrize("eps", [1.0, 1.5, 10.0])
def test_classical_refused_for_epsilon_at_least_one(eps):
    with pytest.raises(ValueError, match=r"epsilon < 1"):
        classical_gaussian_sigma(eps, 1e-5)


@settings(max_examples=30, deadline=None)
@given(epsilons, sensitivities)
def test_laplace_scale(eps, sens):
    b = laplace_scale(eps, sens)
    assert b == pytest.approx(sens / eps, rel=1e-12)
    assert laplace_scale(2 * eps, sens) == pytest.approx(b / 2, rel=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf, "1", True, None])
def test_bad_epsilon(bad):
    with pytest.raises(ValueError, match="epsilon"):
        check_epsilon(bad)
    with pytest.raises(ValueError, match="epsilon"):
        analytic_gaussian_sigma(bad, 1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        laplace_scale(bad, 1.0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-5, 1.5, math.nan, math.inf])
def test_bad_delta(bad):
    with pytest.raises(ValueError, match=r"delta must be in the open interval \(0, 1\)"):
        check_delta(bad)
    with pytest.raises(ValueError, match="delta"):
        analytic_gaussian_sigma(1.0, bad)
    with pytest.raises(ValueError, match="delta"):
        classical_gaussian_sigma(0.5, bad)
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(1.0, bad)


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan, math.inf])
def test_bad_sensitivity(bad):
    with pytest.raises(ValueError, match="sensitivity must be a finite number > 0"):
        check_sensitivity(bad)
    with pytest.raises(ValueError, match="sensitivity"):
        analytic_gaussian_sigma(1.0, 1e-5, bad)
    with pytest.raises(ValueError, match="l1_sensitivity"):
        laplace_scale(1.0, bad)


@pytest.mark.parametrize("bad", [-0.1, -math.inf, math.nan])
def test_bad_noise_multiplier_and_sigma(bad):
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        check_noise_multiplier(bad)
    with pytest.raises(ValueError, match="sigma"):
        balle_wang_delta(bad, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_epsilon(bad, 1e-5)


def test_checks_return_floats():
    assert check_epsilon(2) == 2.0 and isinstance(check_epsilon(2), float)
    assert check_delta(1e-5) == 1e-5
    assert check_sensitivity(3) == 3.0
    assert check_noise_multiplier(0) == 0.0 and check_noise_multiplier(math.inf) == math.inf
