"""The client side of a privfl :class:`~privfl.defenses.base.Defense` inside a Flower ``ClientApp``.

:class:`PrivflClient` answers the two messages :class:`~privfl.integrations.flower.strategy.PrivflStrategy`
sends: a ``query`` for the client's id and training-set size (the server needs the sizes for the
FedAvg weights *before* clients protect, because distributed noise and CKKS pre-weighting depend
on them), and a ``train`` carrying the global state and the round context. It trains with the
user's ``fit`` function, calls ``defense.personalize`` and ``defense.protect`` exactly as
:func:`~privfl.fl.loop.run_federated` does, and replies with the payload only.

The defense's client-side state (e.g. :class:`~privfl.defenses.partial.PartialSharing`'s kept
decoder) is stored in the node's ``context.state`` after every round, so it survives a ClientApp
that runs in a fresh process per message; it never leaves the node.

The train message's other config records (the wrapped Flower strategy's ``"config"``: e.g.
``server-round``, FedProx's ``proximal-mu``) reach ``fit`` in ``ctx.extra`` (``{name: dict}``).

What the node does besides ``protect`` follows the capability of the defense's aggregating stage
(:attr:`Defense.aggregation <privfl.defenses.base.Defense.aggregation>`), never its type. Under an
``"interactive"`` one (e.g. :class:`~privfl.defenses.secagg.SecureAggregation`), the server's
``query`` messages carrying ``"privfl.secagg"`` run this node's side of the protocol
(``client_step``); the node's protocol state — for secure aggregation its keys, self-mask seed and
the shares it holds for the others — is kept between messages in ``context.state`` (in the clear,
on the node: protect the SuperNode's machine) and is loaded again for ``protect`` in ``train``.
Under an ``"encrypted"`` one (e.g. :class:`~privfl.defenses.ckks.CKKSAggregation`), the server
sends the encrypted mean instead of the state: the node opens it (``open_aggregate``) and applies it
to its own copy of the global state.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from privfl.defenses.base import Defense, RoundContext
from privfl.integrations.flower.codec import (
    AGGREGATE,
    CTX,
    LAYOUT,
    METRICS,
    SECAGG,
    STATE,
    MalformedPayloadError,
    layout_to_record,
    payload_to_content,
    record_to_context,
    record_to_state,
    record_value,
    state_to_record,
)
from privfl.updates import Update, apply

FitFn = Callable[[Update, RoundContext], tuple[Update, float]]
"""``fit(start_state, ctx) -> (delta = local − start, mean train loss)`` — the client's local training."""

_DEFENSE_STATE = "privfl.defense-state"
_GLOBAL = "privfl.global"  # the node's copy of the global state when the server only has ciphertext
_SECAGG_CLIENT = "privfl.secagg-client"  # this node's protocol state for an interactive aggregator (secret)


