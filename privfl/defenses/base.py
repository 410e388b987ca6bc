"""The Defense protocol: a client side that transforms its own update and a server side that
combines what all clients sent; :class:`Compose` chains defenses into a pipeline.

Data flows one way: ``client update -> protect -> payload -> aggregate -> mean update``. A defense
never sees the model or the data, only updates (``dict[str, Tensor]``) and a :class:`RoundContext`,
so it drops into any FL loop::

    ctx = RoundContext(round=r, num_clients=n, sampled=ids, weights=w)
    payloads = [defense.protect(update_i, ctx.for_client(i)) for i, update_i in zip(ids, updates)]
    mean_update = defense.aggregate(payloads, ctx)

A round is: ``before_round(ctx)`` on the server (budget checks, key set-up; raises before any
work is done) -> on every sampled client ``personalize`` (the state it trains from), local
training, ``protect`` -> ``aggregate`` once on the server. Keys missing from the aggregate (e.g.
parameters kept local by partial sharing) leave the global state unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from privfl.defenses.accounting import PrivacyAccountant
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
        sampling_rate: the Poisson client-sampling rate q that privacy accounting may assume
            (privacy amplification by subsampling). ``1.0`` claims no amplification; this is what
            privfl's server reports, because it samples a fixed number of clients, which is not
            Poisson sampling.
        extra: free-form facts for custom defenses.
        survivors: server side, once known: the sampled clients whose payload is in the aggregate
            (set by :class:`Compose` and :func:`with_survivors`); ``None``: all of ``sampled``.
            Noise stages account what the survivors' aggregate really carries.
        before_reveal: server side, set by :class:`Compose` for its aggregating stage: the check to
            run once the survivors are known and before the aggregate is revealed (see
            :func:`check_before_reveal`).
    """

    round: int
    num_clients: int
    sampled: tuple[int, ...]
    weights: tuple[float, ...]
    client_id: int | None = None
    seed: int = 0
    sampling_rate: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    survivors: tuple[int, ...] | None = None
    before_reveal: Callable[[tuple[int, ...], int], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.sampled) != len(self.weights):
            raise ValueError(f"RoundContext: {len(self.sampled)} sampled clients but {len(self.weights)} weights")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"RoundContext: sampling_rate must be in (0, 1], got {self.sampling_rate}")

    def for_client(self, client_id: int) -> RoundContext:
        """The same context seen from one client."""
        return replace(self, client_id=client_id)

    def weight_of(self, client_id: int) -> float:
        """The aggregation weight of sampled client ``client_id`` (raises ``ValueError`` if not sampled)."""
        return self.weights[self.sampled.index(client_id)]


class Defense(ABC):
    """A composable privacy defense.

    Subclasses state their threat model in their docstring: who is trusted, what leaks.

    Class attributes:
        hides_individual_updates: ``True`` for aggregators after which the server sees only the
            aggregate (secure aggregation, homomorphic encryption). Distributed DP noise is only
            meaningful in front of one.
        tolerated_colluders: for such aggregators, how many clients may collude with the server
            without the aggregate's secrecy failing (``threshold − 1`` for secure aggregation).
            Distributed noise in front of it accounts for that many colluders by default.

    Attributes:
        aggregated_clients: set by an :meth:`aggregate` that can drop a received payload (e.g. secure
            aggregation rejecting an input whose signature fails): the clients whose payload is in
            the last aggregate. ``None``: every non-``None`` payload is. :class:`Compose` accounts
            the noise stages with it.
    """

    hides_individual_updates: bool = False
    tolerated_colluders: int = 0
    aggregated_clients: tuple[int, ...] | None = None

    def bind(self, before: Sequence[Defense], after: Sequence[Defense]) -> None:
        """Called once by :class:`Compose` with the stages written before and after this one, e.g. to
        take the clip norm from a preceding :class:`~privfl.defenses.dp.ClipUpdate` or the colluders
        a following secure aggregator tolerates. Default: nothing."""
        return None

    def before_round(self, ctx: RoundContext) -> None:
        """Server side, before any client trains: refuse the round (raise) if it must not run, e.g.
        :class:`~privfl.defenses.accounting.PrivacyBudgetExceeded`. Default: nothing to check."""
        return None

    @abstractmethod
    def protect(self, update: Update, ctx: RoundContext) -> Payload:
        """Client side: transform this client's update into what it sends. Must not mutate ``update``."""

    @abstractmethod
    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        """Server side: combine the sampled clients' payloads (in ``ctx.sampled`` order) into the
        weighted mean update. A ``None`` payload marks a client that dropped out before sending;
        defenses that cannot tolerate dropouts raise."""

    def personalize(self, global_state: Update, ctx: RoundContext) -> Update:
        """Client side, before local training: the state client ``ctx.client_id`` trains from.
        Default: the global state. :class:`~privfl.defenses.partial.PartialSharing` puts back the
        parameters the client kept local. Must not mutate ``global_state``."""
        return global_state

    def check_release(self, ctx: RoundContext, numel: int) -> None:
        """Server side, once the survivors are known (``ctx.survivors``) and before the
        aggregate of ``numel`` values is revealed (unmasked, decrypted): raise to abort the round with
        nothing revealed, e.g. :class:`~privfl.defenses.accounting.PrivacyBudgetExceeded` when the
        survivors' noise does not fit the budget. Default: nothing to check."""
        return None

    def finalize(self, mean_update: Update, ctx: RoundContext) -> Update:
        """Server side, used by :class:`Compose` for every stage except the last (which aggregates):
        post-process the aggregate (e.g. add central noise, record the round in an accountant).
        Default: unchanged."""
        return mean_update

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


