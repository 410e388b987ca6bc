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

Under :class:`~privfl.defenses.secagg.SecureAggregation`, the server's ``query`` messages carrying
``"privfl.secagg"`` run this node's side of the Bonawitz rounds
(:meth:`~privfl.defenses.secagg.protocol.SecAggClient.handle`); the node's protocol state — its
keys, self-mask seed and the shares it holds for the others — is kept between messages in
``context.state`` (in the clear, on the node: protect the SuperNode's machine) and masks the update
in ``train``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from privfl.defenses.base import Defense, RoundContext
from privfl.defenses.ckks import CKKSAggregation
from privfl.defenses.secagg import SecAggClient, SecAggProtocolError, SecureAggregation
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
from privfl.updates import Update, apply, unflatten

FitFn = Callable[[Update, RoundContext], tuple[Update, float]]
"""``fit(start_state, ctx) -> (delta = local − start, mean train loss)`` — the client's local training."""

_DEFENSE_STATE = "privfl.defense-state"
_GLOBAL = "privfl.global"  # the node's copy of the global state when the server only has ciphertext
_SECAGG_CLIENT = "privfl.secagg-client"  # this node's secure-aggregation protocol state (secret)


def _last_stage(defense: Defense, cls: type) -> Any:
    stages = getattr(defense, "stages", (defense,))
    return stages[-1] if stages and isinstance(stages[-1], cls) else None


def ckks_stage(defense: Defense) -> CKKSAggregation | None:
    """The :class:`~privfl.defenses.ckks.CKKSAggregation` stage of ``defense`` (itself or a Compose's
    last stage), or ``None``."""
    return _last_stage(defense, CKKSAggregation)


def secagg_stage(defense: Defense) -> SecureAggregation | None:
    """The :class:`~privfl.defenses.secagg.SecureAggregation` stage of ``defense`` (itself or a
    Compose's last stage), or ``None``."""
    return _last_stage(defense, SecureAggregation)


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

    def __init__(self, defense_factory: Callable[[], Defense], fit: FitFn, *, client_id: int, num_examples: int):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        self.defense_factory = defense_factory
        self.fit = fit
        self.client_id = int(client_id)
        self.num_examples = int(num_examples)

    def query(self, msg: Message, context: Context) -> Message:
        """Reply with this client's id and training-set size, or run a secure-aggregation step."""
        if SECAGG in msg.content.config_records:
            return self._secagg_step(msg, context)
        return Message(RecordDict({METRICS: MetricRecord({"client_id": self.client_id,
                                                          "num-examples": self.num_examples})}), reply_to=msg)

    def _secagg_step(self, msg: Message, context: Context) -> Message:
        rec = msg.content.config_records[SECAGG]
        step, message = rec.get("step"), rec.get("message")
        if not isinstance(step, str) or not isinstance(message, bytes):
            raise MalformedPayloadError("'privfl.secagg' needs a str 'step' and a bytes 'message'")
        if secagg_stage(self.defense_factory()) is None:
            raise SecAggProtocolError(f"client {self.client_id}: its defense does not end with SecureAggregation")
        if step == "advertise":  # a new round: fresh keys, whatever was left of the last one is dropped
            client = SecAggClient(self.client_id)
        else:
            client = self._secagg_client(context)
        reply = client.handle(step, message)
        context.state.config_records[_SECAGG_CLIENT] = ConfigRecord({"state": client.state_bytes()})
        return Message(RecordDict({SECAGG: ConfigRecord({"message": reply})}), reply_to=msg)

    def _secagg_client(self, context: Context) -> SecAggClient:
        saved = context.state.config_records.get(_SECAGG_CLIENT)
        if saved is None:
            raise SecAggProtocolError(f"client {self.client_id}: no secure-aggregation round in progress on this node")
        return SecAggClient.from_state_bytes(record_value(saved, "state", bytes, "saved secure-aggregation state"))

    def _defense(self, context: Context) -> Defense:
        defense = self.defense_factory()
        saved = context.state.config_records.get(_DEFENSE_STATE)
        if saved is not None:
            state = record_value(saved, "state", bytes, "saved defense state")
            defense.load_state_dict(torch.load(io.BytesIO(state), weights_only=False))
        return defense

    def _save(self, defense: Defense, context: Context) -> None:
        buf = io.BytesIO()
        torch.save(defense.state_dict(), buf)
        context.state.config_records[_DEFENSE_STATE] = ConfigRecord({"state": buf.getvalue()})

    def _global_state(self, msg: Message, context: Context, defense: Defense) -> Update:
        """The global state this round starts from: sent in the clear, or — under CKKS, where the
        server holds only ciphertext — this node's copy plus the decrypted encrypted mean update."""
        ckks = ckks_stage(defense)
        if STATE in msg.content.array_records:
            state = record_to_state(msg.content.array_records[STATE])
        elif AGGREGATE in msg.content.config_records:
            if ckks is None or _GLOBAL not in context.state.array_records:
                raise MalformedPayloadError("an encrypted aggregate arrived, but this node has no CKKS key or "
                                            "no copy of the global state to apply it to")
            vec, spec = ckks.keyholder.decrypt_vector(
                record_value(msg.content.config_records[AGGREGATE], "ciphertext", bytes, "'privfl.aggregate'"))
            stored = record_to_state(context.state.array_records[_GLOBAL])
            state = apply(stored, unflatten(vec, spec), allow_missing=True)
        else:
            raise MalformedPayloadError("the train message carries neither a state nor an encrypted aggregate")
        if ckks is not None:
            context.state.array_records[_GLOBAL] = state_to_record(state)
        return state

    def train(self, msg: Message, context: Context) -> Message:
        """One round: personalize the global state, train, protect, reply with the payload."""
        ctx = record_to_context(msg.content.config_records[CTX])
        if ctx.client_id != self.client_id:
            raise ValueError(f"message for client {ctx.client_id} reached client {self.client_id}")
        defense = self._defense(context)
        global_state = self._global_state(msg, context, defense)
        secagg, party = secagg_stage(defense), None
        if secagg is not None:
            party = self._secagg_client(context)
            secagg.use_client(party)
        start = defense.personalize(global_state, ctx)
        delta, loss = self.fit(start, ctx)
        payload = defense.protect(delta, ctx)
        del delta
        self._save(defense, context)
        content = payload_to_content(payload)
        if secagg is not None:
            assert party is not None and secagg.layout is not None
            context.state.config_records[_SECAGG_CLIENT] = ConfigRecord({"state": party.state_bytes()})
            content[LAYOUT] = layout_to_record(secagg.layout)
        content[METRICS] = MetricRecord({"client_id": self.client_id, "num-examples": self.num_examples,
                                         "train_loss": float(loss)})
        return Message(content, reply_to=msg)
