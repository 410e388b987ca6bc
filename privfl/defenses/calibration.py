"""Noise calibration for single releases: pure functions, no state.

Units: ``epsilon`` is the privacy-loss bound in nats (natural log), ``delta`` a probability in
(0, 1), a *sensitivity* is in the units of the released quantity (L2 for Gaussian noise, L1 for
Laplace noise), and a noise scale (``sigma`` = Gaussian standard deviation, ``b`` = Laplace scale)
is in the same units as the sensitivity. A *noise multiplier* is the dimensionless ratio
``noise scale / sensitivity``.

* :func:`analytic_gaussian_sigma` — the analytic Gaussian mechanism (Balle & Wang, ICML 2018): the
  smallest σ whose exact privacy profile meets (ε, δ). Valid for every ε > 0. The default.
* :func:`classical_gaussian_sigma` — ``Δ·sqrt(2 ln(1.25/δ))/ε`` (Dwork & Roth, Thm A.1); only proven
  for ε < 1 and always larger than the analytic σ there.
* :func:`balle_wang_delta` / :func:`gaussian_epsilon` — the exact (ε, δ) curve of one Gaussian release.
* :func:`laplace_scale` — ``b = Δ₁/ε`` for pure ε-DP.

The ``check_*`` helpers validate parameters and raise :class:`ValueError` with a message naming the
parameter; every public function here uses them.
"""

from __future__ import annotations

import math
import numbers

import dp_accounting
import numpy as np
from scipy.special import log_ndtr

__all__ = [
    "analytic_gaussian_sigma",
    "balle_wang_delta",
    "check_delta",
    "check_epsilon",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_sensitivity",
    "classical_gaussian_sigma",
    "gaussian_epsilon",
    "laplace_scale",
]


