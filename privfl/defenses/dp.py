"""Differential-privacy mechanisms on model updates: clipping, Gaussian and Laplace noise, FedDP.

The unit of privacy here is one **client** (client-level DP, as in DP-FedAvg, McMahan et al.
2018): two neighbouring rounds differ in one sampled client's update being present or replaced by
zero, with the aggregation weights (derived from public dataset sizes) fixed. Every mechanism
clips each client's update to its L2 (Gaussian) or L1 (Laplace) sensitivity *itself*, so the
sensitivity its noise is calibrated to holds whatever comes before it.

Noise placement for the Gaussian mechanism, with clip norm ``C``, noise multiplier ``z`` and
aggregation weights ``w`` (summing to 1):

* ``local`` — each client adds ``N(0, (zC)^2)`` to its clipped update before sending it. Every
  payload is itself ``z``-private, so an untrusted server learns no more than the accountant's
  (ε, δ) about any one client. Utility cost: the mean carries noise ``zC·sqrt(Σ w²)``.
* ``central`` — clients send clipped updates in the clear; the server adds
  ``N(0, (z·max(w)·C)^2)`` to the weighted mean (its sensitivity is ``max(w)·C``). Trusts the server.
* ``distributed`` — each client adds ``N(0, s^2)`` with ``s = z·max(w)·C / sqrt(Σ w²)``, so the
  weighted mean carries exactly the central noise. Only meaningful when the server sees nothing
  but the aggregate (secure aggregation or CKKS after it in a :class:`Compose`); without one, each
  payload is only protected by its own, smaller noise.

Each round the mechanism records one event in its :class:`PrivacyAccountant`
(``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` or ``LaplaceDpEvent``) after the server
aggregates; ``before_round`` refuses a round that would exceed ``max_epsilon``.

Noise comes from :class:`~privfl.defenses.rng.SecureNoise` (ChaCha20) unless a seeded source is
passed explicitly for reproducible experiments; the source's name is in ``describe()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import dp_accounting
import torch

from privfl.defenses.accounting import PrivacyAccountant
from privfl.defenses.base import Defense, Payload, RoundContext
from privfl.defenses.calibration import (
    analytic_gaussian_sigma,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sensitivity,
    classical_gaussian_sigma,
    laplace_scale,
)
from privfl.defenses.rng import NoiseSource, default_noise
from privfl.updates import Update, flatten_floating, unflatten, weighted_mean

Placement = Literal["local", "central", "distributed"]
PLACEMENTS = ("local", "central", "distributed")


def safe_norm(vec: torch.Tensor, p: float = 2.0) -> float:
    """``||vec||_p`` in float64 without overflow or underflow: the vector is divided by its largest
    magnitude first (``3e38`` float32 or ``1e300`` float64 values square to inf otherwise, and
    ``1e-300`` ones to 0). ``inf`` for a vector holding inf, ``nan`` for one holding NaN."""
    if vec.numel() == 0:
        return 0.0
    peak = float(vec.detach().abs().max().to(torch.float64))
    if peak == 0.0 or not math.isfinite(peak):
        return peak
    return peak * float(torch.linalg.vector_norm(vec.detach().to(torch.float64) / peak, ord=p))


def clip_vector(vec: torch.Tensor, max_norm: float, p: float = 2.0) -> torch.Tensor:
    """``vec · min(1, max_norm / ||vec||_p)`` (direction kept), with ``||out||_p <= max_norm`` for every
    finite input of every float dtype.

    The scaling is done in float64 on ``vec / max|vec|`` (so neither the norm nor the factor over- or
    underflows, whatever the magnitudes), then cast back; if rounding to ``vec``'s dtype pushed the
    norm above ``max_norm``, the result is shrunk again until it holds.
    """
    norm = safe_norm(vec, p)
    if not math.isfinite(norm):
        raise ValueError(f"clip_vector: the vector's norm is {norm} (it holds NaN or inf values)")
    if norm <= max_norm:
        return vec
    peak = float(vec.detach().abs().max().to(torch.float64))
    unit = vec.to(torch.float64) / peak  # entries in [-1, 1], its norm in [1, numel^(1/p)]
    factor = max_norm / float(torch.linalg.vector_norm(unit, ord=p))
    out = (unit * factor).to(vec.dtype)
    shrink = 1.0
    while safe_norm(out, p) > max_norm:  # rounding to a narrow dtype can add a few ulps
        shrink *= 1 - max(4 * torch.finfo(vec.dtype).eps, 1e-12)
        out = (unit * (factor * shrink)).to(vec.dtype)
    return out


def _survivor_weights(ctx: RoundContext) -> list[float]:
    """Aggregation weights of the clients whose payload arrived (all sampled ones if unknown)."""
    survivors = ctx.survivors
    if survivors is None:
        return list(ctx.weights)
    return [ctx.weight_of(c) for c in survivors]


class ClipUpdate(Defense):
    """Clip each client's update to L2 norm ``max_norm`` (the update's units, e.g. weight deltas).

    ``per_layer=False`` scales the whole update by ``min(1, C/||u||)``. ``per_layer=True`` clips
    every entry to ``C/sqrt(L)`` (``L`` = number of entries), so the total norm is still at most
    ``C`` and downstream noise calibrated to ``C`` stays valid.

    Threat model: none by itself — clipping bounds sensitivity; privacy comes from noise after it.
    """

    def __init__(self, max_norm: float, per_layer: bool = False):
        self.max_norm = check_sensitivity(max_norm)
        self.per_layer = bool(per_layer)

    def protect(self, update: Update, ctx: RoundContext) -> Update:
        vec, spec = flatten_floating(update, "ClipUpdate")
        if not self.per_layer:
            return unflatten(clip_vector(vec, self.max_norm), spec)
        per_entry = self.max_norm / math.sqrt(max(1, len(spec.entries)))
        pieces = [clip_vector(vec[e.offset : e.offset + e.numel], per_entry) for e in spec.entries]
        return unflatten(torch.cat(pieces) if pieces else vec, spec)

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        return weighted_mean(list(payloads), ctx.weights)

    def __repr__(self) -> str:
        return f"ClipUpdate(max_norm={self.max_norm}, per_layer={self.per_layer})"


class _NoiseMechanism(Defense):
    """Shared plumbing: noise source, accountant, budget guard, state."""

    placement: str

    def __init__(
        self,
        noise: NoiseSource | None,
        accountant: PrivacyAccountant | None,
        max_epsilon: float | None,
        delta: float,
    ):
        self.noise = noise if noise is not None else default_noise()
        if not getattr(self.noise, "secure", False):
            warnings.warn(
                f"{type(self).__name__}: noise source {self.noise.name!r} is not cryptographically "
                "secure — fine for reproducible experiments, not for real deployments",
                stacklevel=3,
            )
        if max_epsilon is not None:
            check_epsilon(max_epsilon)
            if accountant is not None:
                raise ValueError("give max_epsilon to the PrivacyAccountant you pass, not to the mechanism")
        self.accountant = accountant or PrivacyAccountant(max_epsilon=max_epsilon, delta=check_delta(delta))

    def event(self, ctx: RoundContext) -> dp_accounting.DpEvent:  # pragma: no cover - abstract
        raise NotImplementedError

    def _noise_key(self, ctx: RoundContext) -> tuple:
        who = "server" if ctx.client_id is None else ctx.client_id
        return (type(self).__name__, ctx.round, who)

    def before_round(self, ctx: RoundContext) -> None:
        self.accountant.check_budget(self.event(ctx))

    # -- the floating-point floor of one round -------------------------------------------------

    _noise_kind: Literal["gaussian", "laplace"] = "gaussian"

    def noise_draws(self, ctx: RoundContext) -> int:
        """How many independent noise draws the released aggregate sums: 1 for ``local`` (the
        protected client's own draw) and ``central`` (the server's), the survivors for
        ``distributed`` (each adds a share)."""
        return len(_survivor_weights(ctx)) if self.placement == "distributed" else 1

    def delta_floor(self, ctx: RoundContext, numel: int) -> float:
        """The round's floating-point δ floor for an update of ``numel`` values: the tail mass the
        noise source cannot produce (:meth:`~privfl.defenses.rng.NoiseSource.tail_floor`), union-bounded
        over :meth:`noise_draws`."""
        return self.noise_draws(ctx) * self.noise.tail_floor(self._noise_kind, int(numel))

    # -- the round's release: checked before it is revealed, recorded once it is -----------------

    def check_release(self, ctx: RoundContext, numel: int) -> None:
        """Server side, once the survivors are known (``ctx.survivors``) and **before** the
        aggregate is unmasked, decrypted or noised: raise :class:`PrivacyBudgetExceeded` (or
        :class:`~privfl.defenses.accounting.DeltaFloorError`) if this round's release does not fit,
        so that the round is aborted with nothing revealed."""
        self.accountant.check_budget(self.event(ctx), delta_floor=self.delta_floor(ctx, numel))

    def record_release(self, ctx: RoundContext, numel: int) -> None:
        """Record the round's release in the accountant. Never refuses: what was revealed is
        always recorded (:meth:`check_release` is the gate)."""
        self.accountant.record(self.event(ctx), delta_floor=self.delta_floor(ctx, numel))

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        self.before_round(ctx)
        return self.finalize(weighted_mean(list(payloads), ctx.weights), ctx)

    def finalize(self, mean_update: Update, ctx: RoundContext) -> Update:
        """Add central noise (``central``) and record the round. Under ``central`` the budget is
        checked first, since the noised mean is the release; under ``local`` and ``distributed`` the
        release has already happened (payloads sent, or the aggregate unmasked after
        :meth:`check_release`), so it is recorded unconditionally."""
        numel = sum(t.numel() for t in mean_update.values() if t.is_floating_point())
        if self.placement == "central":
            self.check_release(ctx, numel)
        out = self._server_noise(mean_update, ctx)
        self.record_release(ctx, numel)
        return out

    # subclasses: the norm they clip in, where clients add noise, the clip bound and the noise draw
    _norm_ord: float = 2.0
    _client_noise_placements: tuple[str, ...] = ("local",)

    def _clip_bound(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sample(self, vec: torch.Tensor, ctx: RoundContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def protect(self, update: Update, ctx: RoundContext) -> Update:
        vec, spec = flatten_floating(update, type(self).__name__)
        vec = clip_vector(vec, self._clip_bound(), p=self._norm_ord)
        if self.placement in self._client_noise_placements:
            vec = vec + self._sample(vec, ctx)
        return unflatten(vec, spec)

    def _server_noise(self, mean_update: Update, ctx: RoundContext) -> Update:
        if self.placement != "central":
            return mean_update
        vec, spec = flatten_floating(mean_update, f"{type(self).__name__} (server)")
        return unflatten(vec + self._sample(vec, ctx), spec)

    def epsilon(self, delta: float | None = None):
        """The (ε, δ) spent so far, from the accountant (tightest valid bound)."""
        return self.accountant.epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "accountant" in state:
            self.accountant.load_state_dict(state["accountant"])


class GaussianMechanism(_NoiseMechanism):
    """Clip each client's update to L2 norm ``sensitivity`` (C) and add Gaussian noise.

    Give either ``noise_multiplier`` (z: noise std = z·C on the aggregate's scale, see the module
    docstring for placements) or ``epsilon`` and ``delta`` for one release, calibrated by the
    analytic Gaussian mechanism (Balle & Wang 2018; ``calibration="classical"`` uses
    ``sqrt(2 ln(1.25/δ))/ε`` and is refused for ε >= 1 where it is not proven). Per-round ε, δ do
    not compose linearly over rounds: the accountant reports the total.

    ``sensitivity`` may be omitted inside :class:`Compose` after a :class:`ClipUpdate`, whose
    ``max_norm`` it then uses.

    Threat model: ``local`` — nobody is trusted with a client's update; ``central`` — the server
    is trusted (it sees clipped updates in the clear), outsiders and later users of the model are
    not; ``distributed`` — the server sees only the sum (secure aggregation required).
    What leaks: everything the accountant's (ε, δ) allows, per client, over all recorded rounds.
    """

    def __init__(
        self,
        noise_multiplier: float | None = None,
        *,
        epsilon: float | None = None,
        delta: float | None = None,
        sensitivity: float | None = None,
        placement: Placement = "local",
        colluders: int | None = None,
        calibration: Literal["analytic", "classical"] = "analytic",
        noise: NoiseSource | None = None,
        accountant: PrivacyAccountant | None = None,
        max_epsilon: float | None = None,
        accounting_delta: float = 1e-5,
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if calibration not in ("analytic", "classical"):
            raise ValueError(f"calibration must be 'analytic' or 'classical', got {calibration!r}")
        if (noise_multiplier is None) == (epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or (epsilon, delta)")
        if noise_multiplier is not None:
            if delta is not None:
                raise ValueError(
                    "delta calibrates the noise from epsilon; with noise_multiplier use accounting_delta"
                )
            self.noise_multiplier = check_noise_multiplier(noise_multiplier)
            self.calibrated_from: tuple[float, float] | None = None
        else:
            if delta is None:
                raise ValueError("epsilon needs a delta to calibrate Gaussian noise")
            assert epsilon is not None  # exactly one of noise_multiplier / epsilon, checked above
            eps, dlt = check_epsilon(epsilon), check_delta(delta)
            sigma_unit = (
                analytic_gaussian_sigma(eps, dlt, 1.0)
                if calibration == "analytic"
                else classical_gaussian_sigma(eps, dlt, 1.0)
            )
            self.noise_multiplier = sigma_unit
            self.calibrated_from = (eps, dlt)
        self.sensitivity = check_sensitivity(sensitivity) if sensitivity is not None else None
        self.placement = placement
        if colluders is not None:
            if isinstance(colluders, bool) or not isinstance(colluders, int) or colluders < 0:
                raise ValueError(f"colluders must be an int >= 0, got {colluders!r}")
            if placement != "distributed":
                raise ValueError(
                    "colluders applies to placement='distributed' only: under 'local' each client's "
                    "noise is its own, under 'central' the server adds it"
                )
        self.colluders: int | None = colluders
        self.calibration = calibration
        super().__init__(noise, accountant, max_epsilon, accounting_delta)

    def bind(self, before: Sequence[Defense], after: Sequence[Defense]) -> None:
        """Called by :class:`Compose`: inherit C from a preceding ClipUpdate; check distributed noise
        is followed by an aggregator that hides individual updates, and take the number of colluders
        to withstand from it when not given (``threshold − 1`` under SecureAggregation)."""
        if self.sensitivity is None:
            clips = [d for d in before if isinstance(d, ClipUpdate)]
            if clips:
                self.sensitivity = clips[-1].max_norm
        if self.placement != "distributed":
            return
        hiding = [d for d in after if d.hides_individual_updates]
        if not hiding:
            warnings.warn(
                "distributed Gaussian noise without a secure aggregator after it: the server sees "
                "each client's update with only its share of the noise",
                stacklevel=3,
            )
        elif self.colluders is None:
            self.colluders = hiding[0].tolerated_colluders

    @property
    def assumed_colluders(self) -> int:
        """Colluding clients the ``distributed`` accounting withstands (0 for other placements)."""
        return (self.colluders or 0) if self.placement == "distributed" else 0

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        if self.placement == "distributed":  # aggregating itself: the payloads were seen in the clear
            warnings.warn(
                "GaussianMechanism(placement='distributed') aggregated in the clear: each client's "
                "update carried only its share of the noise. Put SecureAggregation or "
                "CKKSAggregation after it in a Compose",
                stacklevel=2,
            )
        return super().aggregate(payloads, ctx)

    @property
    def clip_norm(self) -> float:
        if self.sensitivity is None:
            raise ValueError(
                "GaussianMechanism needs sensitivity= (the L2 clip norm C), or a ClipUpdate "
                "before it in a Compose"
            )
        return self.sensitivity

    def effective_noise_multiplier(self, ctx: RoundContext) -> float:
        """The z the round's aggregate carries against the threat model. Equals ``noise_multiplier``
        except under ``distributed`` placement, where each client adds a share
        ``s = z·max w·C / sqrt(Σ w²)`` sized for all sampled clients, and two things take noise away:

        * dropouts (``ctx.extra["survivors"]``, set by :class:`Compose`): only the survivors' shares
          reach the renormalised mean;
        * colluders (:attr:`assumed_colluders`): clients colluding with the server know their own
          shares and subtract them. The worst case is taken: the protected client is the survivor
          of largest weight ``w_t`` and the colluders are the next-largest survivors, so only the
          other honest survivors' shares ``H`` remain:
          ``z_eff = s · sqrt(w_t² + Σ_H w²) / (w_t · C)``.

        With no dropout and no colluder this is ``z``; n = 5 equal weights, 2 colluders:
        ``sqrt(3/5)·z ≈ 0.775·z``.
        """
        survivors = _survivor_weights(ctx)
        if self.placement != "distributed" or not survivors:
            return self.noise_multiplier
        w = ctx.weights
        ws = sorted(survivors, reverse=True)
        if len(ws) == len(w) and self.assumed_colluders == 0:
            return self.noise_multiplier
        honest = [ws[0], *ws[1 + self.assumed_colluders :]]
        share = self.noise_multiplier * max(w) / math.sqrt(sum(x * x for x in w))  # s / C
        return share * math.sqrt(sum(x * x for x in honest)) / ws[0]

    def event(self, ctx: RoundContext) -> dp_accounting.DpEvent:
        """The round's privacy event for the accountant: a Gaussian with the noise multiplier that
        reaches the aggregate (:meth:`effective_noise_multiplier`), Poisson-subsampled when
        ``ctx.sampling_rate < 1``."""
        gaussian = dp_accounting.GaussianDpEvent(self.effective_noise_multiplier(ctx))
        if ctx.sampling_rate < 1:
            return dp_accounting.PoissonSampledDpEvent(ctx.sampling_rate, gaussian)
        return gaussian

    def noise_std(self, ctx: RoundContext) -> float:
        """Std of the noise this party adds in ``ctx`` (client side if ``ctx.client_id`` is set),
        in the update's units."""
        c = self.clip_norm
        w = ctx.weights
        if self.placement == "local":
            return self.noise_multiplier * c
        if self.placement == "central":  # server side: the survivors' renormalised weights
            ws = _survivor_weights(ctx)
            return self.noise_multiplier * max(ws) / sum(ws) * c
        return self.noise_multiplier * max(w) * c / math.sqrt(sum(x * x for x in w))

    _client_noise_placements = ("local", "distributed")

    def _clip_bound(self) -> float:
        return self.clip_norm

    def _sample(self, vec: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        return self.noise.gaussian(
            vec.shape, self.noise_std(ctx), key=self._noise_key(ctx), dtype=vec.dtype, device=vec.device
        )

    def __repr__(self) -> str:
        return (
            f"GaussianMechanism(noise_multiplier={self.noise_multiplier:.6g}, "
            f"sensitivity={self.sensitivity}, placement={self.placement!r}, noise={self.noise.name!r})"
        )


class LaplaceMechanism(_NoiseMechanism):
    """Clip each client's update to **L1** norm ``sensitivity`` (Δ₁) and add Laplace noise with scale
    ``b = Δ₁/ε`` per coordinate: pure ε-DP per release (δ = 0), composed over rounds by the
    accountant.

    Placement ``local`` (each client noises its own update) or ``central`` (the server noises the
    weighted mean with ``b = max(w)·Δ₁/ε``). The L1 norm of a whole model update is large, so this
    mechanism is for small updates and for comparison; the Gaussian mechanism scales far better.

    Threat model: as :class:`GaussianMechanism` for the same placement.
    """

    def __init__(
        self,
        epsilon: float,
        sensitivity: float,
        *,
        placement: Literal["local", "central"] = "local",
        noise: NoiseSource | None = None,
        accountant: PrivacyAccountant | None = None,
        max_epsilon: float | None = None,
        accounting_delta: float = 1e-5,
    ):
        if placement not in ("local", "central"):
            raise ValueError(f"LaplaceMechanism placement must be 'local' or 'central', got {placement!r}")
        self.epsilon_per_round = check_epsilon(epsilon)
        self.sensitivity = check_sensitivity(sensitivity)
        self.placement = placement
        super().__init__(noise, accountant, max_epsilon, accounting_delta)

    def event(self, ctx: RoundContext) -> dp_accounting.DpEvent:
        """The round's privacy event: a Laplace mechanism with pure ε = ``epsilon_per_round``,
        Poisson-subsampled when ``ctx.sampling_rate < 1``."""
        laplace = dp_accounting.LaplaceDpEvent(1.0 / self.epsilon_per_round)  # scale / L1 sensitivity
        if ctx.sampling_rate < 1:
            return dp_accounting.PoissonSampledDpEvent(ctx.sampling_rate, laplace)
        return laplace

    def scale(self, ctx: RoundContext) -> float:
        """Laplace scale ``b`` this party uses, in the update's units."""
        b = laplace_scale(self.epsilon_per_round, self.sensitivity)
        if self.placement == "local":
            return b
        ws = _survivor_weights(ctx)  # server side: the survivors' renormalised weights
        return b * max(ws) / sum(ws)

    _norm_ord = 1.0
    _noise_kind: Literal["gaussian", "laplace"] = "laplace"

    def _clip_bound(self) -> float:
        return self.sensitivity

    def _sample(self, vec: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        return self.noise.laplace(
            vec.shape, self.scale(ctx), key=self._noise_key(ctx), dtype=vec.dtype, device=vec.device
        )

    def __repr__(self) -> str:
        return (
            f"LaplaceMechanism(epsilon={self.epsilon_per_round}, sensitivity={self.sensitivity}, "
            f"placement={self.placement!r}, noise={self.noise.name!r})"
        )


class FedDPNoise(GaussianMechanism):
    """FedDP's Eq. 11 as written: each client clips its update to L2 norm ``clip`` (C) and Gaussian
    noise ``N(0, σ²C²I)`` is added — ``sigma`` (σ) is the **noise multiplier** (dimensionless), the
    noise std is ``σ·C`` in the update's units, and the accountant records ``z = σ``.

    Eq. 11 reads ``θ_{t+1} = θ_t + (1/k)(Σ_i Δθ^i / max(1, ‖Δθ^i‖₂/C) + N(0, σ²C²I))``. The paper's
    text and its Eq. 11 place the noise differently; both readings are offered:

    * ``placement="local"`` (default) — the paper's text: each client adds ``N(0, σ²C²)`` to its own
      clipped upload, so every upload is its own ``z = σ`` release and nobody, the server included,
      is trusted with a client's update. The mean of ``k`` uploads carries std ``σC/√k``.
    * ``placement="central"`` — Eq. 11 literally: one ``N(0, σ²C²)`` term on the sum of the clipped
      updates, divided by ``k`` with them (std ``σC/k`` on the mean, sensitivity ``C/k``, so again
      ``z = σ``). The server sees the clipped updates in the clear and is trusted.

    The paper's setting (σ 0.5, C 0.05, 5 clients, 150 rounds) costs ε ≈ 403.5 at δ = 1e-5 (one
    round ≈ 10.0): ``python -m privfl.bench feddp``. FedDP states ε = C/σ (Eq. 14), which is not a
    differential-privacy guarantee (it ignores δ, the Gaussian tail and composition over rounds);
    :attr:`paper_epsilon` returns it for comparison only and :meth:`epsilon` what the accountant proves.

    Threat model: as :class:`GaussianMechanism` with the same placement.
    """

    def __init__(
        self,
        sigma: float,
        clip: float,
        *,
        placement: Literal["local", "central"] = "local",
        noise: NoiseSource | None = None,
        accountant: PrivacyAccountant | None = None,
        max_epsilon: float | None = None,
        accounting_delta: float = 1e-5,
    ):
        if not (
            isinstance(sigma, (int, float))
            and not isinstance(sigma, bool)
            and math.isfinite(sigma)
            and sigma > 0
        ):
            raise ValueError(
                f"FedDPNoise: sigma (the noise multiplier of Eq. 11) must be a positive finite "
                f"number, got {sigma!r}"
            )
        if placement not in ("local", "central"):
            raise ValueError(
                f"FedDPNoise placement must be 'local' (the paper's text) or 'central' (Eq. 11's "
                f"single noise term), got {placement!r}"
            )
        clip = check_sensitivity(clip)
        self.sigma = float(sigma)
        super().__init__(
            self.sigma,
            sensitivity=clip,
            placement=placement,
            noise=noise,
            accountant=accountant,
            max_epsilon=max_epsilon,
            accounting_delta=accounting_delta,
        )

    def bind(self, before: Sequence[Defense], after: Sequence[Defense]) -> None:
        return None  # C is part of Eq. 11; never inherited

    @property
    def paper_epsilon(self) -> float:
        """FedDP's Eq. 14, ε = C/σ — **not** a DP guarantee; shown only for comparison."""
        return self.clip_norm / self.sigma

    def __repr__(self) -> str:
        return (
            f"FedDPNoise(sigma={self.sigma}, clip={self.sensitivity}, placement={self.placement!r}, "
            f"noise={self.noise.name!r})"
        )
