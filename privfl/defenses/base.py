"""The Defense protocol: a client side that transforms its own update and a server side that
combines what all clients sent.

Data flows one way: ``client update -> protect -> payload -> aggregate -> mean update``. A defense
never sees the model or the data, only updates (``dict[str, Tensor]``) and a :class:`RoundContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from privfl.updates import Update, clone, weighted_mean

Payload = Any
"""What a client sends: an :data:`~privfl.updates.Update` or an opaque object (e.g. ciphertext bytes)."""


@dataclass(frozen=True)
class RoundContext:
    """Facts about the current round that a defense may use.

    Attributes:
        round: 0-based round index.
        num_clients: clients in the federation (sampled or not).
        sampled: ids of the clients taking part in this round, in payload order.
        weights: aggregation weight of each sampled client (same order), summing to 1.
        client_id: the client running ``protect``; ``None`` on the server.
        seed: the experiment seed (only for reproducible, explicitly seeded sources).
    """

    round: int
    num_clients: int
    sampled: tuple[int, ...]
    weights: tuple[float, ...]
    client_id: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def for_client(self, client_id: int) -> RoundContext:
        """The same context seen from one client."""
        return RoundContext(self.round, self.num_clients, self.sampled, self.weights, client_id, self.seed, self.extra)

    def weight_of(self, client_id: int) -> float:
        return self.weights[self.sampled.index(client_id)]


class Defense(ABC):
    """A composable privacy defense.

    Subclasses state their threat model in their docstring: who is trusted, what leaks.
    """

    @abstractmethod
    def protect(self, update: Update, ctx: RoundContext) -> Payload:
        """Client side: transform this client's update into what it sends. Must not mutate ``update``."""

    @abstractmethod
    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        """Server side: combine the sampled clients' payloads (in ``ctx.sampled`` order) into the
        weighted mean update."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint between rounds (e.g. an accountant's history)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (stateless defenses have nothing to restore)."""
        return None


class NoDefense(Defense):
    """Plain FedAvg: clients send their update in the clear; the server computes the weighted mean.

    Threat model: none. The server (and anyone on the wire) sees every client's exact update.
    """

    def protect(self, update: Update, ctx: RoundContext) -> Update:
        return clone(update)

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        return weighted_mean(list(payloads), ctx.weights)
