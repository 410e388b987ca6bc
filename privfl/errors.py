"""The root of privfl's exceptions.

Every exception privfl raises on bad input or a failed protocol step derives from
:class:`PrivflError` (and, where callers would expect it, from ``ValueError`` or
``RuntimeError`` too), so an application can catch everything privfl refuses with one ``except``:

* :class:`~privfl.updates.InvalidUpdateError` — an update with NaN/Inf, a wrong shape, dtype,
  device or key;
* :class:`~privfl.defenses.ckks.CKKSPayloadError` — a malformed, truncated, replayed or foreign
  CKKS payload;
* :class:`~privfl.defenses.secagg.SecAggError` and its subclasses — secure-aggregation protocol,
  integrity and threshold failures;
* :class:`~privfl.defenses.accounting.PrivacyBudgetExceeded` — a round that would exceed the budget;
* :class:`PayloadTooLargeError` — a payload beyond the configured size limit;
* :class:`~privfl.fl.checkpoint.CheckpointMismatchError`, :class:`~privfl.data.errors.DataError`,
  and in :mod:`privfl.integrations.flower` ``MalformedPayloadError`` and ``RoundFailedError``.

``docs/reliability.md`` lists each failure case and what privfl does.
"""

from __future__ import annotations

__all__ = ["PayloadTooLargeError", "PrivflError", "check_payload_size"]


class PrivflError(Exception):
    """Base class of privfl's exceptions."""


class PayloadTooLargeError(PrivflError, ValueError):
    """A payload is larger than the configured limit; it is refused before it is parsed."""


def check_payload_size(payload: bytes | bytearray | memoryview, limit: int | None, what: str) -> None:
    """Refuse ``payload`` if it is longer than ``limit`` bytes (``None``: no limit).

    Raises:
        PayloadTooLargeError: naming ``what``, the size and the limit.
    """
    if limit is not None and len(payload) > limit:
        raise PayloadTooLargeError(f"{what}: {len(payload)} bytes exceed the limit of {limit} bytes")
