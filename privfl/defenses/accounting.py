"""Privacy accounting over many noisy releases: the (ε, δ) that composition proves.

Two settings use the same accountant; only the meaning of the numbers differs:

* **client-level DP-FedAvg** (McMahan et al. 2018) — the protected unit is one client. Per round the
  server Poisson-samples clients with probability ``q = sampled clients / total clients``, each
  update is clipped to L2 norm ``C`` and Gaussian noise ``N(0, z²C²)`` is added to the sum: the
  noise multiplier ``z`` is the noise std divided by ``C`` (in FedDP's notation, ``N(0, σ²C²I)``,
  ``z = σ``), and there is **one step per round**.
* **sample-level DP-SGD** (Abadi et al. 2016) — the protected unit is one training example.
  ``z`` = noise std / per-sample clip norm, ``q = batch size / dataset size`` (Poisson sampling),
  and one step per noisy gradient step.

Sampling rates always mean **Poisson sampling** (each unit independently with probability ``q``),
under add/remove-one adjacency — the assumption of opacus' and dp-accounting's accountants. Fixed-
size sampling without replacement is not covered by these bounds.

Design: every noising step emits an immutable :class:`dp_accounting.DpEvent`
(``GaussianDpEvent``, ``LaplaceDpEvent``, ``PoissonSampledDpEvent``, ``SelfComposedDpEvent``,
``ComposedDpEvent``); :class:`PrivacyAccountant` only stores and interprets events. Events are
normalised to *atoms* (one Gaussian or Laplace release, optionally Poisson-sampled) with a count,
so 10 000 identical rounds cost one entry. Three accountants turn the history into ε at a δ:

* ``"rdp"`` — Rényi DP (Mironov 2017): opacus' RDP analysis (``opacus.accountants.analysis.rdp``,
  the same orders and conversion as ``RDPAccountant``) for (Poisson-subsampled) Gaussians, plus
  Mironov's closed form for unsampled Laplace; larger orders are added when the optimum is at
  opacus' largest (63). Cheap and always an upper bound, but the loosest. No Poisson-sampled Laplace.
* ``"prv"`` — privacy random variables (Gopi et al. 2021) via ``opacus.accountants.PRVAccountant``;
  Gaussian histories only; reports opacus' *upper* bound (estimate + ``eps_error``).
* ``"pld"`` — privacy loss distributions via ``dp_accounting.pld.PLDAccountant`` with pessimistic
  discretisation (an upper bound); supports Gaussian and Laplace, sampled or not.

:meth:`PrivacyAccountant.epsilon` reports the smallest (tightest) of the valid bounds.

Floating-point floor: a finite-precision sampler cannot produce the outermost tail of the
real-valued distribution the proofs analyse (:meth:`privfl.defenses.rng.NoiseSource.tail_floor`).
Each release may carry that probability as ``delta_floor``; the accountant adds the sum over all
releases to the δ it reports (:attr:`EpsilonReport.delta` = requested δ + floor) and refuses with
:class:`DeltaFloorError` when the floor exceeds :data:`MAX_FLOOR_FRACTION` of the requested δ. A numerical
accountant that fails, would need an unreasonable amount of memory (extreme parameters, ε in the
hundreds), or returns a non-finite value is left out of the report, with the reason kept in
:attr:`EpsilonReport.skipped`; a failed bound is never reported. Results are cached per
(event history, δ, accountant).

Oracles (benchmarks/RESULTS.md, "Accountant oracles"): z = 1.5, q = 0.04, 2250 steps, δ = 1e-5 → RDP
ε = 7.32911, PRV ε ≈ 6.777.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeAlias

import dp_accounting
import numpy as np
import scipy.optimize

from privfl.defenses.calibration import (
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
)
from privfl.errors import PrivflError

__all__ = [
    "ACCOUNTANTS",
    "DeltaFloorError",
    "EpsilonReport",
    "PrivacyAccountant",
    "PrivacyBudgetExceeded",
    "calibrate",
    "compute_epsilons",
]

ACCOUNTANTS = ("rdp", "prv", "pld")
"""Names accepted in ``accountants=``: Rényi DP, privacy random variables, privacy loss distributions."""

NUMERIC_EPSILON_LIMIT = 1000.0
"""PRV and PLD are not attempted when a cheap upper bound (RDP or pure-DP composition) exceeds this ε:
their discretisation grids grow with ε and would need gigabytes of memory for no useful tightness."""

MAX_NUMERIC_KINDS = 64
"""PRV and PLD are not attempted for histories with more distinct kinds of release (e.g. a sampling rate
that changes every round): each kind costs its own discretisation and convolution. RDP still applies."""

MAX_PRV_GRID = 1 << 22
"""Largest PRV discretisation grid (points) attempted; about 32 MB per float64 array."""

MAX_FLOOR_FRACTION = 0.01
"""Largest accepted floating-point δ floor (summed over releases), as a fraction of the requested δ."""

TIGHTEST = "tightest"
"""``calibrate(accountant=TIGHTEST)``: calibrate to the smallest valid bound, the one reports show."""

STATE_FORMAT = "privfl.accountant/1"


class PrivacyBudgetExceeded(PrivflError, RuntimeError):
    """Raised before a release that would push ε above the accountant's ``max_epsilon``."""