class PrivflClient:
    """Client half of a privfl defense in Flower.

    Args:
        defense_factory: builds this client's defense instance (the same configuration as the
            server's; e.g. ``lambda: FedDPNoise(0.5, 0.05)``).
        fit: local training (see :data:`FitFn`).
        client_id: this node's privfl client id (e.g. ``int(context.node_config["partition-id"])``).
        num_examples: this client's training-set size (FedAvg weight).

    Threat model: the client trusts only itself; what leaves the node is what ``defense.protect``
    returns (plus its id, size and mean training loss as metrics).
    """

    def __init__(
        self, defense_factory: Callable[[], Defense], fit: FitFn, *, client_id: int, num_examples: int
    ):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        self.defense_factory = defense_factory
        self.fit = fit
        self.client_id = int(client_id)
        self.num_examples = int(num_examples)

    def query(self, msg: Message, context: Context) -> Message:
        """Reply with this client's id and training-set size, or run a step of an interactive
        aggregator's protocol."""
        if SECAGG in msg.content.config_records:
            return self._secagg_step(msg, context)
        return Message(
            RecordDict(
                {METRICS: MetricRecord({"client_id": self.client_id, "num-examples": self.num_examples})}
            ),
            reply_to=msg,
        )

    def _secagg_step(self, msg: Message, context: Context) -> Message:
        rec = msg.content.config_records[SECAGG]
        step, message = rec.get("step"), rec.get("message")
        if not isinstance(step, str) or not isinstance(message, bytes):
            raise MalformedPayloadError("'privfl.secagg' needs a str 'step' and a bytes 'message'")
        stage = self.defense_factory().aggregating_stage
        if stage.aggregation != "interactive":
            raise MalformedPayloadError(
                f"client {self.client_id}: its defense does not end with an interactive "
                f"aggregator (aggregation {stage.aggregation!r}), so it answers no protocol step"
            )
        reply, state = stage.client_step(self.client_id, step, message, self._protocol_state(context))
        context.state.config_records[_SECAGG_CLIENT] = ConfigRecord({"state": state})
        return Message(RecordDict({SECAGG: ConfigRecord({"message": reply})}), reply_to=msg)

    @staticmethod
    def _protocol_state(context: Context) -> bytes | None:
        saved = context.state.config_records.get(_SECAGG_CLIENT)
        return None if saved is None else record_value(saved, "state", bytes, "saved protocol state")

    def _defense(self, context: Context) -> Defense:
        defense = self.defense_factory()
        saved = context.state.config_records.get(_DEFENSE_STATE)
        if saved is not None:
            state = record_value(saved, "state", bytes, "saved defense state")
            defense.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
        return defense

    def _save(self, defense: Defense, context: Context) -> None:
        buf = io.BytesIO()
        torch.save(defense.state_dict(), buf)
        context.state.config_records[_DEFENSE_STATE] = ConfigRecord({"state": buf.getvalue()})

    def _global_state(self, msg: Message, context: Context, defense: Defense) -> Update:
        """The global state this round starts from: sent in the clear, or — under an encrypted
        aggregator, where the server holds only ciphertext — this node's copy plus the opened
        encrypted mean update."""
        stage = defense.aggregating_stage
        encrypted = stage.aggregation == "encrypted"
        if STATE in msg.content.array_records:
            state = record_to_state(msg.content.array_records[STATE])
        elif AGGREGATE in msg.content.config_records:
            if not encrypted or _GLOBAL not in context.state.array_records:
                raise MalformedPayloadError(
                    "an encrypted aggregate arrived, but this node has no encrypted aggregator "
                    "(key) or no copy of the global state to apply it to"
                )
            mean = stage.open_aggregate(
                record_value(msg.content.config_records[AGGREGATE], "ciphertext", bytes, "'privfl.aggregate'")
            )
            stored = record_to_state(context.state.array_records[_GLOBAL])
            state = apply(stored, mean, allow_missing=True)
        else:
            raise MalformedPayloadError(
                "the train message carries neither a state nor an encrypted aggregate"
            )
        if encrypted:
            context.state.array_records[_GLOBAL] = state_to_record(state)
        return state

    def train(self, msg: Message, context: Context) -> Message:
        """One round: personalize the global state, train, protect, reply with the payload."""
        ctx = record_to_context(msg.content.config_records[CTX])
        if ctx.client_id != self.client_id:
            raise ValueError(f"message for client {ctx.client_id} reached client {self.client_id}")
        config = {k: dict(v) for k, v in msg.content.config_records.items() if not k.startswith("privfl.")}
        if config:  # the wrapped strategy's config, for fit
            ctx = replace(ctx, extra={**ctx.extra, **config})
        defense = self._defense(context)
        global_state = self._global_state(msg, context, defense)
        stage = defense.aggregating_stage
        interactive = stage.aggregation == "interactive"
        if interactive:
            stage.resume_client(self.client_id, self._protocol_state(context))
        start = defense.personalize(global_state, ctx)
        delta, loss = self.fit(start, ctx)
        payload = defense.protect(delta, ctx)
        del delta
        self._save(defense, context)
        content = payload_to_content(payload)
        if interactive:
            context.state.config_records[_SECAGG_CLIENT] = ConfigRecord({"state": stage.client_state()})
        if stage.aggregation != "plain":  # an opaque payload: its (public) layout goes next to it
            assert stage.layout is not None
            content[LAYOUT] = layout_to_record(stage.layout)
        content[METRICS] = MetricRecord(
            {"client_id": self.client_id, "num-examples": self.num_examples, "train_loss": float(loss)}
        )
        return Message(content, reply_to=msg)
