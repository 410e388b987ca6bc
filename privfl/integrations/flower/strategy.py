"""The server side of a privfl :class:`~privfl.defenses.base.Defense` as a Flower strategy wrapper.

:class:`PrivflStrategy` wraps an inner Flower strategy (:class:`~flwr.serverapp.strategy.FedAvg` by
default), as Flower's own ``DifferentialPrivacyServerSideFixedClipping`` does: each round, the inner
strategy's ``configure_train`` picks the nodes and writes the train config (FedProx's
``proximal-mu``, ``server-round``, ...), and its ``aggregate_train`` turns the defended mean into the
next global model (FedAvg and FedProx apply it; FedAdam, FedYogi, FedAdagrad use it as their
server update). Federated evaluation is the inner strategy's too. What privfl adds in between is
the round as privfl's :class:`~privfl.fl.server.Server` runs it inside
:func:`~privfl.fl.loop.run_federated`: FedAvg weights from the clients' sizes,
``defense.before_round`` before any client trains (so an exhausted privacy budget stops the run
before a partial round), the round context sent to the clients, ``defense.aggregate`` on their
payloads, the accountant — so a Flower run with the default FedAvg and a ``run_federated`` run with
the same seeds and defense give the same model and the same accounted ε.

Replies that fail (node errors, timeouts) or carry a malformed payload (wrong keys or shapes,
non-finite values, undecodable bytes, an id that does not match the node) are logged with their
reason and treated as dropouts; the round completes with the others, or fails with
:class:`RoundFailedError` when fewer than ``min_clients`` valid payloads remain.

How the aggregate is obtained follows the capability the defense's aggregating stage declares
(:attr:`Defense.aggregation <privfl.defenses.base.Defense.aggregation>`), never its type:

* ``"plain"``: ``defense.aggregate`` on the payloads.
* ``"interactive"`` (e.g. :class:`~privfl.defenses.secagg.SecureAggregation`): the strategy connects
  the stage to a :class:`FlowerTransport` of Flower ``query`` messages; ``before_round`` runs the
  set-up rounds with the sampled nodes before they train, only the stage's ``ready_clients`` are
  asked to train, and ``aggregate`` runs the closing rounds. Each node keeps its own protocol state;
  the server process holds no client secret.
* ``"encrypted"`` (e.g. :class:`~privfl.defenses.ckks.CKKSAggregation`, on the clients only): the
  server gets the keyless half (``ckks=``), adds the payloads into an encrypted aggregate and sends
  it to the clients, which open it and keep the global state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from torch import nn

from privfl.defenses.base import (
    Defense,
    EncryptedAggregator,
    Payload,
    RoundContext,
    Transport,
    with_survivors,
)
from privfl.defenses.secagg import InsufficientClientsError
from privfl.errors import PayloadTooLargeError, PrivflError
from privfl.fl.client import clamp_running_variances
from privfl.fl.server import Server
from privfl.integrations.flower.codec import (
    AGGREGATE,
    CTX,
    METRICS,
    SECAGG,
    STATE,
    MalformedPayloadError,
    content_to_payload,
    context_to_record,
    record_to_layout,
    record_to_state,
    record_value,
    state_to_record,
)
from privfl.updates import Update, UpdateSpec

log = logging.getLogger("privfl.flower")


def _short(reason: str | None, limit: int = 300) -> str:
    """One line, at most ``limit`` characters, keeping the end (where a remote traceback says what failed)."""
    text = " ".join(str(reason).split())
    return text if len(text) <= limit else "…" + text[-limit:]


def _train_loss(ctx: RoundContext, received: list[int], losses: dict[int, float]) -> float:
    """The received clients' mean training loss, with their FedAvg weights."""
    return sum(ctx.weight_of(c) * losses[c] for c in received) / sum(ctx.weight_of(c) for c in received)


class RoundFailedError(PrivflError, RuntimeError):
    """Fewer than ``min_clients`` valid payloads arrived in a round (or, under secure aggregation,
    fewer than its threshold took part in a step), or the inner strategy gave no usable round."""


