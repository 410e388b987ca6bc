"""Client-side transforms and server-side aggregators, composable into a pipeline.

Differential privacy: :class:`ClipUpdate`, :class:`GaussianMechanism`, :class:`LaplaceMechanism`,
:class:`FedDPNoise` (client level), :class:`~privfl.defenses.dpsgd.DPSGD` (sample level), accounted
by :class:`PrivacyAccountant`; noise from :class:`SecureNoise` unless a :class:`SeededNoise` is
passed for reproducible experiments. See ``docs/privacy.md``.

What the server sees: :class:`CKKSAggregation` (homomorphic encryption, ``docs/ckks.md``),
:class:`SecureAggregation` (Bonawitz masking with dropouts, ``docs/secagg.md``),
:class:`PartialSharing` (keep parts of the model local, ``docs/partial_sharing.md``).
"""

from privfl.defenses.accounting import PrivacyAccountant, PrivacyBudgetExceeded, calibrate
from privfl.defenses.base import Compose, Defense, NoDefense, Payload, RoundContext
from privfl.defenses.ckks import CKKSAggregation
from privfl.defenses.dp import ClipUpdate, FedDPNoise, GaussianMechanism, LaplaceMechanism
from privfl.defenses.partial import PartialSharing
from privfl.defenses.rng import NoiseSource, SecureNoise, SeededNoise
from privfl.defenses.secagg import SecureAggregation

__all__ = [
    "CKKSAggregation",
    "ClipUpdate",
    "Compose",
    "Defense",
    "FedDPNoise",
    "GaussianMechanism",
    "LaplaceMechanism",
    "NoDefense",
    "NoiseSource",
    "PartialSharing",
    "Payload",
    "PrivacyAccountant",
    "PrivacyBudgetExceeded",
    "RoundContext",
    "SecureAggregation",
    "SecureNoise",
    "SeededNoise",
    "calibrate",
]
