"""The defenses ``attack-vs-dp`` sweeps over: a registry of named settings, each a factory of a fresh
:class:`~privfl.defenses.base.Defense` plus the one line of threat model the report prints.

Names with an ε are parametric: ``gauss-central-eps<E>``, ``gauss-distributed-eps<E>`` and
``laplace-eps<E>`` accept any positive ``E`` (the total ε at the sweep's δ over all rounds; the
Gaussian noise multiplier is calibrated to it with :func:`~privfl.defenses.accounting.calibrate`,
Laplace spends ``E / rounds`` per round, composed by the accountant).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import dp_accounting
from torch import nn

from privfl.defenses import (
    CKKSAggregation,
    ClipUpdate,
    Compose,
    FedDPNoise,
    GaussianMechanism,
    LaplaceMechanism,
    NoDefense,
    PartialSharing,
    SecureAggregation,
)
from privfl.defenses.accounting import calibrate
from privfl.defenses.base import Defense, RoundContext
from privfl.defenses.rng import NoiseSource, SecureNoise, SeededNoise
from privfl.seeding import derive_seed

DEFAULT_SETTINGS = (
    "none",
    "feddp",
    "gauss-central-eps8",
    "gauss-central-eps1",
    "gauss-distributed-eps8",
    "gauss-distributed-eps1",
    "laplace-eps8",
    "partial-encoders",
    "ckks",
)


@dataclass(frozen=True)
class SweepSpec:
    """What every setting's defense is built for.

    Attributes:
        rounds: FL rounds (DP noise is calibrated to the total ε over all of them).
        num_clients: clients per round (all sampled: no amplification claimed).
        delta: δ of every (ε, δ) reported.
        clip: L2 clip norm C of the Gaussian settings' client updates (update units; the L1 bound of
            the Laplace setting is ``clip`` too).
        feddp_sigma, feddp_clip: FedDP's Eq. 11 (noise multiplier σ, noise std σ·C; clip C), as
            published 0.5 and 0.05.
        ckks_clip: the L2 clip that gives CKKS its public bound on |value|; large, so that it does not
            bind on ordinary updates (no DP here: clipping would only slow training).
        seed: seeds the noise when ``seeded_noise``.
        seeded_noise: reproducible noise (NOT secure; for experiments) instead of ChaCha20.
    """

    rounds: int
    num_clients: int
    delta: float = 1e-5
    clip: float = 0.5
    feddp_sigma: float = 0.5
    feddp_clip: float = 0.05
    seed: int = 0
    seeded_noise: bool = False
    ckks_clip: float = 10.0

    def noise(self, stream: str) -> NoiseSource:
        """The noise source of one mechanism: ``SecureNoise``, or with ``seeded_noise`` a
        ``SeededNoise`` keyed by ``(seed, stream)`` (its insecurity warning silenced)."""
        if not self.seeded_noise:
            return SecureNoise()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SeededNoise(derive_seed(self.seed, stream))

    def round_context(self, round_idx: int = 0, client_id: int | None = None) -> RoundContext:
        """Round ``round_idx`` with every client sampled at equal weight (as client ``client_id``)."""
        n = self.num_clients
        return RoundContext(
            round=round_idx,
            num_clients=n,
            sampled=tuple(range(n)),
            weights=(1.0 / n,) * n,
            client_id=client_id,
            seed=self.seed,
        )


@dataclass(frozen=True)
class Setting:
    """One point of the sweep.

    Attributes:
        name: the registry name (``--settings``).
        label: short text for tables and plots.
        threat: who sees what, one line.
        build: ``build(spec, model) -> Defense`` (a fresh instance each call).
        target_epsilon: the ε the setting is calibrated to, or ``None``.
    """

    name: str
    label: str
    threat: str
    build: Callable[[SweepSpec, nn.Module], Defense]
    target_epsilon: float | None = None


def encoder_patterns(model: nn.Module) -> list[str]:
    """Name patterns of a model's encoder parameters: DHU-Net's two branches, or a U-Net's ``down``
    path (and its bottleneck)."""
    children = {name for name, _ in model.named_children()}
    if {"global_branch", "local_branch"} <= children:
        return ["global_branch.*", "local_branch.*"]
    if "down" in children:
        return ["down.*"] + (["bottom.*"] if "bottom" in children else [])
    raise ValueError(
        f"partial-encoders: no known encoder in {type(model).__name__} (children: {sorted(children)})"
    )


def _gaussian(placement: str, eps: float) -> Callable[[SweepSpec, nn.Module], Defense]:
    def build(spec: SweepSpec, model: nn.Module) -> Defense:
        z = calibrate(eps, spec.delta, spec.rounds)
        threshold = max(2, spec.num_clients // 2 + 1)
        if placement == "distributed":
            # SecAgg(t) withstands t - 1 colluders, who subtract their own noise shares: calibrate so
            # that what is left (the effective z) reaches the target
            probe = GaussianMechanism(noise_multiplier=1.0, placement="distributed", colluders=threshold - 1)
            z /= probe.effective_noise_multiplier(spec.round_context())
        mech = GaussianMechanism(
            noise_multiplier=z,
            sensitivity=spec.clip,
            placement=placement,  # type: ignore[arg-type]
            noise=spec.noise(f"gauss-{placement}"),
            max_epsilon=eps * (1 + 1e-6),
            accounting_delta=spec.delta,
        )
        stages: list[Defense] = [ClipUpdate(spec.clip), mech]
        if placement == "distributed":
            # the masked sum must hold the clipped update plus every client's noise share: ±(C + 6 std)
            std = mech.noise_std(spec.round_context(client_id=0))
            stages.append(SecureAggregation(threshold=threshold, clip_range=spec.clip + 6 * std))
        return Compose(*stages)

    return build


def _laplace(eps: float) -> Callable[[SweepSpec, nn.Module], Defense]:
    def build(spec: SweepSpec, model: nn.Module) -> Defense:
        return LaplaceMechanism(
            eps / spec.rounds,
            sensitivity=spec.clip,
            placement="central",
            noise=spec.noise("laplace"),
            max_epsilon=eps * (1 + 1e-6),
            accounting_delta=spec.delta,
        )

    return build


def _fixed(name: str) -> Setting | None:
    if name == "none":
        return Setting(
            "none", "no defense", "the server sees every client's update", lambda s, m: NoDefense()
        )
    if name == "feddp":
        return Setting(
            "feddp",
            "FedDP (σ 0.5, C 0.05)",
            "local DP: each client clips to C and adds N(0, σ²C²) before sending (Eq. 11)",
            lambda s, m: FedDPNoise(
                s.feddp_sigma, s.feddp_clip, noise=s.noise("feddp"), accounting_delta=s.delta
            ),
        )
    if name == "partial-encoders":
        return Setting(
            "partial-encoders",
            "partial: encoders shared",
            "the server sees the encoder part of every update in the clear; decoders stay local",
            lambda s, m: PartialSharing(share=encoder_patterns(m)),
        )
    if name == "ckks":
        # CKKS needs a public bound on |value|: a clip norm bounds every coordinate
        return Setting(
            "ckks",
            "CKKS aggregation",
            "the server sees ciphertexts only; key-holding clients see the mean update",
            lambda s, m: Compose(ClipUpdate(s.ckks_clip), CKKSAggregation("precise")),
        )
    return None


_PARAMETRIC = re.compile(r"^(gauss-central|gauss-distributed|laplace)-eps(\d+(?:\.\d+)?(?:e-?\d+)?)$")


def get_setting(name: str) -> Setting:
    """The setting called ``name``; ``ValueError`` listing the valid names otherwise."""
    fixed = _fixed(name)
    if fixed is not None:
        return fixed
    m = _PARAMETRIC.match(name)
    if m is None:
        raise ValueError(
            f"unknown setting {name!r}; valid: none, feddp, partial-encoders, ckks, "
            "gauss-central-eps<E>, gauss-distributed-eps<E>, laplace-eps<E> (E > 0, e.g. eps8)"
        )
    kind, eps = m.group(1), float(m.group(2))
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"setting {name!r}: ε must be positive and finite")
    if kind == "laplace":
        return Setting(
            name,
            f"Laplace central ε={eps:g}",
            "central DP: the server sees clipped updates and adds Laplace noise to the mean",
            _laplace(eps),
            eps,
        )
    placement = kind.split("-")[1]
    threat = (
        "central DP: the server sees clipped updates, adds noise to the mean (trusted server)"
        if placement == "central"
        else "distributed DP + secure aggregation: the server sees only the noised sum (ε holds against "
        "t − 1 clients colluding with it)"
    )
    return Setting(name, f"Gaussian {placement} ε={eps:g}", threat, _gaussian(placement, eps), eps)


def parse_settings(text: str | None) -> list[Setting]:
    """``--settings`` (comma-separated names; ``None`` = the default sweep) → settings, validated."""
    names = list(DEFAULT_SETTINGS) if not text else [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError("--settings is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--settings names a setting twice: {', '.join(dupes)}")
    return [get_setting(n) for n in names]


def planned_epsilon(defense: Defense, spec: SweepSpec) -> float | None:
    """The ε (at ``spec.delta``) the defense's accountant will report after ``spec.rounds`` full
    rounds, computed before any training; ``None`` for a defense without an accountant."""
    accountant = getattr(defense, "accountant", None)
    if accountant is None:
        return None
    stages = getattr(defense, "stages", (defense,))
    events = [st.event(spec.round_context()) for st in stages if hasattr(st, "event")]
    composed = dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(e, spec.rounds) for e in events]
    )
    return float(accountant.epsilon_if(composed, spec.delta).epsilon)
