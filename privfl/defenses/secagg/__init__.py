"""Secure aggregation (Bonawitz et al. 2017): pairwise + self masks over X25519/HKDF/ChaCha20, t-of-n
Shamir recovery of dropped clients, fixed-point quantization into Z_2^32.

* :class:`SecureAggregation` — the composable :class:`~privfl.defenses.base.Defense` (in-process,
  or over a network through a :class:`SecAggTransport`).
* :mod:`.protocol` — the protocol's rounds and threat model, and its public names:
  :class:`SecAggClient` (:mod:`.client`), :class:`SecAggServer` (:mod:`.server`) and the
  byte-serialisable messages (:mod:`.messages`), for running the rounds over a network.
* :mod:`.shamir`, :mod:`.crypto`, :mod:`.quantize` — the building blocks.

See ``docs/secagg.md`` for the threat model and the numbers.
"""

from privfl.defenses.secagg.client import SecAggClient
from privfl.defenses.secagg.defense import SaturationWarning, SecAggReport, SecAggTransport, SecureAggregation
from privfl.defenses.secagg.errors import (
    InsufficientClientsError,
    OverflowRiskError,
    SecAggError,
    SecAggIntegrityError,
    SecAggProtocolError,
)
from privfl.defenses.secagg.messages import SecAggConfig
from privfl.defenses.secagg.server import AggregateResult, SecAggServer

__all__ = [
    "AggregateResult",
    "InsufficientClientsError",
    "OverflowRiskError",
    "SaturationWarning",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggIntegrityError",
    "SecAggProtocolError",
    "SecAggReport",
    "SecAggServer",
    "SecAggTransport",
    "SecureAggregation",
]