class FlowerTransport(Transport):
    """The exchanges of an ``"interactive"`` aggregator as Flower ``query`` messages
    (``"privfl.secagg"`` records) to the clients' nodes. A node that fails or answers without a
    message drops out of the round; its reason is logged and kept in :attr:`failed`.

    Args:
        grid: the ServerApp's grid.
        nodes: ``{client id: node id}``.
        timeout: seconds to wait for each exchange's replies.
    """

    fault_tolerant = True

    def __init__(self, grid: Grid, nodes: dict[int, int], timeout: float) -> None:
        self.grid, self.nodes, self.timeout = grid, dict(nodes), timeout
        self.failed: dict[int, str] = {}

    def exchange(self, step: str, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        msgs = [
            Message(
                RecordDict({SECAGG: ConfigRecord({"step": step, "message": m})}),
                dst_node_id=self.nodes[c],
                message_type=MessageType.QUERY,
            )
            for c, m in messages.items()
        ]
        client_of = {n: c for c, n in self.nodes.items()}
        out: dict[int, bytes] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            cid = client_of.get(reply.metadata.src_node_id)
            if cid is None or cid not in messages or cid in out:
                continue
            rec = None if reply.has_error() else reply.content.config_records.get(SECAGG)
            message = rec.get("message") if rec is not None else None
            if isinstance(message, bytes):
                out[cid] = message
                continue
            reason = (
                _short(reply.error.reason) if reply.has_error() else "reply without a 'privfl.secagg' message"
            )
            self.failed[cid] = f"secure aggregation, {step}: {reason}"
            log.warning("client %d dropped at secure-aggregation step %s: %s", cid, step, reason)
        return out


FlowerSecAggTransport = FlowerTransport
"""The former name of :class:`FlowerTransport`."""


def default_inner() -> FedAvg:
    """The inner strategy when none is given: FedAvg over every connected node, no federated
    evaluation (a :class:`~privfl.integrations.flower.client.PrivflClient` answers no ``evaluate``)."""
    inner = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    inner.fraction_evaluate, inner.min_evaluate_nodes = 0.0, 0  # (set here: the constructor would warn)
    return inner


class PrivflStrategy(Strategy):
    """Server half of a privfl defense in Flower, wrapped around an inner Flower strategy.

    Args:
        defense: the server's defense instance (keeps the accountant; its client-side state, if
            any, lives on the clients).
        inner: the Flower strategy to wrap (default: :func:`default_inner`, FedAvg over every node).
            Its ``configure_train`` samples the nodes (unless ``fraction`` is given) and writes the
            train config, which the clients' ``fit`` reads in ``ctx.extra`` (e.g.
            ``ctx.extra["config"]["proximal-mu"]`` under FedProx). Its ``aggregate_train`` gets one
            reply: the global model plus the defended mean, weighted by the survivors' examples, and
            returns the next global model. Strategies that score individual replies (Krum,
            FedMedian, trimmed mean) are pointless here: the server never sees an individual
            update. Its ``configure_evaluate`` / ``aggregate_evaluate`` run federated evaluation as
            configured (the ClientApp then needs an ``evaluate`` handler).
        strategy: the same as ``inner``, under the name Flower's strategy wrappers use.
        fraction: ``None`` (default): the clients that train are those the inner strategy addresses.
            A number in (0, 1]: privfl's seeded fixed-size sampling of ``round(fraction · n)`` clients,
            as ``run_federated`` draws them (the inner strategy must then address every sampled
            node, e.g. FedAvg with ``fraction_train=1.0``). Neither claims privacy amplification by
            subsampling (``sampling_rate`` 1).
        min_clients: fewest valid payloads a round may aggregate.
        seed: the experiment seed (client sampling; seeded noise sources).
        model: the architecture, to clamp BatchNorm running variances after a noised aggregate
            as ``run_federated`` does (optional).
        ckks: encrypted aggregation: the keyless server half of an ``"encrypted"`` aggregator (an
            :class:`~privfl.defenses.base.EncryptedAggregator`, e.g.
            ``CKKSServer(keys.server_context)``). The clients' defense ends with the aggregator
            (e.g. :class:`~privfl.defenses.ckks.CKKSAggregation`; they hold the keys); ``defense`` =
            the clients' stages *before* it (e.g. ``ClipUpdate``, distributed DP, whose accounting the
            server keeps). The server sums the ciphertexts and sends the encrypted mean to the
            clients, who decrypt it and keep the global state: the server never sees an update or
            the model (``result.arrays`` does not hold it; :attr:`encrypted_aggregates` keeps each
            round's ciphertext). The inner strategy then only samples and configures: its
            ``aggregate_train`` must be FedAvg's (FedAvg, FedProx), which the clients' own
            application of the mean replaces, and there is no federated evaluation.
        max_payload_bytes: a reply whose payload is larger is rejected before it is decoded
            (logged, counted as a dropout). ``None``: 64 × the global state's size + 1 MiB, room for
            CKKS's expansion (about 16× for ``precise``) and nothing near a memory exhaustion.

    Attributes:
        inner: the wrapped strategy (also as :attr:`strategy`, the attribute Flower's wrappers use).
        history: one record per round (``round``, ``sampled``, ``received``, ``rejected`` with reasons,
            ``train_loss``, ``privacy``).
    """

    def __init__(
        self,
        defense: Defense,
        *,
        inner: Strategy | None = None,
        strategy: Strategy | None = None,
        fraction: float | None = None,
        min_clients: int = 2,
        seed: int = 0,
        model: nn.Module | None = None,
        ckks: EncryptedAggregator | None = None,
        max_payload_bytes: int | None = None,
    ):
        if inner is not None and strategy is not None:
            raise ValueError("pass the strategy to wrap as inner= or as strategy=, not both")
        inner = inner if inner is not None else strategy
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1] or None, got {fraction}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if inner is not None and (not isinstance(inner, Strategy) or isinstance(inner, PrivflStrategy)):
            raise TypeError(
                f"inner must be a Flower strategy other than PrivflStrategy, got {type(inner).__name__}"
            )
        self._aggregation = defense.aggregation
        if ckks is not None:
            stages = getattr(defense, "stages", (defense,))
            if any(st.aggregation == "encrypted" for st in stages):
                raise ValueError(
                    "with ckks=, the server's defense must not contain the encrypted aggregator (e.g. "
                    "CKKSAggregation): it holds the secret key, which must stay on the clients"
                )
            if self._aggregation != "plain":
                raise ValueError(
                    f"the defense's aggregation is {self._aggregation!r} and ckks= adds an encrypted one: "
                    "pick one"
                )
            central = [st for st in stages if getattr(st, "placement", None) == "central"]
            if central:
                raise ValueError(
                    f"{type(central[0]).__name__}(placement='central') adds noise to the plaintext mean, "
                    "which a CKKS server never has; use placement='distributed'"
                )
            if inner is not None and not (
                isinstance(inner, FedAvg) and type(inner).aggregate_train is FedAvg.aggregate_train
            ):
                raise ValueError(
                    f"with ckks=, the server never holds the model: the clients apply the decrypted mean, "
                    f"so {type(inner).__name__}'s server update cannot run; wrap a strategy that "
                    "aggregates as FedAvg does (FedAvg, FedProx)"
                )
        self.inner: Strategy = inner if inner is not None else default_inner()
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
        self._transport: FlowerTransport | None = None
        self._timeout = 3600.0
        self.max_payload_bytes = max_payload_bytes

    @property
    def strategy(self) -> Strategy:
        """The wrapped strategy (:attr:`inner`), under the name Flower's strategy wrappers use."""
        return self.inner

    @property
    def accountant(self):
        return getattr(self.defense, "accountant", None)

    # ---- setup: who is there, and how much data each holds ------------------------------------

    def discover(self, grid: Grid, timeout: float = 600) -> dict[int, int]:
        """Ask every connected node for its privfl client id and training-set size; returns
        ``{client id: size}``. Nodes that fail or reply twice with one id are refused."""
        nodes = list(grid.get_node_ids())
        msgs = [
            Message(
                RecordDict({"privfl.query": ConfigRecord({"what": "client"})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in nodes
        ]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning(
                    "node %s did not answer the discovery query: %s", node, _short(reply.error.reason)
                )
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
            raise RoundFailedError(
                f"only {len(self._nodes)} clients answered, min_clients = {self.min_clients}"
            )
        ids = sorted(self._nodes)
        if ids != list(range(len(ids))):
            raise RoundFailedError(f"client ids must be 0..n-1, got {ids}")
        return dict(self._sizes)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
    ) -> Result:
        """Discover the clients, then run ``num_rounds`` rounds (Flower's loop)."""
        self._timeout = timeout
        if not self._nodes:
            self.discover(grid, timeout)
        state = record_to_state(initial_arrays)
        self._server = Server(state, self.defense, len(self._nodes), self.fraction or 1.0, self.seed)
        return super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )

    # ---- one round ------------------------------------------------------------------------------

    def begin_round(
        self, server_round: int, arrays: ArrayRecord, sampled: Iterable[int] | None = None
    ) -> RoundContext:
        """Build the round's context for ``sampled`` (``None``: privfl's seeded sampling) and run
        ``defense.before_round`` (which may refuse the round, e.g.
        :class:`~privfl.defenses.accounting.PrivacyBudgetExceeded`)."""
        assert self._server is not None, "call start() (or discover()) first"
        r = server_round - 1  # privfl rounds are 0-based
        self._server.global_state = record_to_state(arrays)
        chosen = self._server.sample(r) if sampled is None else tuple(sorted(sampled))
        if len(chosen) < self.min_clients:
            raise RoundFailedError(
                f"round {r}: {len(chosen)} clients sampled, min_clients = {self.min_clients}"
            )
        ctx = self._server.context(r, chosen, [self._sizes[c] for c in chosen])
        try:
            self.defense.before_round(
                ctx
            )  # before any client trains (an interactive aggregator: its set-up rounds)
        except InsufficientClientsError as e:
            raise RoundFailedError(f"round {r}: {e}") from e
        self._ctx = ctx
        self._t0 = time.perf_counter()
        return ctx

    def _inner_contents(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> dict[int, RecordDict]:
        """The inner strategy's train messages, as ``{client id: content}`` (nodes that are not
        discovered privfl clients are skipped)."""
        client_of = {n: c for c, n in self._nodes.items()}
        contents: dict[int, RecordDict] = {}
        for msg in self.inner.configure_train(server_round, arrays, config, grid):
            cid = client_of.get(msg.metadata.dst_node_id)
            if cid is None:
                log.warning(
                    "round %d: the inner strategy addressed node %s, not a privfl client; skipped",
                    server_round - 1,
                    msg.metadata.dst_node_id,
                )
                continue
            contents[cid] = msg.content
        return contents

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        stage = self.defense.aggregating_stage
        if self._aggregation == "interactive":
            self._transport = FlowerTransport(grid, self._nodes, self._timeout)
            stage.connect(self._transport)
        contents = self._inner_contents(server_round, arrays, config, grid)
        if self.fraction is not None:
            assert self._server is not None, "call start() (or discover()) first"
            missing = [c for c in self._server.sample(server_round - 1) if c not in contents]
            if missing:
                raise RoundFailedError(
                    f"round {server_round - 1}: privfl sampled clients {missing}, which "
                    f"{type(self.inner).__name__} did not address; sample with the inner strategy "
                    "(fraction=None) or let it address every node"
                )
        ctx = self.begin_round(server_round, arrays, None if self.fraction is not None else contents)
        sampled = stage.ready_clients if self._aggregation == "interactive" else ctx.sampled
        if self.encrypted_aggregates:  # encrypted: the clients hold the state; send them the encrypted mean
            model_part: dict[str, Any] = {
                AGGREGATE: ConfigRecord({"ciphertext": self.encrypted_aggregates[-1]})
            }
        else:
            model_part = {STATE: arrays}
        messages = []
        for c in sampled:
            inner_part = {
                k: v for k, v in contents[c].items() if not isinstance(v, ArrayRecord)
            }  # its config
            content = RecordDict({**inner_part, **model_part, CTX: context_to_record(ctx.for_client(c))})
            messages.append(Message(content, dst_node_id=self._nodes[c], message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._server is not None and self._ctx is not None
        ctx = self._ctx
        stage = self.defense.aggregating_stage
        interactive = self._aggregation == "interactive"
        opaque = (
            self.ckks is not None or self._aggregation != "plain"
        )  # ciphertext or masked inputs, with a layout
        node_to_client = {n: c for c, n in self._nodes.items()}
        payloads: list[Payload] = [None] * len(ctx.sampled)
        losses: dict[int, float] = {}
        rejected: dict[int, str] = dict(self._transport.failed) if self._transport is not None else {}
        layouts: dict[int, UpdateSpec] = {}
        for reply in replies:
            cid = node_to_client.get(reply.metadata.src_node_id)
            if cid is None or cid not in ctx.sampled:
                log.warning(
                    "round %d: reply from unexpected node %s ignored", ctx.round, reply.metadata.src_node_id
                )
                continue
            try:
                if reply.has_error():
                    raise MalformedPayloadError(f"client error: {_short(reply.error.reason)}")
                m = reply.content.metric_records.get(METRICS)
                if m is None or record_value(m, "client_id", int, "metrics") != cid:
                    raise MalformedPayloadError("metrics missing or client_id does not match the node")
                payload = content_to_payload(reply.content, self._server.global_state, self._payload_limit())
                if opaque and not isinstance(payload, bytes):
                    raise MalformedPayloadError(
                        "a plaintext update arrived where ciphertext or a masked input was expected"
                    )
                if opaque:
                    layouts[cid] = record_to_layout(reply.content)
            except (MalformedPayloadError, PayloadTooLargeError) as e:
                rejected[cid] = str(e)
                log.warning("round %d: client %d rejected: %s", ctx.round, cid, e)
                continue
            payloads[ctx.sampled.index(cid)] = payload
            loss = m.get("train_loss")
            losses[cid] = float(loss) if isinstance(loss, (int, float)) else float("nan")
        layout = self._agree_on_layout(layouts, payloads, rejected, ctx) if layouts else None
        received = [c for c, p in zip(ctx.sampled, payloads) if p is not None]
        if len(received) < self.min_clients:
            raise RoundFailedError(
                f"round {ctx.round}: {len(received)} valid payloads, min_clients = "
                f"{self.min_clients} (rejected: {rejected or 'none'})"
            )
        if self.ckks is not None:
            assert layout is not None
            return self._aggregate_encrypted(payloads, ctx, received, rejected, losses, layout.numel)
        agg_ctx = ctx
        if len(received) < len(ctx.sampled) and not self.defense.hides_individual_updates:
            # plain payloads: aggregate the survivors with renormalised weights (crypto defenses get the
            # None markers instead: their protocols handle dropouts themselves)
            keep = [i for i, p in enumerate(payloads) if p is not None]
            total_w = sum(ctx.weights[i] for i in keep)
            agg_ctx = replace(
                ctx,
                sampled=tuple(ctx.sampled[i] for i in keep),
                weights=tuple(ctx.weights[i] / total_w for i in keep),
            )
            payloads = [payloads[i] for i in keep]
        try:
            self._server.aggregate(payloads, agg_ctx)  # the global state + the defended mean
        except InsufficientClientsError as e:
            raise RoundFailedError(f"round {ctx.round}: {e}") from e
        if interactive:
            assert self._transport is not None and stage.aggregated_clients is not None
            rejected.update({**self._transport.failed, **stage.rejected_clients})
            received = list(stage.aggregated_clients)
        state, inner_metrics = self._inner_update(server_round, ctx, received, losses)
        if self.model is not None:
            clamp_running_variances(self.model, state)
        self._server.global_state = state
        metrics = self._round_metrics(ctx, received, rejected, losses)
        for k, v in (inner_metrics or {}).items():  # what the inner strategy adds (privfl's own keys win)
            if k not in metrics:
                metrics[k] = v
        return state_to_record(state), metrics

    def _inner_update(
        self, server_round: int, ctx: RoundContext, received: list[int], losses: dict[int, float]
    ) -> tuple[Update, MetricRecord | None]:
        """The inner strategy's ``aggregate_train`` on one reply: the global state with the defended
        mean applied, weighted by the survivors' examples. Returns its model (with the dtypes sent:
        float64 arithmetic in the inner strategy does not change the model's) and its metrics."""
        assert self._server is not None
        sent = self._server.global_state
        weight_key = str(getattr(self.inner, "weighted_by_key", "num-examples"))
        arrays_key = str(getattr(self.inner, "arrayrecord_key", "arrays"))
        content = RecordDict(
            {
                arrays_key: state_to_record(sent),
                METRICS: MetricRecord(
                    {
                        weight_key: sum(self._sizes[c] for c in received),
                        "train_loss": _train_loss(ctx, received, losses),
                    }
                ),
            }
        )
        reply = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, inner_metrics = self.inner.aggregate_train(server_round, [reply])
        if arrays is None:
            raise RoundFailedError(
                f"round {ctx.round}: {type(self.inner).__name__}.aggregate_train returned no model"
            )
        state = record_to_state(arrays)
        if set(state) != set(sent):
            raise RoundFailedError(
                f"round {ctx.round}: {type(self.inner).__name__}.aggregate_train returned other "
                "entries than the global model's"
            )
        return {k: state[k].to(v.dtype) for k, v in sent.items()}, inner_metrics

    def _payload_limit(self) -> int:
        if self.max_payload_bytes is not None:
            return self.max_payload_bytes
        assert self._server is not None
        state_bytes = sum(t.numel() * t.element_size() for t in self._server.global_state.values())
        return 64 * state_bytes + (1 << 20)

    def _agree_on_layout(
        self,
        layouts: dict[int, UpdateSpec],
        payloads: list[Payload],
        rejected: dict[int, str],
        ctx: RoundContext,
    ) -> UpdateSpec:
        """Opaque payloads must share one layout: the most common one wins, the others are rejected."""
        specs = list(layouts.values())
        common = max(specs, key=specs.count)
        for cid, spec in layouts.items():
            if spec != common:
                rejected[cid] = "its update's layout differs from the other clients'"
                log.warning("round %d: client %d rejected: %s", ctx.round, cid, rejected[cid])
                payloads[ctx.sampled.index(cid)] = None
        if self._aggregation == "interactive":
            self.defense.aggregating_stage.set_layout(common)
        return common

    def _round_metrics(
        self, ctx: RoundContext, received: list[int], rejected: dict[int, str], losses: dict[int, float]
    ) -> MetricRecord:
        train_loss = _train_loss(ctx, received, losses)
        privacy = None
        if self.accountant is not None:
            report = self.accountant.epsilon()
            privacy = {"epsilon": report.epsilon, "delta": report.delta, "accountant": report.accountant}
        self.history.append(
            {
                "round": ctx.round,
                "sampled": list(ctx.sampled),
                "received": received,
                "rejected": rejected,
                "train_loss": train_loss,
                "privacy": privacy,
                "seconds": time.perf_counter() - self._t0,
            }
        )
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "train_loss": train_loss,
            "clients": len(received),
            "rejected": len(rejected),
        }
        if privacy is not None:
            metrics["epsilon"] = float(privacy["epsilon"])
        return MetricRecord(metrics)

    def _aggregate_encrypted(
        self,
        payloads: list[Payload],
        ctx: RoundContext,
        received: list[int],
        rejected: dict[int, str],
        losses: dict[int, float],
        numel: int,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Encrypted: sum the ciphertexts (payloads that fail to parse are rejected and the rest summed
        again), record the noise stages' privacy events for a release of ``numel`` values, keep the
        encrypted mean for the clients."""
        assert self.ckks is not None
        try:
            encrypted = self.ckks.aggregate(payloads, ctx.weights)
        except PrivflError:
            for i, p in enumerate(payloads):  # find the culprits: each payload alone
                if p is None:
                    continue
                try:
                    assert isinstance(p, bytes)
                    self.ckks.check_payload(p, ctx.weights[i], f"client {ctx.sampled[i]}'s payload")
                except PrivflError as e:
                    cid = ctx.sampled[i]
                    rejected[cid] = _short(str(e))
                    log.warning("round %d: client %d rejected: %s", ctx.round, cid, rejected[cid])
                    payloads[i] = None
                    received.remove(cid)
            if len(received) < self.min_clients:
                raise RoundFailedError(
                    f"round {ctx.round}: {len(received)} valid payloads, min_clients = "
                    f"{self.min_clients} (rejected: {rejected})"
                ) from None
            encrypted = self.ckks.aggregate(payloads, ctx.weights)
        survivors_ctx = with_survivors(ctx, payloads)
        stages = [
            s
            for s in reversed(getattr(self.defense, "stages", (self.defense,)))
            if hasattr(s, "record_release")
        ]
        # the clients decrypt the aggregate once it is sent: check every noise stage before that,
        # and record every one once it is to be sent (nothing revealed escapes the accountant)
        for stage in stages:
            stage.check_release(survivors_ctx, numel)
        for stage in stages:
            stage.record_release(survivors_ctx, numel)
        self.encrypted_aggregates.append(encrypted)
        return None, self._round_metrics(ctx, received, rejected, losses)

    # ---- federated evaluation: the inner strategy's (none by default; none without a plaintext model) --

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.ckks is not None:  # the server has no model to send
            return []
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.ckks is not None:
            return None
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info(
            "PrivflStrategy: defense %r (aggregation %r), fraction %s, min_clients %d, %d clients; "
            "wrapping %s",
            self.defense,
            self._aggregation if self.ckks is None else "encrypted",
            self.fraction,
            self.min_clients,
            len(self._nodes),
            type(self.inner).__name__,
        )
        self.inner.summary()