def _real(value: object, name: str) -> float:
    """``value`` as a float, refusing bools, strings and other non-numbers (with a clear message)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _positive_finite(value: object, name: str) -> float:
    x = _real(value, name)
    if math.isnan(x) or math.isinf(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def check_epsilon(eps: float, name: str = "epsilon") -> float:
    """Return ``eps`` as a float if it is a finite ε > 0 (nats); else raise :class:`ValueError`."""
    return _positive_finite(eps, name)


def check_delta(delta: float, name: str = "delta") -> float:
    """Return ``delta`` as a float if 0 < δ < 1; else raise :class:`ValueError`."""
    x = _real(delta, name)
    if not 0.0 < x < 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in the open interval (0, 1), got {delta!r}")
    return x


def check_sensitivity(s: float, name: str = "sensitivity") -> float:
    """Return ``s`` as a float if it is a finite sensitivity / clip norm > 0; else raise
    :class:`ValueError`."""
    return _positive_finite(s, name)


def check_noise_multiplier(z: float, name: str = "noise_multiplier") -> float:
    """Return ``z`` (noise scale / sensitivity) as a float if z >= 0 (``inf`` allowed: no release).

    ``z = 0`` is accepted and means no noise, i.e. no privacy (ε = ∞). Raises :class:`ValueError`
    for z < 0 or NaN.
    """
    x = _real(z, name)
    if math.isnan(x) or x < 0:
        raise ValueError(f"{name} must be >= 0 (noise std / sensitivity), got {z!r}")
    return x


def check_sample_rate(q: float, name: str = "sample_rate") -> float:
    """Return ``q`` as a float if it is a Poisson sampling probability in [0, 1]; else raise
    :class:`ValueError`."""
    x = _real(q, name)
    if not 0.0 <= x <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be a probability in [0, 1], got {q!r}")
    return x


def _check_sigma(sigma: float) -> float:
    x = _real(sigma, "sigma")
    if math.isnan(x) or x < 0:
        raise ValueError(f"sigma (Gaussian noise std) must be >= 0, got {sigma!r}")
    return x


def _log_delta(s: float, epsilon: float) -> float:
    """log δ(ε) of the Gaussian mechanism with noise multiplier ``s`` = σ/Δ (Balle & Wang 2018, Thm 8)."""
    a = 1.0 / (2.0 * s) - epsilon * s
    b = -1.0 / (2.0 * s) - epsilon * s
    x = float(log_ndtr(a))
    y = epsilon + float(log_ndtr(b))
    if y >= x:
        return -math.inf
    return x + math.log1p(-math.exp(y - x))


def balle_wang_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """Exact δ(ε) of one Gaussian release ``f(D) + N(0, σ²)`` with L2 sensitivity Δ.

    ``δ = Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ)`` (Balle & Wang 2018, Thm 8), evaluated in
    log-space so tiny δ keep their relative precision. ``sigma`` and ``sensitivity`` in the units of
    the released quantity, ``epsilon`` in nats (ε = 0 allowed). σ = 0 gives δ = 1.
    """
    s_ = _check_sigma(sigma)
    eps = _real(epsilon, "epsilon")
    if math.isnan(eps) or eps < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    delta_s = check_sensitivity(sensitivity)
    if s_ == 0:
        return 1.0
    if math.isinf(s_) or math.isinf(eps):
        return 0.0
    return math.exp(_log_delta(s_ / delta_s, eps))


def gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """Exact ε (nats) of one Gaussian release with std ``sigma`` and L2 sensitivity Δ at ``delta``.

    The inverse of :func:`balle_wang_delta` in ε (via ``dp_accounting.get_epsilon_gaussian``);
    ``inf`` for σ = 0, 0 when the release is (0, δ)-DP already.
    """
    s_ = _check_sigma(sigma)
    dlt = check_delta(delta)
    delta_s = check_sensitivity(sensitivity)
    if s_ == 0:
        return math.inf
    return float(dp_accounting.get_epsilon_gaussian(s_ / delta_s, dlt))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest Gaussian std σ giving (ε, δ)-DP for one release of L2 sensitivity Δ (analytic mechanism).

    Balle & Wang 2018, via ``dp_accounting.get_sigma_gaussian`` (root of the exact δ(ε) curve by
    Brent's method on log δ). The root is then nudged up, if needed, so that
    ``balle_wang_delta(σ, ε, Δ) <= δ`` holds exactly as evaluated: the result never under-noises.
    Returns σ in the units of ``sensitivity``. Oracle: Δ=1, ε=1, δ=1e-5 → σ = 3.730632.
    """
    eps = check_epsilon(epsilon)
    dlt = check_delta(delta)
    delta_s = check_sensitivity(sensitivity)
    sigma = float(dp_accounting.get_sigma_gaussian(eps, dlt, tol=1e-14)) * delta_s
    step = 4 * float(np.finfo(float).eps)
    while balle_wang_delta(sigma, eps, delta_s) > dlt:  # brentq / rounding may land on the wrong side
        sigma *= 1 + step
        step *= 2
    return sigma


def classical_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Classical Gaussian mechanism std ``σ = Δ·sqrt(2 ln(1.25/δ))/ε`` (Dwork & Roth 2014, Thm A.1).

    Only proven for ε < 1, so ε >= 1 raises :class:`ValueError` (use :func:`analytic_gaussian_sigma`).
    σ in the units of ``sensitivity``. Oracle: Δ=1, δ=1e-5 → σ·ε = 4.844805 (e.g. 9.689610 at ε = 0.5).
    """
    eps = check_epsilon(epsilon)
    dlt = check_delta(delta)
    delta_s = check_sensitivity(sensitivity)
    if eps >= 1:
        raise ValueError(
            f"the classical Gaussian mechanism is only proven for epsilon < 1, got epsilon={eps}; "
            "use analytic_gaussian_sigma (calibration='analytic') instead"
        )
    return delta_s * math.sqrt(2.0 * math.log(1.25 / dlt)) / eps


def laplace_scale(epsilon: float, l1_sensitivity: float) -> float:
    """Laplace scale ``b = Δ₁/ε`` for pure ε-DP of one release with L1 sensitivity Δ₁ (units of Δ₁)."""
    eps = check_epsilon(epsilon)
    return check_sensitivity(l1_sensitivity, "l1_sensitivity") / eps
