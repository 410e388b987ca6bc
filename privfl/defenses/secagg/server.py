"""The server's side of a secure-aggregation round (:class:`SecAggServer`) and what it learns
(:class:`AggregateResult`). The rounds are described in :mod:`~privfl.defenses.secagg.protocol`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privfl.defenses.secagg import crypto
from privfl.defenses.secagg.crypto import U32, MaskTerm
from privfl.defenses.secagg.errors import InsufficientClientsError, SecAggIntegrityError, SecAggProtocolError
from privfl.defenses.secagg.messages import (
    _M,
    SECRET_BYTES,
    AdvertiseKeys,
    KeyList,
    MaskedInput,
    Raw,
    SecAggConfig,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    _commitment,
    _pair_sign,
    _parse,
)
from privfl.defenses.secagg.quantize import client_bound, dequantize, max_dequantization_error
from privfl.defenses.secagg.shamir import ShamirError, Share, reconstruct_bytes

__all__ = ["AggregateResult", "SecAggServer"]


@dataclass
class AggregateResult:
    """What the server learns: the integer sum of the survivors' quantized weighted inputs.

    Attributes:
        sum: int32 vector (``length`` coordinates), exactly ``Σ_{u in survivors} q_u``.
        saturated: total number of coordinates the survivors clipped to ±R (only the total is revealed).
        survivors: U3, whose inputs are in the sum.
        dropped_before_input: U2 \\ U3 — shared keys, sent no input; pairwise masks removed.
        dropped_before_unmask: U3 \\ U5 — input counted, did not answer the unmask request.
        responders: U5.
        weight_total: ``W = Σ_{u in survivors} w_u``.
        scale_bits: k.
        timings: seconds per server step of :meth:`SecAggServer.finish`.
    """

    sum: np.ndarray
    saturated: int
    survivors: tuple[int, ...]
    dropped_before_input: tuple[int, ...]
    dropped_before_unmask: tuple[int, ...]
    responders: tuple[int, ...]
    weight_total: float
    scale_bits: int
    timings: dict[str, float] = field(default_factory=dict)

    def mean(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """The weighted mean over the survivors: ``sum / (2^k · W)`` in float64, cast to ``dtype``."""
        return dequantize(self.sum, self.scale_bits, self.weight_total, dtype)

    @property
    def max_error(self) -> float:
        """Bound on the mean's dequantization error per coordinate (update units, before the cast)."""
        return max_dequantization_error(len(self.survivors), self.scale_bits, self.weight_total)