class DeltaFloorError(PrivflError, ValueError):
    """The releases' floating-point δ floor is above :data:`MAX_FLOOR_FRACTION` of the requested δ:
    no (ε, δ) at that δ can be claimed for the finite-precision mechanism."""


def check_delta_floor(value: float, name: str = "delta_floor") -> float:
    """``value`` as a float; ValueError unless finite and in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a real number, got {value!r}") from err
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return v


def _floor_ok(floor: float, delta: float) -> None:
    if floor > MAX_FLOOR_FRACTION * delta:
        raise DeltaFloorError(
            f"the noise's floating-point δ floor ({floor:.3g}, summed over the recorded releases) exceeds "
            f"{MAX_FLOOR_FRACTION:g} × δ = {MAX_FLOOR_FRACTION * delta:.3g}: no guarantee at δ = {delta:g} "
            "can be claimed. Ask for a larger δ, fewer releases or smaller updates (see "
            "privfl.defenses.rng.NoiseSource.tail_floor)"
        )


@dataclass(frozen=True)
class EpsilonReport:
    """ε (nats) spent at ``delta``: the tightest valid bound and every accountant's figure.

    ``delta`` is the δ the guarantee holds at: the δ the accountants were asked for plus
    ``delta_floor``, the floating-point floor of the recorded releases (module docstring).
    ``accountant`` names the accountant that gave ``epsilon``; ``by_accountant`` maps every accountant
    that produced a valid bound to its ε; ``skipped`` maps those left out to the reason.
    ``float(report)`` is ``report.epsilon``.
    """

    epsilon: float
    delta: float
    accountant: str
    by_accountant: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    delta_floor: float = 0.0

    def __float__(self) -> float:
        return float(self.epsilon)

    @property
    def requested_delta(self) -> float:
        """The δ the accountants computed ε at (``delta`` without the floor)."""
        return self.delta - self.delta_floor

    def __str__(self) -> str:
        others = ", ".join(f"{k} {v:.6g}" for k, v in self.by_accountant.items())
        shown = (
            f"{self.delta:g}"
            if not self.delta_floor
            else f"{self.delta:.6g} ({self.requested_delta:g} + floating-point floor {self.delta_floor:.3g})"
        )
        text = f"ε = {self.epsilon:.6g} at δ = {shown} ({self.accountant}; {others})"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return text


# ----------------------------------------------------------------------------------------------
# events -> atoms

_Atom: TypeAlias = (
    dp_accounting.DpEvent
)  # GaussianDpEvent | LaplaceDpEvent | PoissonSampledDpEvent(q<1, G|L) | NonPrivate
_NON_PRIVATE = dp_accounting.NonPrivateDpEvent()
_SUPPORTED = (
    "GaussianDpEvent, LaplaceDpEvent, PoissonSampledDpEvent(q, Gaussian or Laplace), "
    "SelfComposedDpEvent, ComposedDpEvent, NoOpDpEvent, NonPrivateDpEvent"
)


def _count(n: Any, name: str = "count") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    return int(n)


def _atoms(event: dp_accounting.DpEvent, count: int = 1) -> list[tuple[_Atom, int]]:
    """Flatten ``event`` (repeated ``count`` times) into (atom, count) pairs, validating parameters."""
    if count == 0 or isinstance(event, dp_accounting.NoOpDpEvent):
        return []
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
        return [(_NON_PRIVATE, count)]
    if isinstance(event, (dp_accounting.GaussianDpEvent, dp_accounting.LaplaceDpEvent)):
        what = "Gaussian" if isinstance(event, dp_accounting.GaussianDpEvent) else "Laplace"
        z = check_noise_multiplier(event.noise_multiplier, f"{what} noise_multiplier")
        if math.isinf(z):
            return []
        if z == 0:
            return [(_NON_PRIVATE, count)]
        return [(type(event)(z), count)]
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return _atoms(event.event, count * _count(event.count, "SelfComposedDpEvent.count"))
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return [a for e in event.events for a in _atoms(e, count)]
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        q = check_sample_rate(event.sampling_probability, "PoissonSampledDpEvent.sampling_probability")
        inner = _atoms(event.event, 1)
        if q == 0 or not inner:
            return []
        if q == 1:
            return [(a, c * count) for a, c in inner]
        if any(isinstance(a, dp_accounting.NonPrivateDpEvent) for a, _ in inner):
            return [(_NON_PRIVATE, count)]  # the sampled record is revealed with probability q > δ
        if all(isinstance(a, dp_accounting.GaussianDpEvent) for a, _ in inner):
            # Gaussians on the same sample compose into one with z_eff = (Σ c/z²)^(-1/2)
            z = sum(c / a.noise_multiplier**2 for a, c in inner) ** -0.5
            return [(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count)]
        if len(inner) == 1 and inner[0][1] == 1:
            return [(dp_accounting.PoissonSampledDpEvent(q, inner[0][0]), count)]
        raise ValueError(
            f"PoissonSampledDpEvent must wrap Gaussian events or a single LaplaceDpEvent, got {event.event!r}"
        )
    raise ValueError(f"unsupported DP event {type(event).__name__}; supported: {_SUPPORTED}")


def _parts(atom: _Atom) -> tuple[str, float, float]:
    """(mechanism, noise multiplier, sample rate) of an atom."""
    if atom is _NON_PRIVATE or isinstance(atom, dp_accounting.NonPrivateDpEvent):
        return ("non_private", 0.0, 1.0)
    q = 1.0
    if isinstance(atom, dp_accounting.PoissonSampledDpEvent):
        q, atom = atom.sampling_probability, atom.event
    kind = "gaussian" if isinstance(atom, dp_accounting.GaussianDpEvent) else "laplace"
    return (kind, float(atom.noise_multiplier), float(q))


def _make_atom(kind: str, z: float, q: float) -> _Atom:
    if kind == "non_private":
        return _NON_PRIVATE
    if kind not in ("gaussian", "laplace"):
        raise ValueError(f"unknown mechanism {kind!r} in accountant state")
    base = (dp_accounting.GaussianDpEvent if kind == "gaussian" else dp_accounting.LaplaceDpEvent)(z)
    return base if q == 1 else dp_accounting.PoissonSampledDpEvent(q, base)


_History = tuple[tuple[_Atom, int], ...]  # sorted multiset of atoms: the cache key


def _history_key(totals: dict[_Atom, int]) -> _History:
    return tuple(sorted(((a, c) for a, c in totals.items() if c > 0), key=lambda ac: _parts(ac[0])))


# ----------------------------------------------------------------------------------------------
# the three accountants on a history


class _Skip(Exception):
    """An accountant cannot give a valid bound for this history; the message says why."""


def _all_gaussian(history: _History) -> bool:
    return all(_parts(a)[0] == "gaussian" for a, _ in history)


# Orders added when the optimum sits at the largest default one (opacus' default orders stop at 63,
# which caps how small ε can get: about log(1/δ)/62 ≈ 0.19 at δ = 1e-5, whatever the noise).
_EXTRA_ORDERS = [
    64,
    72,
    80,
    96,
    112,
    128,
    160,
    192,
    256,
    320,
    384,
    512,
    768,
    1024,
    1536,
    2048,
    3072,
    4096,
    6144,
    8192,
]


def _laplace_rdp(b: float, orders: np.ndarray) -> np.ndarray:
    """RDP of the Laplace mechanism with scale/sensitivity ``b`` at orders α > 1 (Mironov 2017, Prop. 6):
    ``1/(α−1) · log(α/(2α−1)·e^{(α−1)/b} + (α−1)/(2α−1)·e^{−α/b})``."""
    a = np.asarray(orders, dtype=float)
    log_sum = np.logaddexp(np.log(a / (2 * a - 1)) + (a - 1) / b, np.log((a - 1) / (2 * a - 1)) - a / b)
    return log_sum / (a - 1)


def _rdp(history: _History, delta: float) -> float:
    """RDP curves summed over the history (opacus for Poisson-sampled Gaussians, Mironov's closed form
    for Laplace) and converted to (ε, δ) by opacus' conversion."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    if any(_parts(a)[0] == "laplace" and _parts(a)[2] < 1 for a, _ in history):
        raise _Skip("no RDP bound for Poisson-subsampled Laplace in opacus or dp-accounting")

    def spent(orders: list[float]) -> tuple[float, float]:
        total = np.zeros(len(orders))
        for a, c in history:
            kind, z, q = _parts(a)
            if kind == "gaussian":
                total += rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=c, orders=orders)
            else:
                total += c * _laplace_rdp(z, np.asarray(orders))
        eps, order = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
        return float(eps), float(order)

    eps, order = spent(RDPAccountant.DEFAULT_ALPHAS)
    if order >= max(RDPAccountant.DEFAULT_ALPHAS):
        eps, _ = spent(RDPAccountant.DEFAULT_ALPHAS + _EXTRA_ORDERS)
    return eps