def with_survivors(ctx: RoundContext, payloads: Sequence[Payload]) -> RoundContext:
    """``ctx`` with ``survivors``: the sampled clients whose payload arrived (not ``None``).
    Noise stages use it to account what the survivors' aggregate really carries."""
    if len(payloads) != len(ctx.sampled):
        raise ValueError(f"{len(payloads)} payloads for {len(ctx.sampled)} sampled clients")
    survivors = tuple(c for c, p in zip(ctx.sampled, payloads) if p is not None)
    return replace(ctx, survivors=survivors)


def check_before_reveal(ctx: RoundContext, survivors: Sequence[int], numel: int) -> None:
    """For aggregators that hide individual updates: call once the clients whose inputs are in the
    aggregate (``survivors``) are known and **before** unmasking or decrypting the aggregate of
    ``numel`` values. Runs the check :class:`Compose` installs (every earlier stage's
    :meth:`Defense.check_release`); raises to abort the round with nothing revealed."""
    if ctx.before_reveal is not None:
        ctx.before_reveal(tuple(survivors), int(numel))


class Compose(Defense):
    """Chain defenses in the order written, the way the threat model reads.

    Client side: ``stages[0].protect`` runs first and each stage's output feeds the next; only the
    last stage may return an opaque payload (e.g. ciphertext bytes). Server side: the last stage
    aggregates the payloads, then every earlier stage's :meth:`~Defense.finalize` runs on the
    aggregate in reverse order (so the stage written closest to the aggregator acts first).

    Example — clip, add noise, and let the aggregator see only the sum::

        Compose(ClipUpdate(0.05), GaussianMechanism(noise_multiplier=1.0, placement="distributed"),
                SecureAggregation(threshold=3))

    Threat model: the composition of its stages'. Stages that account privacy keep their own
    :class:`~privfl.defenses.accounting.PrivacyAccountant`; :attr:`accountant` combines them.
    """

    def __init__(self, *stages: Defense):
        if not stages:
            raise ValueError("Compose needs at least one defense")
        for i, stage in enumerate(stages):
            if not isinstance(stage, Defense):
                raise TypeError(f"Compose: stage {i} is {type(stage).__name__}, not a Defense")
        self.stages: tuple[Defense, ...] = stages
        for i, stage in enumerate(stages):
            stage.bind(stages[:i], stages[i + 1:])

    @property
    def hides_individual_updates(self) -> bool:  # type: ignore[override]
        return self.stages[-1].hides_individual_updates

    @property
    def accountant(self) -> PrivacyAccountant | None:
        """The privacy spent so far by all noising stages (``None`` if no stage accounts privacy)."""
        accountants = [a for s in self.stages if (a := getattr(s, "accountant", None)) is not None]
        if not accountants:
            return None
        if len(accountants) == 1:
            return accountants[0]
        return PrivacyAccountant.merge(*accountants)

    def before_round(self, ctx: RoundContext) -> None:
        for stage in self.stages:
            stage.before_round(ctx)

    def personalize(self, global_state: Update, ctx: RoundContext) -> Update:
        for stage in self.stages:
            global_state = stage.personalize(global_state, ctx)
        return global_state

    def protect(self, update: Update, ctx: RoundContext) -> Payload:
        payload: Payload = update
        for i, stage in enumerate(self.stages):
            if i > 0 and not isinstance(payload, dict):
                raise TypeError(
                    f"Compose: stage {i - 1} ({type(self.stages[i - 1]).__name__}) returned an opaque "
                    f"{type(payload).__name__}; only the last stage may do that")
            payload = stage.protect(payload, ctx)
        return payload

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        for stage in self.stages:
            stage.before_round(ctx)  # no partial round: refuse before anything is aggregated
        ctx = with_survivors(ctx, payloads)
        last = self.stages[-1]
        earlier = self.stages[:-1]

        def before_reveal(survivors: tuple[int, ...], numel: int) -> None:
            seen = replace(ctx, survivors=survivors)
            for stage in earlier:
                stage.check_release(seen, numel)

        mean_update = last.aggregate(payloads, replace(ctx, before_reveal=before_reveal))
        if last.aggregated_clients is not None:  # it dropped some: account only what the mean carries
            ctx = replace(ctx, survivors=tuple(last.aggregated_clients))
        for stage in reversed(self.stages[:-1]):
            mean_update = stage.finalize(mean_update, ctx)
        return mean_update

    def state_dict(self) -> dict[str, Any]:
        return {"stages": [s.state_dict() for s in self.stages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("stages", [])
        if len(states) != len(self.stages):
            raise ValueError(f"Compose: state has {len(states)} stages, this pipeline has {len(self.stages)}")
        for stage, st in zip(self.stages, states):
            stage.load_state_dict(st)

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(s) for s in self.stages) + ")"
