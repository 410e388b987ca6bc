"""Exceptions of the secure-aggregation protocol.

All protocol failures derive from :class:`SecAggError`; a configuration that could wrap the
modular sum is refused with :class:`OverflowRiskError`, which is also a :class:`ValueError`.
"""

from __future__ import annotations

from privfl.errors import PrivflError

__all__ = [
    "InsufficientClientsError",
    "OverflowRiskError",
    "SecAggError",
    "SecAggIntegrityError",
    "SecAggProtocolError",
]


class SecAggError(PrivflError, RuntimeError):
    """Base class: the secure-aggregation round cannot go on."""


class SecAggProtocolError(SecAggError):
    """A message is malformed, arrives in the wrong round, names the wrong session or party, or asks a
    client for something the protocol forbids (e.g. both kinds of share of the same peer)."""


class SecAggIntegrityError(SecAggError):
    """Tampering detected: an AEAD tag, a signature, a reconstructed secret that does not match its
    public key or commitment, or an unmasked sum outside the range the configuration allows."""


class InsufficientClientsError(SecAggError):
    """Fewer than ``threshold`` clients are left at some round. The round is aborted: nothing is
    reconstructed and no partial sum is returned."""


class OverflowRiskError(SecAggError, ValueError):
    """The quantization configuration could let the sum of the clients' inputs wrap modulo 2^32."""
