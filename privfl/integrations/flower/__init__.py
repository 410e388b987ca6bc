"""privfl defenses inside Flower (``pip install 'privfl[flower]'``; Flower ≥ 1.20, Message API).

* :class:`PrivflClient` — the client side (personalize, local training, ``protect``) for a
  ``ClientApp``'s ``query`` and ``train`` handlers.
* :class:`PrivflStrategy` — the server side (sampling, weights, ``before_round``, ``aggregate``,
  the accountant) as a Flower ``Strategy`` for a ``ServerApp``.
* :mod:`~privfl.integrations.flower.codec` — payloads, states and round contexts as Flower records.

See ``docs/flower.md`` and ``examples/flower_feddp/``.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("privfl.integrations.flower needs Flower: pip install 'privfl[flower]'") from e

from privfl.integrations.flower.client import PrivflClient
from privfl.integrations.flower.codec import MalformedPayloadError
from privfl.integrations.flower.strategy import PrivflStrategy, RoundFailedError

__all__ = ["MalformedPayloadError", "PrivflClient", "PrivflStrategy", "RoundFailedError"]
