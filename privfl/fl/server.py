"""FedAvg server: samples clients, hands payloads to the defense's server side, applies the mean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from privfl.defenses.base import Defense, Payload, RoundContext
from privfl.seeding import derive_seed
from privfl.updates import InvalidUpdateError, Update, apply, validate


class Server:
    """Holds the global state and runs the server side of a round.

    Aggregation weights are proportional to the sampled clients' training-set sizes (FedAvg).
    """

    def __init__(
        self, global_state: Update, defense: Defense, num_clients: int, fraction: float = 1.0, seed: int = 0
    ):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if num_clients < 1:
            raise ValueError("need at least one client")
        self.global_state = global_state
        self.defense = defense
        self.num_clients = num_clients
        self.fraction = fraction
        self.seed = seed

    def sample(self, round_idx: int) -> tuple[int, ...]:
        """Clients taking part in ``round_idx``: ``max(1, round(fraction · n))`` drawn without replacement."""
        k = max(1, int(round(self.fraction * self.num_clients)))
        if k == self.num_clients:
            return tuple(range(self.num_clients))
        rng = np.random.default_rng(derive_seed(self.seed, round_idx, "sample"))
        return tuple(sorted(int(i) for i in rng.choice(self.num_clients, size=k, replace=False)))

    def context(self, round_idx: int, sampled: Sequence[int], num_samples: Sequence[int]) -> RoundContext:
        """The round's :class:`RoundContext`: FedAvg weights proportional to ``num_samples``."""
        total = float(sum(num_samples))
        weights = tuple(n / total for n in num_samples)
        return RoundContext(round_idx, self.num_clients, tuple(sampled), weights, None, self.seed)

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        """Combine payloads with the defense and apply the mean update to the global state (entries
        missing from the aggregate are left unchanged).

        Plain (``dict``) payloads are checked first against the global state: known keys, the same
        shapes, dtypes and device, finite values. Nothing is aggregated or applied if one fails.

        Raises:
            InvalidUpdateError: naming the client and the entry.
        """
        if len(payloads) != len(ctx.sampled):
            raise ValueError(f"{len(payloads)} payloads for {len(ctx.sampled)} sampled clients")
        for cid, p in zip(ctx.sampled, payloads):
            if isinstance(p, Mapping):
                try:
                    validate(p, self.global_state, allow_missing=True)
                except InvalidUpdateError as e:
                    raise InvalidUpdateError(f"client {cid}: {e}") from None
        mean_update = self.defense.aggregate(payloads, ctx)
        # keys absent from the aggregate (kept local by partial sharing) stay as they are
        validate(mean_update, self.global_state, allow_missing=True)
        self.global_state = apply(self.global_state, mean_update, allow_missing=True)
        return mean_update
