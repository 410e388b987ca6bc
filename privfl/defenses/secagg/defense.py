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
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from privfl.defenses.base import Defense, Payload, RoundContext
from privfl.defenses.dp import ClipUpdate
from privfl.defenses.secagg.errors import InsufficientClientsError, SecAggProtocolError
from privfl.defenses.secagg.protocol import (
    DEFAULT_BLOCK_WORDS,
    AggregateResult,
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    UnmaskRequest,
)
from privfl.defenses.secagg.quantize import check_clip_range
from privfl.updates import InvalidUpdateError, Update, UpdateSpec, flatten_floating, unflatten

__all__ = ["SaturationWarning", "SecAggReport", "SecureAggregation"]


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
        wire_bytes: bytes sent per message kind, summed over all messages of the round.
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


@dataclass
class _Session:
    key: tuple
    server: SecAggServer
    clients: dict[int, SecAggClient]
    spec: UpdateSpec | None = None
    wire: dict[str, int] = field(default_factory=dict)

    def send(self, kind: str, payload: bytes) -> bytes:
        self.wire[kind] = self.wire.get(kind, 0) + len(payload)
        return payload


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

    Threat model: an honest-but-curious server and up to ``t - 1`` colluding clients learn nothing
    about the honest clients' updates beyond the weighted sum of the >= t surviving inputs (and the
    total count of saturated coordinates). The sum itself is revealed — combine with distributed DP
    noise (``GaussianMechanism(placement="distributed")`` before this stage) to protect what it shows.
    Semi-honest protocol: messages are authenticated (Ed25519 signatures with keys advertised in
    round 0, AEAD on shares) and tampering raises, but Bonawitz's consistency-check round is not
    implemented, so a malicious server could claim that a client dropped to obtain its ``s^SK``;
    clients never reveal both kinds of share of one peer, so with ``t > n/2`` this still does not
    unmask an input. Keys are fresh each round and nothing secret is kept after it (``state_dict``
    is empty). In this in-process simulation all clients' secrets live in one process — it
    demonstrates and tests the protocol; a deployment runs :class:`SecAggClient` on each client.
    """

    hides_individual_updates = True

    def __init__(self, threshold: int, clip_range: float | None = None, *, scale_bits: int | None = None,
                 drop_before_unmask: Iterable[int] = (), block_words: int = DEFAULT_BLOCK_WORDS,
                 threads: int | None = None, keep_result: bool = False) -> None:
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 2:
            raise ValueError(f"SecureAggregation: threshold must be an int >= 2, got {threshold!r} "
                             "(t = 1 would give every client every other client's secrets)")
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
        self._session: _Session | None = None

    def bind(self, before: Sequence[Defense], after: Sequence[Defense]) -> None:
        """Called by :class:`Compose`: must be the last stage; inherit R from a preceding
        :class:`ClipUpdate` unless a noise stage comes between them."""
        if after:
            raise ValueError("SecureAggregation must be the last stage of a Compose (its payload is opaque bytes)")
        if self.clip_range is not None:
            return
        clips = [i for i, d in enumerate(before) if isinstance(d, ClipUpdate)]
        if not clips:
            return
        noisy = [d for d in before[clips[-1] + 1:] if _adds_noise(d)]
        if noisy:
            raise ValueError(
                f"SecureAggregation after {type(noisy[0]).__name__}: noise can take coordinates beyond the clip "
                "norm, so give clip_range=R explicitly (coordinates beyond R are saturated and counted)")
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
            raise ValueError("SecureAggregation needs clip_range=R (or a ClipUpdate directly before it in a Compose)")
        n = len(ctx.sampled)
        if len(set(ctx.sampled)) != n:
            raise ValueError(f"SecureAggregation: sampled client ids must be distinct, got {ctx.sampled}")
        if n < self.threshold:
            raise InsufficientClientsError(f"SecureAggregation: {n} sampled clients, fewer than the threshold "
                                           f"{self.threshold}; the round cannot run")
        config = SecAggConfig.create(ctx.sampled, ctx.weights, self.threshold, self.clip_range, self.scale_bits,
                                     self.block_words)
        server = SecAggServer(config, threads=self.threads)
        clients = {c: SecAggClient(c, threads=self.threads) for c in ctx.sampled}
        s = _Session(key, server, clients)
        setup = s.send("config", config.to_bytes())
        for c in ctx.sampled:
            server.receive_advertisement(s.send("advertise", clients[c].advertise(setup).to_bytes()))
        keys: bytes = server.key_list().to_bytes()
        for c in ctx.sampled:
            server.receive_shares(s.send("share_keys", clients[c].share_keys(s.send("key_list", keys)).to_bytes()))
        for c, delivery in server.share_deliveries().items():
            clients[c].receive_shares(s.send("share_delivery", delivery.to_bytes()))
        self._session = s

    # ------------------------------------------------------------------ client: round 2

    def protect(self, update: Update, ctx: RoundContext) -> bytes:
        """The masked, quantized weighted update of client ``ctx.client_id`` as bytes."""
        if ctx.client_id is None:
            raise ValueError("SecureAggregation.protect runs on a client: pass ctx.for_client(client_id)")
        self.before_round(ctx)  # no-op when the round is already set up
        s = self._session
        assert s is not None
        client = s.clients.get(ctx.client_id)
        if client is None:
            raise ValueError(f"client {ctx.client_id} is not sampled in round {ctx.round}")
        vec, spec = _float_vector(update)
        if s.spec is None:
            s.spec = spec
        elif spec != s.spec:
            raise InvalidUpdateError(f"client {ctx.client_id}'s update does not have the layout of the others'")
        return s.send("masked_input", client.masked_input(vec).to_bytes())

    # ------------------------------------------------------------------ server: rounds 2-4

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        """Unmask the sum of the received inputs and return the weighted mean over the survivors."""
        s = self._session
        if s is None or s.key != _round_key(ctx):
            raise SecAggProtocolError("SecureAggregation.aggregate: no secure-aggregation round in progress for this "
                                      "context (run before_round and protect with the same ctx first)")
        if len(payloads) != len(ctx.sampled):
            raise ValueError(f"{len(payloads)} payloads for {len(ctx.sampled)} sampled clients")
        self._session = None  # the round ends here, whatever happens: its keys are discarded
        server = s.server
        for cid, p in zip(ctx.sampled, payloads):
            if p is None:
                continue
            if not isinstance(p, (bytes, bytearray, memoryview)):
                raise TypeError(f"payload of client {cid} is {type(p).__name__}, not the bytes SecureAggregation "
                                "produced")
            msg = MaskedInput.from_bytes(p)
            if msg.client_id != cid:
                raise SecAggProtocolError(f"the payload in client {cid}'s slot is client {msg.client_id}'s")
            server.receive_masked_input(msg)
        request = s.send("unmask_request", server.unmask_request().to_bytes())
        survivors = UnmaskRequest.from_bytes(request).survivors
        for cid in survivors:
            if cid in self.drop_before_unmask:
                continue
            server.receive_unmask_response(s.send("unmask_response", s.clients[cid].unmask(request).to_bytes()))
        result = server.finish()
        assert s.spec is not None
        mean = result.mean(dtype=torch.empty(0, dtype=s.spec.dtype).numpy().dtype)
        cfg = server.config
        self.last_result = result if self.keep_result else None
        self.last_report = SecAggReport(
            round=ctx.round, threshold=cfg.threshold, clients=tuple(ctx.sampled), survivors=result.survivors,
            dropped_before_input=tuple(c for c, p in zip(ctx.sampled, payloads) if p is None),
            dropped_before_unmask=result.dropped_before_unmask, weight_total=result.weight_total,
            clip_range=cfg.clip_range, scale_bits=cfg.scale_bits, saturated=result.saturated,
            max_dequantization_error=result.max_error, wire_bytes=dict(s.wire))
        if result.saturated:
            warnings.warn(f"SecureAggregation: {result.saturated} coordinates were beyond the clip range "
                          f"±{cfg.clip_range:g} and were saturated", SaturationWarning, stacklevel=2)
        return unflatten(torch.from_numpy(mean), s.spec)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: keys are fresh every round and no secret outlives it."""
        return {}

    def __repr__(self) -> str:
        return (f"SecureAggregation(threshold={self.threshold}, clip_range={self.clip_range}, "
                f"scale_bits={self.scale_bits})")


def _float_vector(update: Update) -> tuple[np.ndarray, UpdateSpec]:
    """Flatten an all-floating, finite update to a float32/float64 numpy vector."""
    vec, spec = flatten_floating(update, "SecureAggregation")
    return vec.detach().cpu().contiguous().numpy(), spec