class SecAggServer:
    """The server's side of one round. Message handlers (``receive_*``) take a client's message (object
    or bytes) and raise on anything invalid without changing state; round-closing methods
    (:meth:`key_list`, :meth:`share_deliveries`, :meth:`unmask_request`, :meth:`finish`) raise
    :class:`InsufficientClientsError` when fewer than ``t`` clients remain, aborting the round.

    Memory: one ``length + 2``-word accumulator; masked inputs are added as they arrive and need not
    be kept. Mask removal regenerates one mask block at a time.
    """

    def __init__(
        self,
        config: SecAggConfig,
        *,
        known_signing_keys: Mapping[int, bytes] | None = None,
        threads: int | None = None,
    ) -> None:
        self.config = config
        self._known = dict(known_signing_keys) if known_signing_keys is not None else None
        self.threads = threads
        self.phase = "advertise"
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._share_msgs: dict[int, ShareKeys] = {}
        self._inputs: set[int] = set()
        self._responses: dict[int, tuple[dict[int, Share], dict[int, Share]]] = {}
        self.length: int | None = None
        self._acc: np.ndarray | None = None

    def _expect(self, phase: str, step: str) -> None:
        if self.phase != phase:
            raise SecAggProtocolError(f"server: {step} in phase {self.phase!r} (expected {phase!r})")

    def _check_session(self, session_id: bytes) -> None:
        if session_id != self.config.session_id:
            raise SecAggProtocolError("server: message for another session")

    def _accept(self, phase: str, step: str, msg: object, cls: type[_M]) -> _M:
        """A client message in ``phase``: parsed, of this session."""
        self._expect(phase, step)
        parsed = _parse(msg, cls)
        self._check_session(parsed.session_id)
        return parsed

    @staticmethod
    def _check_sender(client: int, allowed: Any, seen: Any, what: str) -> None:
        if client not in allowed or client in seen:
            raise SecAggProtocolError(f"server: {what} client {client}")

    def _abort(self, message: str) -> InsufficientClientsError:
        self.phase = "aborted"
        self._acc = None
        self._responses.clear()
        return InsufficientClientsError(message + ": round aborted, nothing reconstructed, no sum released")

    # round 0
    def receive_advertisement(self, msg: AdvertiseKeys | Raw) -> None:
        """Round 0: accept one invited client's signed key advertisement (once per client)."""
        msg = self._accept("advertise", "receive_advertisement", msg, AdvertiseKeys)
        cid = msg.client_id
        self._check_sender(
            cid, self.config.clients, self._adverts, "advertisement from uninvited or repeated"
        )
        if self._known is not None and self._known.get(cid) != msg.sign_public:
            raise SecAggIntegrityError(f"client {cid}'s signing key is not its registered key")
        crypto.verify(msg.sign_public, msg.signature, msg.signed_payload(), f"advertisement of client {cid}")
        self._adverts[cid] = msg

    def key_list(self) -> KeyList:
        """Close round 0 (U1 = clients that advertised)."""
        self._expect("advertise", "key_list")
        if len(self._adverts) < self.config.threshold:
            raise self._abort(
                f"only {len(self._adverts)} clients advertised keys, threshold {self.config.threshold}"
            )
        self.u1 = frozenset(self._adverts)
        self.phase = "share"
        return KeyList(self.config.session_id, tuple(self._adverts[c] for c in sorted(self.u1)))

    # round 1
    def receive_shares(self, msg: ShareKeys | Raw) -> None:
        """Round 1: accept one client of U1's signed, encrypted shares (one for every other client of U1)."""
        msg = self._accept("share", "receive_shares", msg, ShareKeys)
        u = msg.sender
        self._check_sender(u, self.u1, self._share_msgs, "shares from unknown or repeated")
        crypto.verify(
            self._adverts[u].sign_public, msg.signature, msg.signed_payload(), f"shares of client {u}"
        )
        recipients = [e.recipient for e in msg.shares]
        if any(e.sender != u for e in msg.shares) or sorted(recipients) != sorted(self.u1 - {u}):
            raise SecAggProtocolError(f"server: client {u} must send one share to each other client of U1")
        self._share_msgs[u] = msg

    def share_deliveries(self) -> dict[int, ShareDelivery]:
        """Close round 1 (U2 = clients that sent shares): the ciphertexts for each client of U2."""
        self._expect("share", "share_deliveries")
        if len(self._share_msgs) < self.config.threshold:
            raise self._abort(
                f"only {len(self._share_msgs)} clients shared keys, threshold {self.config.threshold}"
            )
        self.u2 = frozenset(self._share_msgs)
        self.phase = "mask"
        return {
            v: ShareDelivery(
                self.config.session_id,
                v,
                tuple(
                    e for u in sorted(self.u2 - {v}) for e in self._share_msgs[u].shares if e.recipient == v
                ),
            )
            for v in sorted(self.u2)
        }

    # round 2
    def receive_masked_input(self, msg: MaskedInput | Raw) -> None:
        """Verify a masked input's signature and add it into the running sum (rolled back if invalid)."""
        msg = self._accept("mask", "receive_masked_input", msg, MaskedInput)
        u = msg.client_id
        self._check_sender(u, self.u2, self._inputs, "masked input from unknown or repeated")
        if self.length is not None and msg.length != self.length:
            raise SecAggProtocolError(
                f"server: client {u} sent {msg.length} parameters, others {self.length}"
            )
        data = msg.data
        if data.size != msg.length + 2:
            raise SecAggProtocolError(f"server: masked input of client {u} has {data.size} words")
        acc = self._acc if self._acc is not None else np.zeros(msg.length + 2, dtype=U32)
        bw = self.config.block_words
        n_blocks = -(-data.size // bw)
        digests = [b""] * n_blocks

        def add(i: int, _: None) -> None:
            a = i * bw
            blk = data[a : a + bw]
            np.add(acc[a : a + bw], blk, out=acc[a : a + bw])
            digests[i] = crypto.block_digest(blk)

        crypto.run_blocks(n_blocks, add, lambda: None, self.threads)
        try:
            crypto.verify(
                self._adverts[u].sign_public,
                msg.signature,
                msg.signed_payload_for(crypto.tree_digest(msg.header(), digests)),
                f"masked input of client {u}",
            )
        except SecAggIntegrityError:

            def undo(i: int, _: None) -> None:
                a = i * bw
                np.subtract(acc[a : a + bw], data[a : a + bw], out=acc[a : a + bw])

            crypto.run_blocks(n_blocks, undo, lambda: None, self.threads)
            raise
        self._acc = acc
        self.length = msg.length
        self._inputs.add(u)

    def unmask_request(self) -> UnmaskRequest:
        """Close round 2 (U3 = clients whose input arrived). Fewer than t: abort before asking anyone
        for a share."""
        self._expect("mask", "unmask_request")
        if len(self._inputs) < self.config.threshold:
            raise self._abort(
                f"only {len(self._inputs)} of {len(self.u2)} clients sent masked inputs, "
                f"threshold {self.config.threshold}"
            )
        self.u3 = frozenset(self._inputs)
        self.phase = "unmask"
        return UnmaskRequest(self.config.session_id, tuple(sorted(self.u3)))

    # round 4
    def receive_unmask_response(self, msg: UnmaskResponse | Raw) -> None:
        """Round 4: accept one survivor's signed shares (b of U3, s^SK of U2 \\ U3)."""
        msg = self._accept("unmask", "receive_unmask_response", msg, UnmaskResponse)
        u = msg.client_id
        self._check_sender(u, self.u3, self._responses, "unmask response from unknown or repeated")
        crypto.verify(
            self._adverts[u].sign_public,
            msg.signature,
            msg.signed_payload(),
            f"unmask response of client {u}",
        )
        b_owners = [o for o, _ in msg.b_shares]
        s_owners = [o for o, _ in msg.s_shares]
        if sorted(b_owners) != sorted(self.u3) or sorted(s_owners) != sorted(self.u2 - self.u3):
            raise SecAggProtocolError(f"server: client {u} answered for the wrong clients")
        try:
            b = {o: Share.from_bytes(s) for o, s in msg.b_shares}
            s = {o: Share.from_bytes(sh) for o, sh in msg.s_shares}
        except ShamirError as err:
            raise SecAggIntegrityError(f"malformed share from client {u}: {err}") from err
        if any(sh.x != u + 1 or sh.secret_len != SECRET_BYTES for sh in [*b.values(), *s.values()]):
            raise SecAggIntegrityError(f"client {u} sent shares that are not its own")
        self._responses[u] = (b, s)

    def finish(self) -> AggregateResult:
        """Close round 4 (U5 = responders): reconstruct, remove masks, range-check, return the sum."""
        self._expect("unmask", "finish")
        cfg = self.config
        t = cfg.threshold
        if len(self._responses) < t:
            raise self._abort(
                f"only {len(self._responses)} clients answered the unmask request, threshold {t}"
            )
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        responders = sorted(self._responses)
        dropped = sorted(self.u2 - self.u3)
        survivors = sorted(self.u3)
        sid = cfg.session_id

        def rebuild(owner: int, kind: int) -> bytes:
            try:
                return reconstruct_bytes([self._responses[r][kind][owner] for r in responders], t)
            except ShamirError as err:
                raise SecAggIntegrityError(
                    f"shares of client {owner}'s {'b' if kind == 0 else 's^SK'} are inconsistent: {err}"
                ) from err

        self_terms = []
        for v in survivors:
            seed = rebuild(v, 0)
            if _commitment(sid, v, seed) != self._share_msgs[v].b_commitment:
                raise SecAggIntegrityError(f"reconstructed b_{v} does not match client {v}'s commitment")
            self_terms.append(MaskTerm(crypto.self_mask_key(seed, sid, v), -1))
        pair_terms = []
        for v in dropped:
            s_sk = rebuild(v, 1)
            if crypto.public_x25519(s_sk) != self._adverts[v].s_public:
                raise SecAggIntegrityError(f"reconstructed s^SK of client {v} does not match its public key")
            for u in survivors:
                key = crypto.pair_mask_key(crypto.agree(s_sk, self._adverts[u].s_public), sid, u, v)
                pair_terms.append(MaskTerm(key, -_pair_sign(u, v)))
        timings["reconstruct_s"] = time.perf_counter() - t0
        acc = self._acc
        assert acc is not None and self.length is not None
        t0 = time.perf_counter()
        crypto.add_masks(acc, self_terms, block_words=cfg.block_words, threads=self.threads)
        timings["self_masks_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        crypto.add_masks(acc, pair_terms, block_words=cfg.block_words, threads=self.threads)
        timings["dropout_recovery_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = self.length
        int_sum = acc[:n].view(np.dtype("<i4"))
        bound = sum(client_bound(cfg.weight_of(u), cfg.clip_range, cfg.scale_bits) for u in survivors)
        self._range_check(int_sum, bound)
        saturated = int(acc[n]) + (int(acc[n + 1]) << 16)
        timings["range_check_s"] = time.perf_counter() - t0
        self.phase = "done"
        self._acc = None
        self._responses.clear()
        return AggregateResult(
            sum=int_sum,
            saturated=saturated,
            survivors=tuple(survivors),
            dropped_before_input=tuple(dropped),
            dropped_before_unmask=tuple(sorted(self.u3 - set(responders))),
            responders=tuple(responders),
            weight_total=math.fsum(cfg.weight_of(u) for u in survivors),
            scale_bits=cfg.scale_bits,
            timings=timings,
        )

    def _range_check(self, int_sum: np.ndarray, bound: int) -> None:
        bw = self.config.block_words
        n_blocks = -(-int_sum.size // bw)
        bad = [False] * n_blocks

        def check(i: int, _: None) -> None:
            blk = int_sum[i * bw : (i + 1) * bw]
            bad[i] = int(blk.min()) < -bound or int(blk.max()) > bound

        crypto.run_blocks(n_blocks, check, lambda: None, self.threads)
        if any(bad):
            self.phase = "aborted"
            raise SecAggIntegrityError(
                f"unmasked sum leaves the range ±{bound} that the survivors' inputs allow: "
                "an input or a mask was corrupted"
            )
