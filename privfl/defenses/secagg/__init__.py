"""Secure aggregation (Bonawitz et al. 2017): pairwise + self masks over X25519/HKDF/ChaCha20, t-of-n
Shamir recovery of dropped clients, fixed-point quantization into Z_2^32.

* :class:`SecureAggregation` — the composable :class:`~privfl.defenses.base.Defense` (in-process,
  or over a network through a :class:`SecAggTransport`).
* :mod:`.protocol` — :class:`SecAggClient`, :class:`SecAggServer` and the byte-serialisable messages,
  for running the rounds over a network.
* :mod:`.shamir`, :mod:`.crypto`, :mod:`.quantize` — the building blocks.

See ``docs/secagg.md`` for the threat model and the numbers.
"""

from privfl.defenses.secagg.defense import SaturationWarning, SecAggReport, SecAggTransport, SecureAggregation
from privfl.defenses.secagg.errors import (
    InsufficientClientsError,
    OverflowRiskError,
    SecAggError,
    SecAggIntegrityError,
    SecAggProtocolError,
)
from privfl.defenses.secagg.protocol import (
    AggregateResult,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
)

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