def _pure_dp(history: _History) -> float:
    """Basic composition of pure ε-DP bounds (Laplace only): Σ count·ln(1 + q(e^{1/b} − 1))."""
    total = 0.0
    for a, c in history:
        kind, b, q = _parts(a)
        if kind != "laplace":
            raise _Skip("pure-DP bound only for Laplace events")
        eps = 1.0 / b
        total += c * (eps if q == 1 else math.log1p(q * math.expm1(eps)))
    return total


def _screen(history: _History, delta: float) -> tuple[str, float]:
    """A cheap valid upper bound (name, ε): RDP where it applies, else pure-DP composition."""
    try:
        return "rdp", _epsilon_cached("rdp", history, delta)
    except _Skip:
        return "basic", _pure_dp(history)


def _prv(history: _History, delta: float) -> float:
    if not _all_gaussian(history):
        raise _Skip("opacus' PRV accountant supports only (Poisson-subsampled) Gaussian events")
    from opacus.accountants import PRVAccountant

    class _GuardedPRV(PRVAccountant):
        def _get_domain(self, *args: Any, **kwargs: Any):  # returns opacus' Domain
            domain = super()._get_domain(*args, **kwargs)
            if domain.size > MAX_PRV_GRID:
                raise _Skip(f"PRV grid of {domain.size:,} points exceeds the limit of {MAX_PRV_GRID:,}")
            return domain

    _, eps_screen = _screen(history, delta)
    acc = _GuardedPRV()
    acc.history = [(z, q, c) for (_, z, q), c in ((_parts(a), c) for a, c in history)]
    # opacus' default eps_error = 0.01 is absolute; at large ε allow 0.1% relative to keep the grid small
    eps_error = max(0.01, 1e-3 * eps_screen)
    return float(acc.get_epsilon(delta, eps_error=eps_error))


