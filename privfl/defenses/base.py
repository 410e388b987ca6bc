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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from privfl.defenses.accounting import PrivacyAccountant
from privfl.updates import Update, UpdateSpec, clone, weighted_mean

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
    before_reveal: Callable[[tuple[int, ...], int], None] | None = field(
        default=None, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if len(self.sampled) != len(self.weights):
            raise ValueError(
                f"RoundContext: {len(self.sampled)} sampled clients but {len(self.weights)} weights"
            )
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"RoundContext: sampling_rate must be in (0, 1], got {self.sampling_rate}")

    def for_client(self, client_id: int) -> RoundContext:
        """The same context seen from one client."""
        return replace(self, client_id=client_id)

    def weight_of(self, client_id: int) -> float:
        """The aggregation weight of sampled client ``client_id`` (raises ``ValueError`` if not sampled)."""
        return self.weights[self.sampled.index(client_id)]


Aggregation = Literal["plain", "encrypted", "interactive"]
"""How the server of a defense obtains the aggregate (:attr:`Defense.aggregation`)."""


class Transport(ABC):
    """How the server's instance of an ``"interactive"`` aggregator (:attr:`Defense.aggregation`)
    reaches the clients' instances and their replies come back: in one process, or over a network
    (:mod:`privfl.integrations.flower` sends each exchange as Flower messages).

    Attributes:
        fault_tolerant: a client whose reply is invalid is dropped from the round, with its reason in
            the aggregator's :attr:`~Defense.rejected_clients`, instead of the round raising. Remote
            transports set it: one broken or hostile client must not stop the others.
    """

    fault_tolerant: bool = False

    @abstractmethod
    def exchange(self, step: str, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        """Deliver ``messages[c]`` to client ``c`` for protocol step ``step`` and return
        ``{c: reply bytes}`` for the clients that answered; a client missing from it dropped out."""


class EncryptedAggregator(Protocol):
    """The server half of an ``"encrypted"`` aggregator (:attr:`Defense.aggregation`): it adds
    payloads it cannot read and holds no key (e.g. :class:`~privfl.defenses.ckks.CKKSServer`).
    Refusals raise a :class:`~privfl.errors.PrivflError` naming the payload."""

    def aggregate(self, payloads: Sequence[bytes | None], weights: Sequence[float] | None = None) -> bytes:
        """The encrypted weighted mean of the payloads (``None``: a client that dropped out)."""
        ...

    def check_payload(self, payload: bytes, weight: float | None = None, what: str = "payload") -> None:
        """Refuse one payload as :meth:`aggregate` would, without aggregating it."""
        ...


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

    Aggregation capability — what an integration that runs the server and the clients in separate
    processes (:mod:`privfl.integrations.flower`) dispatches on, instead of the aggregator's type,
    so that a new secure aggregator needs no change there. The class attribute
    :attr:`aggregation` (an :data:`Aggregation`; :class:`Compose` forwards its last stage's) says how
    the server obtains the aggregate, and :attr:`aggregating_stage` is the object whose methods the
    integration then calls:

    * ``"plain"`` (default): :meth:`aggregate` on the server returns the mean update from the
      payloads. Nothing else is called.
    * ``"encrypted"`` (:class:`~privfl.defenses.ckks.CKKSAggregation`): the server only adds the
      payloads, which it cannot read, into an encrypted aggregate, with a keyless server half (an
      :class:`EncryptedAggregator`); the clients, who hold the key, open that aggregate with
      :meth:`open_aggregate` and keep the global state themselves, and report :attr:`layout` next
      to their payload (the server accounts the release by its size). An instance holds the key,
      so the server's defense must not contain one: it has the stages before it, and the server
      half.
    * ``"interactive"`` (:class:`~privfl.defenses.secagg.SecureAggregation`): aggregation takes
      extra message rounds between the server and the clients, and the payloads are opaque bytes.
      Server side: :meth:`connect` gives the instance a :class:`Transport` to the clients;
      :meth:`before_round` runs the set-up rounds, after which only :attr:`ready_clients` can
      send; :meth:`set_layout` gives it the (public) layout of the updates the clients report;
      :meth:`aggregate` runs the closing rounds, and :attr:`aggregated_clients` and
      :attr:`rejected_clients` then say whose input counts and why the others were dropped. Client
      side: :meth:`client_step` answers one protocol message from the node's saved protocol state;
      :meth:`resume_client` loads that state before :meth:`protect`, :meth:`client_state` returns
      it afterwards, and :attr:`layout` is the layout of the update it protected.

    The methods of a capability a defense does not declare raise ``NotImplementedError``.
    """

    hides_individual_updates: bool = False
    tolerated_colluders: int = 0
    aggregated_clients: tuple[int, ...] | None = None
    aggregation: Aggregation = "plain"
    layout: UpdateSpec | None = None
    """``"encrypted"`` and ``"interactive"``, client side: the layout (names, shapes, dtypes) of the
    update the last :meth:`protect` turned into opaque bytes — public metadata the server needs to
    read the mean or to account its release."""

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

    # ---- the aggregation capability (see the class docstring) ----------------------------------

    @property
    def aggregating_stage(self) -> Defense:
        """The stage that aggregates, whose :attr:`aggregation` capability an integration uses:
        this defense (a :class:`Compose`: its last stage's)."""
        return self

    def _lacks(self, method: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__}.{method}: its aggregation is {self.aggregation!r}")

    def open_aggregate(self, aggregate: bytes) -> Update:
        """``"encrypted"``, on a key holder: decrypt the encrypted aggregate the server made of the
        round's payloads into the weighted mean update."""
        raise self._lacks("open_aggregate")

    def connect(self, transport: Transport) -> None:
        """``"interactive"``, server side: reach the clients through ``transport`` from now on."""
        raise self._lacks("connect")

    @property
    def ready_clients(self) -> tuple[int, ...]:
        """``"interactive"``, server side, after :meth:`before_round`: the sampled clients that
        completed the set-up rounds, the only ones that can send a payload."""
        raise self._lacks("ready_clients")

    def set_layout(self, spec: UpdateSpec) -> None:
        """``"interactive"``, server side: the layout of this round's updates, as the clients report
        it next to their opaque payloads, to read the mean."""
        raise self._lacks("set_layout")

    @property
    def rejected_clients(self) -> dict[int, str]:
        """``"interactive"``, server side, after :meth:`aggregate`: the clients whose payload or
        protocol message was dropped, with the reason. Default: none."""
        return {}

    def client_step(
        self, client_id: int, step: str, message: bytes, state: bytes | None
    ) -> tuple[bytes, bytes]:
        """``"interactive"``, client side: answer the server's ``message`` for protocol ``step`` as
        client ``client_id`` whose saved protocol state is ``state`` (``None``: none yet). Returns
        ``(reply, new state)``; the caller keeps the state on the client, never sends it."""
        raise self._lacks("client_step")

    def resume_client(self, client_id: int, state: bytes | None) -> None:
        """``"interactive"``, client side: before :meth:`protect`, load client ``client_id``'s saved
        protocol state (raises when no round is set up on this client)."""
        raise self._lacks("resume_client")

    def client_state(self) -> bytes:
        """``"interactive"``, client side: the protocol state to keep after :meth:`protect`."""
        raise self._lacks("client_state")


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
            stage.bind(stages[:i], stages[i + 1 :])

    @property
    def hides_individual_updates(self) -> bool:  # type: ignore[override]
        return self.stages[-1].hides_individual_updates

    @property
    def aggregation(self) -> Aggregation:  # type: ignore[override]
        """The last stage's: it aggregates."""
        return self.stages[-1].aggregation

    @property
    def aggregating_stage(self) -> Defense:
        return self.stages[-1].aggregating_stage

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
                    f"{type(payload).__name__}; only the last stage may do that"
                )
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
