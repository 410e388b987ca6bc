"""``SecureAggregation``: the Bonawitz et al. (2017) protocol as a composable :class:`Defense`.

It runs :mod:`~privfl.defenses.secagg.protocol` in-process, one :class:`SecAggClient` per sampled
client and one :class:`SecAggServer`, passing every message through its byte encoding:

* ``before_round(ctx)`` (server, before clients train): the round's config (fresh session id, the
  public weights ``ctx.weights``, threshold, clip range, scale), advertise keys and share keys
  among the sampled clients. Idempotent for the same ``(round, sampled, weights)``, so the
  re-check that :class:`~privfl.defenses.base.Compose` runs before aggregating does not restart it.
* ``protect(update, ctx)`` (client ``ctx.client_id``): the masked input, as ``bytes`` — 4 bytes per
  parameter plus :attr:`MaskedInput.OVERHEAD` (126) bytes.
* ``aggregate(payloads, ctx)`` (server): ``None`` payloads are clients that dropped before sending;
  the unmask round runs with the clients that sent, except those in :attr:`drop_before_unmask`
  (simulated dropouts after sending). Returns the weighted mean over the survivors.

The server reaches the clients through a :class:`SecAggTransport`: by default all of them live in
this process; :mod:`privfl.integrations.flower` gives the server a transport of Flower messages and
each node's instance its own :class:`SecAggClient` (:meth:`SecureAggregation.use_client`), so no
process ever holds another party's secrets.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from privfl.defenses.base import Aggregation, Defense, Payload, RoundContext, Transport, check_before_reveal
from privfl.defenses.dp import ClipUpdate
from privfl.defenses.secagg.client import CLIENT_STEPS, SecAggClient
from privfl.defenses.secagg.errors import InsufficientClientsError, SecAggIntegrityError, SecAggProtocolError
from privfl.defenses.secagg.messages import DEFAULT_BLOCK_WORDS, MaskedInput, SecAggConfig
from privfl.defenses.secagg.quantize import check_clip_range
from privfl.defenses.secagg.server import AggregateResult, SecAggServer
from privfl.errors import PayloadTooLargeError, check_payload_size
from privfl.updates import InvalidUpdateError, Update, UpdateSpec, flatten_floating, unflatten

__all__ = ["SaturationWarning", "SecAggReport", "SecAggTransport", "SecureAggregation"]

log = logging.getLogger("privfl.secagg")


class SaturationWarning(RuntimeWarning):
    """Some coordinates were beyond the clip range ±R and were saturated (the mean is biased there)."""


@dataclass(frozen=True)
class SecAggReport:
    """What the server knows after a secure-aggregation round (all of it public to the server).

    Attributes:
        round: ``ctx.round``.
        threshold: t.
        clients: the sampled clients (U1 = U2 here: all of them advertised and shared keys).
        survivors: U3, the clients whose inputs are in the mean.
        dropped_before_input: clients whose payload was ``None``; their pairwise masks were removed
            by reconstructing their ``s^SK``.
        dropped_before_unmask: survivors that did not answer the unmask request; their ``b`` was
            reconstructed from the others' shares.
        weight_total: ``W`` — the survivors' weights sum; the mean is the weighted sum divided by it.
        clip_range: R (update units).
        scale_bits: k (quantization step ``2^-k`` per weighted coordinate).
        saturated: coordinates clipped to ±R, summed over the survivors (only the total is revealed).
        max_dequantization_error: ``|U3| / (2 · 2^k · W)``, bound on the mean's error per coordinate
            w.r.t. the weighted mean of the clipped inputs (update units, before the cast to the
            update's dtype).
        wire_bytes: bytes sent per message kind, summed over all messages of the round (a message
            to every client counts once per recipient).
        rejected: ``{client: reason}`` for clients dropped because a message of theirs was invalid
            (only with a fault-tolerant :class:`SecAggTransport`; in-process, an invalid message raises).
    """

    round: int
    threshold: int
    clients: tuple[int, ...]
    survivors: tuple[int, ...]
    dropped_before_input: tuple[int, ...]
    dropped_before_unmask: tuple[int, ...]
    weight_total: float
    clip_range: float
    scale_bits: int
    saturated: int
    max_dequantization_error: float
    wire_bytes: dict[str, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)


SecAggTransport = Transport
"""How a :class:`SecureAggregation` server's messages reach the clients and their replies come
back: in one process (the default), or over a network (e.g. :mod:`privfl.integrations.flower`,
where each node runs :meth:`SecAggClient.handle <privfl.defenses.secagg.client.SecAggClient.handle>`).
It is the :class:`~privfl.defenses.base.Transport` of the ``"interactive"`` aggregation capability:
``exchange(step, {client: bytes}) -> {client: reply}`` for ``step`` one of ``CLIENT_STEPS``;
``fault_tolerant`` transports drop a client whose reply is invalid, with the reason in
:attr:`SecAggReport.rejected` and the ``privfl.secagg`` log, instead of the round raising."""


class _InProcessClients(SecAggTransport):
    """All clients' protocol state in this process: a simulation (and the tests') transport."""

    def __init__(self, ids: Sequence[int], threads: int | None) -> None:
        self.clients = {c: SecAggClient(c, threads=threads) for c in ids}

    def exchange(self, step: str, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        return {c: self.clients[c].handle(step, m) for c, m in messages.items()}


_KINDS = {
    "advertise": ("config", "advertise"),
    "share_keys": ("key_list", "share_keys"),
    "receive_shares": ("share_delivery", None),
    "unmask": ("unmask_request", "unmask_response"),
}
assert set(_KINDS) == set(CLIENT_STEPS)


@dataclass
class _Session:
    key: tuple
    server: SecAggServer
    transport: SecAggTransport
    spec: UpdateSpec | None = None
    wire: dict[str, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)

    def count(self, kind: str, payload: bytes) -> bytes:
        self.wire[kind] = self.wire.get(kind, 0) + len(payload)
        return payload

    def accept(self, client: int, receive: Callable[[bytes], Any], payload: bytes) -> None:
        """Hand a client's message to the server; with a fault-tolerant transport an invalid one
        drops the client (the server's state is unchanged by a rejected message)."""
        try:
            receive(payload)
        except (SecAggProtocolError, SecAggIntegrityError, PayloadTooLargeError) as err:
            if not self.transport.fault_tolerant:
                raise
            self.rejected[client] = f"{type(err).__name__}: {err}"
            log.warning("secure aggregation: client %d dropped: %s", client, self.rejected[client])

    def run(self, step: str, messages: Mapping[int, bytes], receive: Callable[[bytes], Any] | None) -> None:
        """One server -> clients -> server exchange."""
        request, reply = _KINDS[step]
        for m in messages.values():
            self.count(request, m)
        replies = self.transport.exchange(step, messages)
        for c in messages:
            if c in replies and reply is not None and receive is not None:
                self.accept(c, receive, self.count(reply, replies[c]))


def _round_key(ctx: RoundContext) -> tuple:
    return (ctx.round, tuple(ctx.sampled), tuple(ctx.weights))


def _adds_noise(stage: Defense) -> bool:
    """Whether a stage may add noise (a DP mechanism or a pipeline that accounts privacy)."""
    return getattr(stage, "noise", None) is not None or getattr(stage, "accountant", None) is not None


class SecureAggregation(Defense):
    """Secure aggregation with pairwise and self masks and t-of-n Shamir recovery of dropouts
    (Bonawitz et al., CCS 2017): the server learns the weighted sum of the surviving clients'
    updates and nothing else about any one of them.

    Each client clips every coordinate of its update to ``[-R, R]`` (``clip_range``, update units;
    values beyond it are saturated and counted in :attr:`last_report`), multiplies it by its public
    weight, quantizes it with step ``2^-scale_bits`` into Z_2^32 and adds ChaCha20 masks (X25519 +
    HKDF-SHA256 keys). The server adds the masked inputs modulo 2^32, removes the masks, and divides
    the integer sum by ``2^k · W``, ``W`` the survivors' weights total: the result is the weighted
    mean over the survivors (weights renormalised by the server). The unmasked integer sum is exactly
    the sum of the survivors' quantized inputs; the mean is within ``|U3| / (2·2^k·W)`` (per
    coordinate, update units) of the weighted mean of the clipped updates, then cast to the update's
    dtype. Configurations in which the clients' sum could wrap modulo 2^32 are refused
    (:class:`~privfl.defenses.secagg.errors.OverflowRiskError`); ``scale_bits=None`` takes the finest
    scale that cannot wrap for the round's weights (about ``2^31 / R`` steps per unit).

    Args:
        threshold: t (>= 2). Secrets are shared t-of-n; the round needs >= t clients at every step
            and tolerates up to ``n - t`` dropouts. Up to ``t - 1`` colluding clients learn nothing.
            Use ``t > n/2`` if the server may be malicious (see the threat model).
        clip_range: R. Inside a :class:`~privfl.defenses.base.Compose`, directly after a
            :class:`~privfl.defenses.dp.ClipUpdate` (no noise stage in between), it may be left out
            and is taken from the clip norm C (an L2 norm <= C bounds every coordinate by C). After a
            noise stage it must be given: values beyond R are saturated and counted.
        scale_bits: k, or ``None`` for the finest scale that cannot wrap.
        drop_before_unmask: ids of clients that, in this in-process simulation, send their masked
            input but then do not answer the unmask request (their input still counts).
        block_words: words per block for parallel masking and the input's tree digest.
        threads: worker threads for masking/unmasking (default ``torch.get_num_threads()``).
        keep_result: keep the last round's :class:`AggregateResult` (the integer sum) in
            :attr:`last_result` — for tests and audits; it holds one int32 vector.
        transport: how the server reaches the clients (:class:`SecAggTransport`); ``None`` runs all
            clients in this process. Over a network, the server's instance gets a transport and each
            client's instance gets its node's protocol client with :meth:`use_client`.
        max_payload_bytes: the server refuses a masked input longer than this before parsing it
            (:class:`~privfl.errors.PayloadTooLargeError`); ``None``: no limit (inputs must in any
            case all have the same length, 4 bytes per parameter + 126).

    Threat model: an honest-but-curious server and up to ``t - 1`` colluding clients learn nothing
    about the honest clients' updates beyond the weighted sum of the >= t surviving inputs (and the
    total count of saturated coordinates). The sum itself is revealed — combine with distributed DP
    noise (``GaussianMechanism(placement="distributed")`` before this stage) to protect what it shows.
    Semi-honest protocol: messages are authenticated (Ed25519 signatures with keys advertised in
    round 0, AEAD on shares) and tampering raises, but Bonawitz's consistency-check round is not
    implemented, so a malicious server could claim that a client dropped to obtain its ``s^SK``;
    clients never reveal both kinds of share of one peer, so with ``t > n/2`` this still does not
    unmask an input. Keys are fresh each round and nothing secret is kept after it (``state_dict``
    is empty). In the in-process simulation (no ``transport``) all clients' secrets live in one
    process — it demonstrates and tests the protocol; a deployment runs :class:`SecAggClient` on each
    client (:mod:`privfl.integrations.flower` does).
    """

    hides_individual_updates = True
    aggregation: Aggregation = "interactive"
    """The capability :mod:`privfl.integrations.flower` runs it by: key rounds and an unmask round
    with the clients through a :class:`~privfl.defenses.base.Transport` (:meth:`connect`), each
    client answering with :meth:`client_step` and masking with its own saved protocol state
    (:meth:`resume_client`, :meth:`client_state`)."""

    @property
    def tolerated_colluders(self) -> int:  # type: ignore[override]
        """``threshold − 1``: fewer than ``t`` colluding clients cannot unmask an individual input, so
        distributed noise in front of this stage is accounted against that many colluders."""
        return self.threshold - 1

    def __init__(
        self,
        threshold: int,
        clip_range: float | None = None,
        *,
        scale_bits: int | None = None,
        drop_before_unmask: Iterable[int] = (),
        block_words: int = DEFAULT_BLOCK_WORDS,
        threads: int | None = None,
        keep_result: bool = False,
        transport: SecAggTransport | None = None,
        max_payload_bytes: int | None = None,
    ) -> None:
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 2:
            raise ValueError(
                f"SecureAggregation: threshold must be an int >= 2, got {threshold!r} "
                "(t = 1 would give every client every other client's secrets)"
            )
        self.threshold = threshold
        self.clip_range: float | None = check_clip_range(clip_range) if clip_range is not None else None
        self.clip_source = "clip_range" if clip_range is not None else None
        if scale_bits is not None and (not isinstance(scale_bits, int) or isinstance(scale_bits, bool)):
            raise ValueError(f"scale_bits must be an int or None, got {scale_bits!r}")
        self.scale_bits = scale_bits
        self.drop_before_unmask: set[int] = set(drop_before_unmask)
        self.block_words = block_words
        self.threads = threads
        self.keep_result = keep_result
        self.last_report: SecAggReport | None = None
        self.last_result: AggregateResult | None = None
        self.transport = transport
        self.max_payload_bytes = max_payload_bytes
        self._session: _Session | None = None
        self._client: SecAggClient | None = None
        self.layout: UpdateSpec | None = None
        """Layout of the update this client instance last masked (public; sent next to the input)."""

    def bind(self, before: Sequence[Defense], after: Sequence[Defense]) -> None:
        """Called by :class:`Compose`: must be the last stage; inherit R from a preceding
        :class:`ClipUpdate` unless a noise stage comes between them."""
        if after:
            raise ValueError(
                "SecureAggregation must be the last stage of a Compose (its payload is opaque bytes)"
            )
        if self.clip_range is not None:
            return
        clips = [i for i, d in enumerate(before) if isinstance(d, ClipUpdate)]
        if not clips:
            return
        noisy = [d for d in before[clips[-1] + 1 :] if _adds_noise(d)]
        if noisy:
            raise ValueError(
                f"SecureAggregation after {type(noisy[0]).__name__}: noise can take coordinates "
                "beyond the clip "
                "norm, so give clip_range=R explicitly (coordinates beyond R are saturated and counted)"
            )
        clip = before[clips[-1]]
        assert isinstance(clip, ClipUpdate)
        self.clip_range = float(clip.max_norm)
        self.clip_source = f"inherited from {clip!r}"

    # ------------------------------------------------------------------ server: rounds 0-1

    def before_round(self, ctx: RoundContext) -> None:
        """Set up the round's keys among the sampled clients (advertise keys, share keys)."""
        key = _round_key(ctx)
        if self._session is not None and self._session.key == key:
            return
        self._session = None
        if self.clip_range is None:
            raise ValueError(
                "SecureAggregation needs clip_range=R (or a ClipUpdate directly before it in a Compose)"
            )
        n = len(ctx.sampled)
        if len(set(ctx.sampled)) != n:
            raise ValueError(f"SecureAggregation: sampled client ids must be distinct, got {ctx.sampled}")
        if n < self.threshold:
            raise InsufficientClientsError(
                f"SecureAggregation: {n} sampled clients, fewer than the threshold "
                f"{self.threshold}; the round cannot run"
            )
        config = SecAggConfig.create(
            ctx.sampled, ctx.weights, self.threshold, self.clip_range, self.scale_bits, self.block_words
        )
        server = SecAggServer(config, threads=self.threads)
        transport = (
            self.transport if self.transport is not None else _InProcessClients(ctx.sampled, self.threads)
        )
        s = _Session(key, server, transport)
        s.run("advertise", dict.fromkeys(ctx.sampled, config.to_bytes()), server.receive_advertisement)
        keys = server.key_list().to_bytes()  # closes round 0: U1
        s.run("share_keys", dict.fromkeys(sorted(server.u1), keys), server.receive_shares)
        s.run("receive_shares", {c: d.to_bytes() for c, d in server.share_deliveries().items()}, None)
        self._session = s

    @property
    def ready_clients(self) -> tuple[int, ...]:
        """U2 of the round set up by :meth:`before_round`: the clients holding each other's shares,
        the only ones that can send a masked input (empty when no round is set up)."""
        return tuple(sorted(self._session.server.u2)) if self._session is not None else ()

    # ------------------------------------------------------------------ client: round 2

    def protect(self, update: Update, ctx: RoundContext) -> bytes:
        """The masked, quantized weighted update of client ``ctx.client_id`` as bytes.

        On a remote client (a Flower node), :meth:`use_client` first gives this stage the node's
        own :class:`SecAggClient`, which has run the key rounds with the server; otherwise the
        in-process simulation sets the round up with :meth:`before_round`."""
        if ctx.client_id is None:
            raise ValueError("SecureAggregation.protect runs on a client: pass ctx.for_client(client_id)")
        if self._client is not None:
            client = self._client
            if (
                client.client_id != ctx.client_id
                or client.config is None
                or tuple(client.config.clients) != tuple(ctx.sampled)
            ):
                raise SecAggProtocolError(
                    f"client {ctx.client_id}: its secure-aggregation keys were set up for "
                    f"another round or client (round {ctx.round}, sampled {ctx.sampled})"
                )
            vec, self.layout = _float_vector(update)
            return client.masked_input(vec).to_bytes()
        self.before_round(ctx)  # no-op when the round is already set up
        s = self._session
        assert s is not None
        if not isinstance(s.transport, _InProcessClients):
            raise SecAggProtocolError(
                "this SecureAggregation is a server with a remote transport: protect runs on "
                "the clients (use_client there)"
            )
        simulated = s.transport.clients.get(ctx.client_id)
        if simulated is None:
            raise ValueError(f"client {ctx.client_id} is not sampled in round {ctx.round}")
        vec, spec = _float_vector(update)
        if s.spec is None:
            s.spec = spec
        elif spec != s.spec:
            raise InvalidUpdateError(
                f"client {ctx.client_id}'s update does not have the layout of the others'"
            )
        return simulated.masked_input(vec).to_bytes()

    def use_client(self, client: SecAggClient | None) -> None:
        """Client side over a network: the node's :class:`SecAggClient`, which ran the key rounds
        (:meth:`SecAggClient.handle <privfl.defenses.secagg.client.SecAggClient.handle>`), masks
        this node's update in :meth:`protect`. ``None`` goes back to the in-process simulation."""
        self._client = client

    # ------------------------------------------------------------------ the "interactive" capability

    def connect(self, transport: Transport) -> None:
        """Server side over a network: reach the clients through ``transport``."""
        self.transport = transport

    @property
    def rejected_clients(self) -> dict[int, str]:
        """The clients whose message the last :meth:`aggregate` dropped, with the reason."""
        return dict(self.last_report.rejected) if self.last_report is not None else {}

    def client_step(
        self, client_id: int, step: str, message: bytes, state: bytes | None
    ) -> tuple[bytes, bytes]:
        """Client side over a network: answer the server's ``message`` for ``step`` with the node's
        :class:`SecAggClient` restored from ``state`` (``"advertise"`` starts a round: fresh keys,
        whatever was left of the last one is dropped). Returns ``(reply, the new state)``."""
        client = SecAggClient(client_id) if step == "advertise" else self._restore(client_id, state)
        reply = client.handle(step, message)
        return reply, client.state_bytes()

    def resume_client(self, client_id: int, state: bytes | None) -> None:
        """Client side over a network, before :meth:`protect`: the node's saved protocol state."""
        self.use_client(self._restore(client_id, state))

    def client_state(self) -> bytes:
        """Client side over a network, after :meth:`protect`: the node's protocol state to keep."""
        if self._client is None:
            raise SecAggProtocolError("client_state: no node client in use (resume_client first)")
        return self._client.state_bytes()

    @staticmethod
    def _restore(client_id: int, state: bytes | None) -> SecAggClient:
        if state is None:
            raise SecAggProtocolError(
                f"client {client_id}: no secure-aggregation round in progress on this node"
            )
        return SecAggClient.from_state_bytes(state)

    def set_layout(self, spec: UpdateSpec) -> None:
        """Server side over a network: the layout (names, shapes, dtypes — public metadata the
        clients report) of the updates in this round's masked inputs, to unflatten the mean."""
        if self._session is None:
            raise SecAggProtocolError(
                "set_layout: no secure-aggregation round in progress (before_round first)"
            )
        self._session.spec = spec

    # ------------------------------------------------------------------ server: rounds 2-4

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        """Unmask the sum of the received inputs and return the weighted mean over the survivors."""
        s = self._session
        if s is None or s.key != _round_key(ctx):
            raise SecAggProtocolError(
                "SecureAggregation.aggregate: no secure-aggregation round in progress for this "
                "context (run before_round and protect with the same ctx first)"
            )
        if len(payloads) != len(ctx.sampled):
            raise ValueError(f"{len(payloads)} payloads for {len(ctx.sampled)} sampled clients")
        self._session = None  # the round ends here, whatever happens: its keys are discarded
        if s.spec is None:
            raise SecAggProtocolError(
                "SecureAggregation.aggregate: the updates' layout is unknown (set_layout)"
            )
        server = s.server

        def receive_input(cid: int) -> Callable[[bytes], None]:
            def receive(raw: bytes) -> None:
                check_payload_size(raw, self.max_payload_bytes, f"masked input of client {cid}")
                msg = MaskedInput.from_bytes(raw)
                if msg.client_id != cid:
                    raise SecAggProtocolError(
                        f"the payload in client {cid}'s slot is client {msg.client_id}'s"
                    )
                server.receive_masked_input(msg)

            return receive

        for cid, p in zip(ctx.sampled, payloads):
            if p is None:
                continue
            if not isinstance(p, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"payload of client {cid} is {type(p).__name__}, not the bytes SecureAggregation produced"
                )
            s.accept(cid, receive_input(cid), s.count("masked_input", bytes(p)))
        request = server.unmask_request()
        # the survivors are known and nothing is unmasked yet: a round that does not fit stops here
        check_before_reveal(ctx, request.survivors, s.spec.numel)
        simulated_drops = self.drop_before_unmask if isinstance(s.transport, _InProcessClients) else set()
        s.run(
            "unmask",
            dict.fromkeys([c for c in request.survivors if c not in simulated_drops], request.to_bytes()),
            server.receive_unmask_response,
        )
        result = server.finish()
        assert s.spec is not None
        mean = result.mean(dtype=torch.empty(0, dtype=s.spec.dtype).numpy().dtype)
        cfg = server.config
        self.aggregated_clients = result.survivors
        self.last_result = result if self.keep_result else None
        self.last_report = SecAggReport(
            round=ctx.round,
            threshold=cfg.threshold,
            clients=tuple(ctx.sampled),
            survivors=result.survivors,
            dropped_before_input=tuple(c for c in ctx.sampled if c not in result.survivors),
            dropped_before_unmask=result.dropped_before_unmask,
            weight_total=result.weight_total,
            clip_range=cfg.clip_range,
            scale_bits=cfg.scale_bits,
            saturated=result.saturated,
            max_dequantization_error=result.max_error,
            wire_bytes=dict(s.wire),
            rejected=dict(s.rejected),
        )
        if result.saturated:
            warnings.warn(
                f"SecureAggregation: {result.saturated} coordinates were beyond the clip range "
                f"±{cfg.clip_range:g} and were saturated",
                SaturationWarning,
                stacklevel=2,
            )
        return unflatten(torch.from_numpy(mean), s.spec)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: keys are fresh every round and no secret outlives it."""
        return {}

    def __repr__(self) -> str:
        return (
            f"SecureAggregation(threshold={self.threshold}, clip_range={self.clip_range}, "
            f"scale_bits={self.scale_bits})"
        )


def _float_vector(update: Update) -> tuple[np.ndarray, UpdateSpec]:
    """Flatten an all-floating, finite update to a float32/float64 numpy vector."""
    vec, spec = flatten_floating(update, "SecureAggregation")
    return vec.detach().cpu().contiguous().numpy(), spec