def _pld(history: _History, delta: float) -> float:
    _, eps_screen = _screen(history, delta)
    # 1e-4 is dp-accounting's default grid; coarser at large ε (pessimistic either way, so still a bound)
    interval = max(1e-4, 1e-5 * eps_screen)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    for a, c in history:
        acc.compose(a, c)
    return float(acc.get_epsilon(delta))


_IMPLEMENTATIONS = {"rdp": _rdp, "prv": _prv, "pld": _pld}


@lru_cache(maxsize=1024)
def _epsilon_or_reason(name: str, history: _History, delta: float) -> tuple[float | None, str | None]:
    """(ε, None) from accountant ``name``, or (None, reason) when it gives no valid bound. Cached."""
    if not history:
        return 0.0, None
    if any(isinstance(a, dp_accounting.NonPrivateDpEvent) for a, _ in history):
        return math.inf, None
    if name != "rdp":
        try:
            cheap, eps_screen = _screen(history, delta)
        except _Skip as e:  # pragma: no cover - every supported history has a cheap bound
            return None, str(e)
        if len(history) > MAX_NUMERIC_KINDS:
            return None, (
                f"not attempted: {len(history)} distinct kinds of release "
                f"(more than {MAX_NUMERIC_KINDS}) would each need their own discretisation"
            )
        if eps_screen > NUMERIC_EPSILON_LIMIT:
            return None, (
                f"not attempted: {cheap} bound ε = {eps_screen:.4g} > {NUMERIC_EPSILON_LIMIT:g}, "
                "where the discretisation would need too much memory"
            )
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            eps = _IMPLEMENTATIONS[name](history, delta)
    except _Skip as e:
        return None, str(e)
    except Exception as e:  # a numerical accountant failing must not stop accounting
        return None, f"failed: {type(e).__name__}: {e}"[:300]
    if not math.isfinite(eps) or eps < 0:
        return None, f"returned an invalid bound ({eps!r})"
    return eps, None


