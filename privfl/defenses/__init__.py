"""Client-side transforms and server-side aggregators, composable into a pipeline.

Differential privacy: :class:`ClipUpdate`, :class:`GaussianMechanism`, :class:`LaplaceMechanism`,
:class:`FedDPNoise` (client level), :class:`~privfl.defenses.dpsgd.DPSGD` (sample level), accounted
by :class:`PrivacyAccountant`; noise from :class:`SecureNoise` unless a :class:`SeededNoise` is
passed for reproducible experiments. See ``docs/privacy.md``.
"""

from privfl.defenses.accounting import PrivacyAccountant, PrivacyBudgetExceeded, calibrate
from privfl.defenses.base import Compose, Defense, NoDefense, Payload, RoundContext
from privfl.defenses.dp import ClipUpdate, FedDPNoise, GaussianMechanism, LaplaceMechanism
from privfl.defenses.rng import NoiseSource, SecureNoise, SeededNoise

__all__ = [
    "ClipUpdate",
    "Compose",
    "Defense",
    "FedDPNoise",
    "GaussianMechanism",
    "LaplaceMechanism",
    "NoDefense",
    "NoiseSource",
    "Payload",
    "PrivacyAccountant",
    "PrivacyBudgetExceeded",
    "RoundContext",
    "SecureNoise",
    "SeededNoise",
    "calibrate",
]
