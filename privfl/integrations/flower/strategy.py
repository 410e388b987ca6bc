"""The server side of a privfl :class:`~privfl.defenses.base.Defense` as a Flower strategy.

:class:`PrivflStrategy` runs the round exactly as privfl's :class:`~privfl.fl.server.Server` does
inside :func:`~privfl.fl.loop.run_federated` — the same client sampling, FedAvg weights from the
clients' sizes, ``defense.before_round`` before any client trains (so an exhausted privacy budget
stops the run before a partial round), ``defense.aggregate`` on the payloads, the mean applied to
the global state — so a Flower run and a ``run_federated`` run with the same seeds and defense
give the same model and the same accounted ε.

Replies that fail (node errors, timeouts) or carry a malformed payload (wrong keys or shapes,
non-finite values, undecodable bytes, an id that does not match the node) are logged with their
reason and treated as dropouts; the round completes with the others, or fails with
:class:`RoundFailedError` when fewer than ``min_clients`` valid payloads remain.

Under :class:`~privfl.defenses.secagg.SecureAggregation` (the last stage of ``defense``), the
strategy gives that stage a transport of Flower ``query`` messages: ``before_round`` runs the key
rounds (advertise, share keys, deliver shares) with the sampled nodes before they train, only the
clients holding each other's shares (U2) are asked to train, and ``aggregate`` runs the unmask
round. Each node keeps its own protocol state; the server process holds no client secret.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from privfl.defenses.base import Defense, Payload, RoundContext, with_survivors
from privfl.defenses.ckks import CKKSPayloadError, CKKSServer, payload_header
from privfl.defenses.secagg import InsufficientClientsError, SecAggTransport
from privfl.errors import PayloadTooLargeError, PrivflError
from privfl.fl.client import clamp_running_variances
from privfl.fl.server import Server
from privfl.integrations.flower.client import secagg_stage
from privfl.integrations.flower.codec import (
    AGGREGATE,
    CTX,
    METRICS,
    SECAGG,
    MalformedPayloadError,
    content_to_payload,
    context_to_record,
    record_to_layout,
    record_to_state,
    record_value,
    state_to_record,
)
from privfl.updates import UpdateSpec

log = logging.getLogger("privfl.flower")


def _short(reason: str | None, limit: int = 300) -> str:
    """One line, at most ``limit`` characters, keeping the end (where a remote traceback says what failed)."""
    text = " ".join(str(reason).split())
    return text if len(text) <= limit else "…" + text[-limit:]


class RoundFailedError(PrivflError, RuntimeError):
    """Fewer than ``min_clients`` valid payloads arrived in a round (or, under secure aggregation,
    fewer than its threshold took part in a step)."""


class FlowerSecAggTransport(SecAggTransport):
    """Secure-aggregation exchanges as Flower ``query`` messages (``"privfl.secagg"`` records) to the
    clients' nodes. A node that fails or answers without a message drops out of the round; its
    reason is logged and kept in :attr:`failed`.

    Args:
        grid: the ServerApp's grid.
        nodes: ``{client id: node id}``.
        timeout: seconds to wait for each exchange's replies.
    """

    fault_tolerant = True

    def __init__(self, grid: Grid, nodes: dict[int, int], timeout: float) -> None:
        self.grid, self.nodes, self.timeout = grid, dict(nodes), timeout
        self.failed: dict[int, str] = {}

    def exchange(self, step: str, messages: dict[int, bytes]) -> dict[int, bytes]:  # type: ignore[override]
        msgs = [Message(RecordDict({SECAGG: ConfigRecord({"step": step, "message": m})}), dst_node_id=self.nodes[c],
                        message_type=MessageType.QUERY) for c, m in messages.items()]
        client_of = {n: c for c, n in self.nodes.items()}
        out: dict[int, bytes] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            cid = client_of.get(reply.metadata.src_node_id)
            if cid not in messages or cid in out:
                continue
            rec = None if reply.has_error() else reply.content.config_records.get(SECAGG)
            message = rec.get("message") if rec is not None else None
            if isinstance(message, bytes):
                out[cid] = message
                continue
            reason = _short(reply.error.reason) if reply.has_error() else "reply without a 'privfl.secagg' message"
            self.failed[cid] = f"secure aggregation, {step}: {reason}"
            log.warning("client %d dropped at secure-aggregation step %s: %s", cid, step, reason)
        return out


class PrivflStrategy(Strategy):
    """Server half of a privfl defense in Flower.

    Args:
        defense: the server's defense instance (keeps the accountant; its client-side state, if
            any, lives on the clients).
        fraction: fraction of clients sampled per round (fixed-size sampling, as privfl's server:
            no amplification claimed).
        min_clients: fewest valid payloads a round may aggregate.
        seed: the experiment seed (client sampling; seeded noise sources).
        model: the architecture, to clamp BatchNorm running variances after a noised aggregate
            as ``run_federated`` does (optional).
        ckks: encrypted aggregation. The clients' defense ends with
            :class:`~privfl.defenses.ckks.CKKSAggregation` (they hold the keys); the server gets only
            ``CKKSServer(keys.server_context)`` and ``defense`` = the clients' stages *before* CKKS
            (e.g. ``ClipUpdate``, distributed DP, whose accounting the server keeps). The server sums
            the ciphertexts and sends the encrypted mean to the clients, who decrypt it and keep
            the global state: the server never sees an update or the model (``result.arrays`` does not
            hold it; :attr:`encrypted_aggregates` keeps each round's ciphertext).
        max_payload_bytes: a reply whose payload is larger is rejected before it is decoded
            (logged, counted as a dropout). ``None``: 64 × the global state's size + 1 MiB, room for
            CKKS's expansion (about 16× for ``precise``) and nothing near a memory exhaustion.

    Attributes:
        history: one record per round (``round``, ``sampled``, ``received``, ``rejected`` with reasons,
            ``train_loss``, ``privacy``).
    """

    def __init__(self, defense: Defense, *, fraction: float = 1.0, min_clients: int = 2, seed: int = 0,
                 model: nn.Module | None = None, ckks: CKKSServer | None = None,
                 max_payload_bytes: int | None = None):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if ckks is not None:
            stages = getattr(defense, "stages", (defense,))
            if any(type(st).__name__ == "CKKSAggregation" for st in stages):
                raise ValueError("with ckks=, the server's defense must not contain CKKSAggregation: it holds the "
                                 "secret key, which must stay on the clients")
            central = [st for st in stages if getattr(st, "placement", None) == "central"]
            if central:
                raise ValueError(f"{type(central[0]).__name__}(placement='central') adds noise to the plaintext mean, "
                                 "which a CKKS server never has; use placement='distributed'")
        self.ckks = ckks
        self.encrypted_aggregates: list[bytes] = []
        self.defense = defense
        self.fraction = fraction
        self.min_clients = min_clients
        self.seed = seed
        self.model = model
        self.history: list[dict[str, Any]] = []
        self._nodes: dict[int, int] = {}  # client id -> node id
        self._sizes: dict[int, int] = {}
        self._server: Server | None = None
        self._ctx: RoundContext | None = None
        self._secagg = secagg_stage(defense)
        if self._secagg is not None and ckks is not None:
            raise ValueError("secure aggregation and CKKS are two different last stages: pick one")
        self._transport: FlowerSecAggTransport | None = None
        self._timeout = 3600.0
        self.max_payload_bytes = max_payload_bytes

    @property
    def accountant(self):
        return getattr(self.defense, "accountant", None)

    # ---- setup: who is there, and how much data each holds ------------------------------------

    def discover(self, grid: Grid, timeout: float = 600) -> dict[int, int]:
        """Ask every connected node for its privfl client id and training-set size; returns
        ``{client id: size}``. Nodes that fail or reply twice with one id are refused."""
        nodes = list(grid.get_node_ids())
        msgs = [Message(RecordDict({"privfl.query": ConfigRecord({"what": "client"})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not answer the discovery query: %s", node, _short(reply.error.reason))
                continue
            m = reply.content.metric_records.get(METRICS)
            if m is None or "client_id" not in m or "num-examples" not in m:
                log.warning("node %s: discovery reply without client_id / num-examples; ignored", node)
                continue
            try:
                cid = int(record_value(m, "client_id", int, "discovery reply"))
                size = int(record_value(m, "num-examples", int, "discovery reply"))
            except MalformedPayloadError as e:
                log.warning("node %s: %s; ignored", node, e)
                continue
            if cid in self._nodes or size < 1:
                log.warning("node %s: client id %s already taken or size %s < 1; ignored", node, cid, size)
                continue
            self._nodes[cid], self._sizes[cid] = node, size
        if len(self._nodes) < self.min_clients:
            raise RoundFailedError(f"only {len(self._nodes)} clients answered, min_clients = {self.min_clients}")
        ids = sorted(self._nodes)
        if ids != list(range(len(ids))):
            raise RoundFailedError(f"client ids must be 0..n-1, got {ids}")
        return dict(self._sizes)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None) -> Result:
        """Discover the clients, then run ``num_rounds`` rounds (Flower's loop)."""
        self._timeout = timeout
        if not self._nodes:
            self.discover(grid, timeout)
        state = record_to_state(initial_arrays)
        self._server = Server(state, self.defense, len(self._nodes), self.fraction, self.seed)
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

    # ---- one round ------------------------------------------------------------------------------

    def begin_round(self, server_round: int, arrays: ArrayRecord) -> RoundContext:
        """Sample the round's clients, build its context and run ``defense.before_round`` (which may
        refuse the round, e.g. :class:`~privfl.defenses.accounting.PrivacyBudgetExceeded`)."""
        assert self._server is not None, "call start() (or discover()) first"
        r = server_round - 1  # privfl rounds are 0-based
        self._server.global_state = record_to_state(arrays)
        sampled = self._server.sample(r)
        ctx = self._server.context(r, sampled, [self._sizes[c] for c in sampled])
        try:
            self.defense.before_round(ctx)  # before any client trains (under secure aggregation: the key rounds)
        except InsufficientClientsError as e:
            raise RoundFailedError(f"round {r}: {e}") from e
        self._ctx = ctx
        self._t0 = time.perf_counter()
        return ctx

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self._secagg is not None:
            self._transport = FlowerSecAggTransport(grid, self._nodes, self._timeout)
            self._secagg.transport = self._transport
        ctx = self.begin_round(server_round, arrays)
        sampled = self._secagg.ready_clients if self._secagg is not None else ctx.sampled
        if self.encrypted_aggregates:  # CKKS: the clients hold the state; send them the encrypted mean
            model_part: dict[str, Any] = {AGGREGATE: ConfigRecord({"ciphertext": self.encrypted_aggregates[-1]})}
        else:
            model_part = {"privfl.state": arrays}
        return [Message(RecordDict({**model_part, CTX: context_to_record(ctx.for_client(c)), "config": config}),
                        dst_node_id=self._nodes[c], message_type=MessageType.TRAIN) for c in sampled]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._server is not None and self._ctx is not None
        ctx = self._ctx
        node_to_client = {n: c for c, n in self._nodes.items()}
        payloads: list[Payload] = [None] * len(ctx.sampled)
        losses: dict[int, float] = {}
        rejected: dict[int, str] = dict(self._transport.failed) if self._transport is not None else {}
        layouts: dict[int, UpdateSpec] = {}
        for reply in replies:
            cid = node_to_client.get(reply.metadata.src_node_id)
            if cid is None or cid not in ctx.sampled:
                log.warning("round %d: reply from unexpected node %s ignored", ctx.round, reply.metadata.src_node_id)
                continue
            try:
                if reply.has_error():
                    raise MalformedPayloadError(f"client error: {_short(reply.error.reason)}")
                m = reply.content.metric_records.get(METRICS)
                if m is None or record_value(m, "client_id", int, "metrics") != cid:
                    raise MalformedPayloadError("metrics missing or client_id does not match the node")
                payload = content_to_payload(reply.content, self._server.global_state, self._payload_limit())
                if (self.ckks is not None or self._secagg is not None) and not isinstance(payload, bytes):
                    raise MalformedPayloadError("a plaintext update arrived where ciphertext or a masked input "
                                                "was expected")
                if self._secagg is not None:
                    layouts[cid] = record_to_layout(reply.content)
            except (MalformedPayloadError, PayloadTooLargeError) as e:
                rejected[cid] = str(e)
                log.warning("round %d: client %d rejected: %s", ctx.round, cid, e)
                continue
            payloads[ctx.sampled.index(cid)] = payload
            loss = m.get("train_loss")
            losses[cid] = float(loss) if isinstance(loss, (int, float)) else float("nan")
        if layouts:
            self._agree_on_layout(layouts, payloads, rejected, ctx)
        received = [c for c, p in zip(ctx.sampled, payloads) if p is not None]
        if len(received) < self.min_clients:
            raise RoundFailedError(f"round {ctx.round}: {len(received)} valid payloads, min_clients = "
                                   f"{self.min_clients} (rejected: {rejected or 'none'})")
        if self.ckks is not None:
            return self._aggregate_encrypted(payloads, ctx, received, rejected, losses)
        agg_ctx = ctx
        if len(received) < len(ctx.sampled) and not self.defense.hides_individual_updates:
            # plain payloads: aggregate the survivors with renormalised weights (crypto defenses get the
            # None markers instead: their protocols handle dropouts themselves)
            keep = [i for i, p in enumerate(payloads) if p is not None]
            total_w = sum(ctx.weights[i] for i in keep)
            agg_ctx = replace(ctx, sampled=tuple(ctx.sampled[i] for i in keep),
                              weights=tuple(ctx.weights[i] / total_w for i in keep))
            payloads = [payloads[i] for i in keep]
        try:
            self._server.aggregate(payloads, agg_ctx)
        except InsufficientClientsError as e:
            raise RoundFailedError(f"round {ctx.round}: {e}") from e
        if self._secagg is not None:
            report = self._secagg.last_report
            assert report is not None and self._transport is not None
            rejected.update({**self._transport.failed, **report.rejected})
            received = list(report.survivors)
        if self.model is not None:
            clamp_running_variances(self.model, self._server.global_state)
        return state_to_record(self._server.global_state), self._round_metrics(ctx, received, rejected, losses)

    def _payload_limit(self) -> int:
        if self.max_payload_bytes is not None:
            return self.max_payload_bytes
        assert self._server is not None
        state_bytes = sum(t.numel() * t.element_size() for t in self._server.global_state.values())
        return 64 * state_bytes + (1 << 20)

    def _agree_on_layout(self, layouts: dict[int, UpdateSpec], payloads: list[Payload], rejected: dict[int, str],
                         ctx: RoundContext) -> None:
        """Masked inputs must share one layout: the most common one wins, the others are rejected."""
        specs = list(layouts.values())
        common = max(specs, key=specs.count)
        for cid, spec in layouts.items():
            if spec != common:
                rejected[cid] = "its masked update's layout differs from the other clients'"
                log.warning("round %d: client %d rejected: %s", ctx.round, cid, rejected[cid])
                payloads[ctx.sampled.index(cid)] = None
        assert self._secagg is not None
        self._secagg.set_layout(common)

    def _round_metrics(self, ctx: RoundContext, received: list[int], rejected: dict[int, str],
                       losses: dict[int, float]) -> MetricRecord:
        total = sum(ctx.weight_of(c) for c in received)
        train_loss = sum(ctx.weight_of(c) * losses[c] for c in received) / total
        privacy = None
        if self.accountant is not None:
            report = self.accountant.epsilon()
            privacy = {"epsilon": report.epsilon, "delta": report.delta, "accountant": report.accountant}
        self.history.append({"round": ctx.round, "sampled": list(ctx.sampled), "received": received,
                             "rejected": rejected, "train_loss": train_loss, "privacy": privacy,
                             "seconds": time.perf_counter() - self._t0})
        metrics: dict[str, int | float | list[int] | list[float]] = {"train_loss": train_loss, "clients": len(received),
                                           "rejected": len(rejected)}
        if privacy is not None:
            metrics["epsilon"] = float(privacy["epsilon"])
        return MetricRecord(metrics)

    def _aggregate_encrypted(self, payloads: list[Payload], ctx: RoundContext, received: list[int],
                             rejected: dict[int, str], losses: dict[int, float]
                             ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """CKKS: sum the ciphertexts (payloads that fail to parse are rejected and the rest summed
        again), record the noise stages' privacy events, keep the encrypted mean for the clients."""
        assert self.ckks is not None
        try:
            encrypted = self.ckks.aggregate(payloads, ctx.weights)
        except (CKKSPayloadError, PayloadTooLargeError):
            for i, p in enumerate(payloads):  # find the culprits: each payload alone
                if p is None:
                    continue
                try:
                    assert isinstance(p, bytes)
                    self.ckks.check_payload(p, ctx.weights[i], f"client {ctx.sampled[i]}'s payload")
                except (CKKSPayloadError, PayloadTooLargeError) as e:
                    cid = ctx.sampled[i]
                    rejected[cid] = _short(str(e))
                    log.warning("round %d: client %d rejected: %s", ctx.round, cid, rejected[cid])
                    payloads[i] = None
                    received.remove(cid)
            if len(received) < self.min_clients:
                raise RoundFailedError(f"round {ctx.round}: {len(received)} valid payloads, min_clients = "
                                       f"{self.min_clients} (rejected: {rejected})") from None
            encrypted = self.ckks.aggregate(payloads, ctx.weights)
        survivors_ctx = with_survivors(ctx, payloads)
        numel = int(payload_header(encrypted, "encrypted aggregate")["numel"])
        stages = [s for s in reversed(getattr(self.defense, "stages", (self.defense,)))
                  if hasattr(s, "record_release")]
        # the clients decrypt the aggregate once it is sent: check every noise stage before that,
        # and record every one once it is to be sent (nothing revealed escapes the accountant)
        for stage in stages:
            stage.check_release(survivors_ctx, numel)
        for stage in stages:
            stage.record_release(survivors_ctx, numel)
        self.encrypted_aggregates.append(encrypted)
        return None, self._round_metrics(ctx, received, rejected, losses)

    # ---- no federated evaluation (use evaluate_fn on the server for a global test split) -------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("PrivflStrategy: defense %r, fraction %s, min_clients %d, %d clients", self.defense,
                 self.fraction, self.min_clients, len(self._nodes))