def _epsilon_cached(name: str, history: _History, delta: float) -> float:
    eps, reason = _epsilon_or_reason(name, history, delta)
    if eps is None:
        raise _Skip(reason)
    return eps


def _report(history: _History, delta: float, names: Sequence[str], floor: float = 0.0) -> EpsilonReport:
    _floor_ok(floor, delta)
    by: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in names:
        eps, reason = _epsilon_or_reason(name, history, delta)
        if eps is None:
            skipped[name] = str(reason)
        else:
            by[name] = eps
    if not by:  # every requested accountant failed: fall back to the cheap bound, which always exists
        try:
            name, eps = _screen(history, delta)
        except _Skip as e:  # pragma: no cover - defensive: never report ε without a bound
            raise RuntimeError(f"no accountant could bound this history: {skipped}; {e}") from e
        by[name] = eps
    best = min(by, key=lambda k: by[k])
    return EpsilonReport(by[best], delta + floor, best, by, skipped, floor)


def _check_accountants(accountants: Sequence[str] | str) -> tuple[str, ...]:
    names = (accountants,) if isinstance(accountants, str) else tuple(accountants)
    if not names:
        raise ValueError(f"accountants must name at least one of {ACCOUNTANTS}")
    for n in names:
        if n not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {n!r}; choose from {ACCOUNTANTS}")
    return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------
# the stateful accountant


class PrivacyAccountant:
    """Records DP events and reports the (ε, δ) they cost, with an optional budget guard.

    Args:
        max_epsilon: budget in nats; :meth:`check_budget` refuses an event that would exceed it.
            ``None`` = no budget.
        delta: the δ at which :meth:`epsilon` reports by default.
        accountants: which of ``"rdp"``, ``"prv"``, ``"pld"`` to consult; the tightest valid bound wins.

    Sampling rates are Poisson sampling probabilities (see the module docstring for client-level
    DP-FedAvg vs sample-level DP-SGD). Consecutive identical events are stored once with a count.
    """

    def __init__(
        self, max_epsilon: float | None = None, delta: float = 1e-5, accountants: Sequence[str] = ACCOUNTANTS
    ):
        self.max_epsilon = None if max_epsilon is None else check_epsilon(max_epsilon, "max_epsilon")
        self.delta = check_delta(delta)
        self.accountants = _check_accountants(accountants)
        self._runs: list[list[Any]] = []  # [atom, count], consecutive identical atoms merged
        self._totals: dict[_Atom, int] = {}
        self._delta_floor = 0.0  # floating-point floor summed over the recorded releases

    # -- recording --------------------------------------------------------------------------

    def record(self, event: dp_accounting.DpEvent, *, delta_floor: float = 0.0) -> None:
        """Record one DP event (validated first; an invalid event records nothing).

        Accepts ``GaussianDpEvent(z)``, ``LaplaceDpEvent(b/Δ₁)``, ``PoissonSampledDpEvent(q, ·)`` of
        those (Poisson sampling with probability ``q``), ``SelfComposedDpEvent``, ``ComposedDpEvent``,
        ``NoOpDpEvent`` and ``NonPrivateDpEvent`` (ε = ∞ from then on).

        ``delta_floor``: the floating-point δ floor of everything ``event`` covers (for ``k`` releases,
        ``k`` × the per-release floor of :meth:`~privfl.defenses.rng.NoiseSource.tail_floor`); it is
        added to the δ reported from now on. A release is recorded even when its floor takes the
        total above the limit: :meth:`epsilon` then refuses to report rather than forget it.
        """
        atoms = _atoms(event)
        floor = check_delta_floor(delta_floor)
        self._add(atoms)
        self._delta_floor += floor

    def _add(self, atoms: Iterable[tuple[_Atom, int]]) -> None:
        for atom, c in atoms:
            if self._runs and self._runs[-1][0] == atom:
                self._runs[-1][1] += c
            else:
                self._runs.append([atom, c])
            self._totals[atom] = self._totals.get(atom, 0) + c

    def record_gaussian(
        self, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1, *, delta_floor: float = 0.0
    ) -> None:
        """Record ``steps`` Gaussian releases with z = noise std / L2 sensitivity, each on a Poisson
        sample with probability ``sample_rate`` (1 = everyone, no sampling). ``delta_floor``: the
        floating-point floor of all ``steps`` releases together (see :meth:`record`)."""
        z = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = _count(steps, "steps")
        self.record(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n
            ),
            delta_floor=delta_floor,
        )

    def record_laplace(self, noise_multiplier: float, steps: int = 1, *, delta_floor: float = 0.0) -> None:
        """Record ``steps`` Laplace releases with noise_multiplier = Laplace scale b / L1 sensitivity Δ₁
        (each is (1/noise_multiplier)-DP). ``delta_floor`` as in :meth:`record`."""
        b = check_noise_multiplier(noise_multiplier)
        self.record(
            dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(b), _count(steps, "steps")),
            delta_floor=delta_floor,
        )

    # -- reading ----------------------------------------------------------------------------

    @property
    def events(self) -> tuple[dp_accounting.DpEvent, ...]:
        """The recorded history, normalised: each run of ``n`` identical releases is
        ``SelfComposedDpEvent(atom, n)`` (just ``atom`` when ``n == 1``)."""
        return tuple(a if c == 1 else dp_accounting.SelfComposedDpEvent(a, c) for a, c in self._runs)

    @property
    def delta_floor(self) -> float:
        """The floating-point δ floor summed over the recorded releases (added to reported δ)."""
        return self._delta_floor

    @property
    def steps(self) -> int:
        """Number of noisy releases recorded (e.g. rounds for one mechanism per round)."""
        return sum(self._totals.values())

    def _history(self, extra: dp_accounting.DpEvent | None = None) -> _History:
        if extra is None:
            return _history_key(self._totals)
        totals = dict(self._totals)
        for atom, c in _atoms(extra):
            totals[atom] = totals.get(atom, 0) + c
        return _history_key(totals)

    def epsilon(self, delta: float | None = None) -> EpsilonReport:
        """ε (nats) spent so far at ``delta`` (default: the accountant's δ), the tightest valid bound
        over the configured accountants that support every recorded event. No events → ε = 0."""
        dlt = self.delta if delta is None else check_delta(delta)
        return _report(self._history(), dlt, self.accountants, self._delta_floor)

    def epsilon_if(
        self, event: dp_accounting.DpEvent, delta: float | None = None, *, delta_floor: float = 0.0
    ) -> EpsilonReport:
        """ε as if ``event`` (with its ``delta_floor``) were recorded too; the accountant is not changed."""
        dlt = self.delta if delta is None else check_delta(delta)
        return _report(
            self._history(event), dlt, self.accountants, self._delta_floor + check_delta_floor(delta_floor)
        )

    def check_budget(self, event: dp_accounting.DpEvent, *, delta_floor: float = 0.0) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if recording ``event`` would take ε above ``max_epsilon``,
        or :class:`DeltaFloorError` if its ``delta_floor`` would take the floor above the limit.

        Records nothing. Validates ``event`` even without a budget. A cheap RDP (or pure-DP) bound
        within budget settles the question without running the numerical accountants.
        """
        history = self._history(event)
        _floor_ok(self._delta_floor + check_delta_floor(delta_floor), self.delta)
        if self.max_epsilon is None:
            return
        try:
            if _screen(history, self.delta)[1] <= self.max_epsilon:
                return
        except _Skip:  # pragma: no cover - every supported history has a cheap bound
            pass
        report = _report(history, self.delta, self.accountants)
        if report.epsilon > self.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"this release would bring epsilon to {report.epsilon:.6g} (δ = {self.delta:g}, "
                f"{report.accountant}), above max_epsilon = {self.max_epsilon:g}; spent so far: "
                f"{self.epsilon().epsilon:.6g} over {self.steps} releases"
            )

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict: the recorded events (runs) and, for information, the configuration."""
        events = []
        for atom, c in self._runs:
            kind, z, q = _parts(atom)
            events.append({"mechanism": kind, "noise_multiplier": z, "sample_rate": q, "count": int(c)})
        return {
            "format": STATE_FORMAT,
            "max_epsilon": self.max_epsilon,
            "delta": self.delta,
            "accountants": list(self.accountants),
            "events": events,
            "delta_floor": self._delta_floor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the recorded events by those in ``state`` (from :meth:`state_dict`).

        The configuration (``max_epsilon``, ``delta``, ``accountants``) stays as constructed, so a
        resumed run cannot silently lose its budget.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a PrivacyAccountant state (expected format {STATE_FORMAT!r})")
        atoms: list[tuple[_Atom, int]] = []
        for e in state["events"]:
            atom = _make_atom(e["mechanism"], float(e["noise_multiplier"]), float(e["sample_rate"]))
            atoms.extend(_atoms(atom, _count(e["count"])))
        floor = check_delta_floor(state.get("delta_floor", 0.0))
        self._runs, self._totals = [], {}
        self._add(atoms)
        self._delta_floor = floor

    @classmethod
    def merge(cls, *accountants: PrivacyAccountant) -> PrivacyAccountant:
        """One accountant holding the events of all (sequential composition of what they recorded).

        Budget: the smallest ``max_epsilon`` set; δ: the smallest; accountants: the union, in order.
        """
        budgets = [a.max_epsilon for a in accountants if a.max_epsilon is not None]
        names = [n for a in accountants for n in a.accountants] or list(ACCOUNTANTS)
        merged = cls(
            max_epsilon=min(budgets) if budgets else None,
            delta=min((a.delta for a in accountants), default=1e-5),
            accountants=names,
        )
        for a in accountants:
            merged._add((atom, c) for atom, c in a._runs)
            merged._delta_floor += a._delta_floor
        return merged

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(max_epsilon={self.max_epsilon}, delta={self.delta}, "
            f"accountants={self.accountants}, steps={self.steps}, delta_floor={self._delta_floor:.3g})"
        )


# ----------------------------------------------------------------------------------------------
# functional helpers


def compute_epsilons(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountants: Sequence[str] = ACCOUNTANTS,
) -> dict[str, float]:
    """ε (nats) per accountant for ``steps`` Poisson-sampled Gaussian releases (z, q) at ``delta``.

    Accountants that fail for these parameters are omitted (see :attr:`EpsilonReport.skipped`).
    """
    acct = PrivacyAccountant(delta=delta, accountants=accountants)
    acct.record_gaussian(noise_multiplier, sample_rate, steps)
    names = acct.accountants
    return {k: v for k, v in acct.epsilon().by_accountant.items() if k in names}


@lru_cache(maxsize=256)
def calibrate(
    target_epsilon: float,
    delta: float,
    steps: int,
    sample_rate: float = 1.0,
    accountant: str | tuple[str, ...] = TIGHTEST,
) -> float:
    """Smallest noise multiplier z (noise std / L2 sensitivity) whose ε after ``steps`` Poisson-sampled
    Gaussian releases at rate ``sample_rate`` is at most ``target_epsilon`` at ``delta``.

    ``accountant``: ``"tightest"`` (default) calibrates to the smallest valid bound over
    :data:`ACCOUNTANTS` — the ε that :meth:`PrivacyAccountant.epsilon` reports for the same
    history — so the reported ε is <= target and within 1% of it; a tuple of names calibrates to
    the smallest bound among those (what a ``PrivacyAccountant(accountants=...)`` reports);
    ``"rdp"``, ``"prv"`` or ``"pld"`` to that accountant alone (then a tighter one may report less).

    Root-finding on log z (ε falls as z rises) after bracketing; the returned z has ε <= target and,
    in practice, within 1e-5 relative of it (guaranteed within 1%) under the chosen accountant.
    Results are cached.
    """
    target = check_epsilon(target_epsilon, "target_epsilon")
    dlt = check_delta(delta)
    n = _count(steps, "steps")
    q = check_sample_rate(sample_rate)
    if accountant == TIGHTEST:
        names: tuple[str, ...] = ACCOUNTANTS
    else:
        names = _check_accountants(accountant)
    if n == 0 or q == 0:
        raise ValueError("with no sampled steps any noise multiplier (even 0) gives epsilon 0")

    def eps(z: float) -> float:
        history = _history_key(
            dict(_atoms(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n))
        )
        if len(names) > 1:
            return _report(history, dlt, names).epsilon
        value, reason = _epsilon_or_reason(names[0], history, dlt)
        if value is None:
            raise ValueError(f"accountant {names[0]!r} gives no bound at noise multiplier {z:.6g}: {reason}")
        return value

    # bracket: eps(lo) > target >= eps(hi)
    hi = 1.0
    while eps(hi) > target:
        hi *= 4
        if hi > 1e7:
            raise ValueError(f"no noise multiplier up to 1e7 reaches epsilon {target}")
    lo = hi / 4
    while eps(lo) <= target:
        hi, lo = lo, lo / 4
        if lo < 1e-6:
            raise ValueError(f"epsilon {target} is reached with essentially no noise (z < 1e-6)")
    # root of log ε(z) = log target in log z (ε is smooth and monotone there), then make sure we are on
    # the safe side: ε(z) <= target
    log_z = scipy.optimize.brentq(
        lambda u: math.log(max(eps(math.exp(u)), 1e-300) / target), math.log(lo), math.log(hi), xtol=1e-6
    )
    z = min(math.exp(log_z), hi)
    step = 1e-6
    while eps(z) > target:
        z = min(z * (1 + step), hi)
        step *= 2
    if eps(z) < 0.99 * target:
        raise RuntimeError(
            f"calibration stalled: epsilon {eps(z):.6g} at z = {z:.6g} is not within 1% of "
            f"{target} (accountant {accountant!r} is not continuous here)"
        )
    return z
