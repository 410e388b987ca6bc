"""One client's side of a secure-aggregation round (:class:`SecAggClient`), and the encoding of its
protocol state for a client that runs each step in a fresh process
(:meth:`SecAggClient.state_bytes`). The rounds are described in :mod:`~privfl.defenses.secagg.protocol`.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privfl.defenses.secagg import crypto
from privfl.defenses.secagg.crypto import U32, MaskTerm
from privfl.defenses.secagg.errors import InsufficientClientsError, SecAggIntegrityError, SecAggProtocolError
from privfl.defenses.secagg.messages import (
    MAGIC,
    MAX_WORDS,
    SECRET_BYTES,
    VERSION,
    AdvertiseKeys,
    EncryptedShare,
    KeyList,
    MaskedInput,
    Raw,
    SecAggConfig,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    _check_id,
    _commitment,
    _pair_sign,
    _parse,
    _read_owned,
    _Reader,
    _share_ad,
    _write_owned,
    _Writer,
)
from privfl.defenses.secagg.quantize import quantize_into, scale_factor
from privfl.defenses.secagg.shamir import ShamirError, Share, split_bytes

__all__ = ["CLIENT_STEPS", "SecAggClient"]

CLIENT_STEPS = ("advertise", "share_keys", "receive_shares", "unmask")
"""The server-to-client exchanges of a round, in order (:meth:`SecAggClient.handle`)."""

_Signed = TypeVar("_Signed", AdvertiseKeys, ShareKeys, UnmaskResponse)


def _as_vector(update: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(update, torch.Tensor):
        update = update.detach().cpu()
        if update.dtype not in (torch.float32, torch.float64):
            update = update.to(torch.float64)
        update = update.contiguous().numpy()
    x = np.asarray(update)
    if x.ndim != 1:
        raise ValueError(f"masked_input takes a flat vector, got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return np.ascontiguousarray(x)


class SecAggClient:
    """One client's side of one round. Call, in order: :meth:`advertise`, :meth:`share_keys`,
    :meth:`receive_shares`, :meth:`masked_input`, :meth:`unmask`. Each takes the server's message
    (object or bytes) and returns the client's reply; a call out of order raises
    :class:`SecAggProtocolError`. A client object serves one round: keys are fresh and secrets are
    deleted as soon as they are no longer needed.

    Args:
        client_id: this client's id in the round's config.
        signing_key: a long-term Ed25519 key (with ``known_signing_keys`` on the other side: a PKI);
            default a fresh key for this round.
        known_signing_keys: ``{client id: raw Ed25519 public key}`` registered out of band; when
            given, every peer's advertisement must be signed by its registered key.
        threads: worker threads for masking (default ``torch.get_num_threads()``).
    """

    def __init__(
        self,
        client_id: int,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        known_signing_keys: Mapping[int, bytes] | None = None,
        threads: int | None = None,
    ) -> None:
        self.client_id = _check_id(client_id)
        self._sign_key = signing_key if signing_key is not None else crypto.new_signing_key()
        self._known = dict(known_signing_keys) if known_signing_keys is not None else None
        self.threads = threads
        self.phase = "new"
        self.config: SecAggConfig | None = None
        self.saturated: int | None = None
        """Coordinates this client clipped to ±R (known to the client only; the server learns the total)."""
        self._revealed: dict[int, str] = {}

    def handle(self, step: str, message: Raw) -> bytes:
        """Answer the server's message for ``step`` (one of :data:`CLIENT_STEPS`) with the reply's
        bytes (``b""`` for ``"receive_shares"``, which has none): the one entry point of a client that
        receives the rounds over a network. Masking is not a step here: :meth:`masked_input` runs
        when the client has its update."""
        if step == "advertise":
            return self.advertise(message).to_bytes()
        if step == "share_keys":
            return self.share_keys(message).to_bytes()
        if step == "receive_shares":
            self.receive_shares(message)
            return b""
        if step == "unmask":
            return self.unmask(message).to_bytes()
        raise SecAggProtocolError(
            f"client {self.client_id}: unknown step {step!r} (expected one of {CLIENT_STEPS})"
        )

    # -------------------------------------------------------------- state between processes

    def state_bytes(self) -> bytes:
        """This client's whole protocol state (phase, keys, seed, held shares, revealed shares) as
        bytes, for a client that runs each step in a fresh process (e.g. a Flower ClientApp keeps it
        in the node's ``context.state``). It holds the client's secrets **in the clear**: it must
        never leave the client's machine. :meth:`from_state_bytes` restores the client."""
        w = _Writer()
        w.raw(MAGIC + bytes([VERSION, _STATE_TAG]))
        w.fmt("Q", self.client_id)
        w.blob(self.phase.encode())
        w.raw(self._sign_key.private_bytes_raw(), 32)
        for name, (encode, _) in _CLIENT_STATE.items():
            value = self.__dict__.get(name)
            if value is not None:
                w.blob(name.encode())
                w.blob(encode(value))
        return w.getvalue()

    @classmethod
    def from_state_bytes(
        cls, data: bytes | bytearray | memoryview, *, threads: int | None = None
    ) -> SecAggClient:
        """The client that :meth:`state_bytes` saved.

        Raises:
            SecAggProtocolError: ``data`` is not a saved client state (truncated, unknown field...).
        """
        r = _Reader(data)
        if r.raw(6) != MAGIC + bytes([VERSION, _STATE_TAG]):
            raise SecAggProtocolError("not a saved secure-aggregation client state")
        client_id = r.fmt("Q")[0]
        phase = r.blob().decode(errors="replace")
        if phase not in _PHASES:
            raise SecAggProtocolError(f"saved client state has unknown phase {phase!r}")
        client = cls(client_id, signing_key=Ed25519PrivateKey.from_private_bytes(r.raw(32)), threads=threads)
        client.phase = phase
        while r.pos < len(r.mv):
            name = r.blob().decode(errors="replace")
            if name not in _CLIENT_STATE:
                raise SecAggProtocolError(f"saved client state has unknown field {name!r}")
            field_reader = _Reader(r.blob())
            try:
                setattr(client, name, _CLIENT_STATE[name][1](field_reader))
            except (ShamirError, ValueError, struct.error) as err:
                raise SecAggProtocolError(f"saved client state: malformed field {name!r} ({err})") from err
            field_reader.done()
        return client

    def _expect(self, phase: str, step: str) -> None:
        if self.phase != phase:
            raise SecAggProtocolError(
                f"client {self.client_id}: {step} called in phase {self.phase!r} (expected {phase!r})"
            )

    def _signed(self, msg: _Signed) -> _Signed:
        """``msg`` with its Ed25519 signature (by this client's signing key) over its signed payload."""
        return dataclasses.replace(msg, signature=crypto.sign(self._sign_key, msg.signed_payload()))

    def _check_session(self, session_id: bytes) -> None:
        assert self.config is not None
        if session_id != self.config.session_id:
            raise SecAggProtocolError(f"client {self.client_id}: message for another session")

    def advertise(self, config: SecAggConfig | Raw) -> AdvertiseKeys:
        """Round 0: fresh X25519 key pairs; returns the signed advertisement."""
        self._expect("new", "advertise")
        config = _parse(config, SecAggConfig)
        if self.client_id not in config.clients:
            raise SecAggProtocolError(f"client {self.client_id} is not invited to this round")
        self.config = config
        self._c_sk, c_pk = crypto.new_x25519()
        self._s_sk, s_pk = crypto.new_x25519()
        self._advert = self._signed(
            AdvertiseKeys(
                config.session_id, self.client_id, c_pk, s_pk, crypto.signing_public(self._sign_key)
            )
        )
        self.phase = "advertised"
        return self._advert

    def share_keys(self, keys: KeyList | Raw) -> ShareKeys:
        """Round 1: check U1's advertisements, share ``s^SK`` and a fresh ``b`` t-of-|U1|, and encrypt
        each peer's shares to it."""
        self._expect("advertised", "share_keys")
        keys = _parse(keys, KeyList)
        cfg = self.config
        assert cfg is not None
        self._check_session(keys.session_id)
        ids = [a.client_id for a in keys.adverts]
        if len(set(ids)) != len(ids) or not set(ids) <= set(cfg.clients):
            raise SecAggProtocolError(
                f"client {self.client_id}: key list has duplicate or uninvited clients {ids}"
            )
        if len(ids) < cfg.threshold:
            raise InsufficientClientsError(
                f"only {len(ids)} clients advertised keys; threshold {cfg.threshold}"
            )
        mine = [a for a in keys.adverts if a.client_id == self.client_id]
        if len(mine) != 1 or mine[0] != self._advert:
            raise SecAggIntegrityError(
                f"client {self.client_id}: its own keys are missing or altered in the key list"
            )
        pks = [k for a in keys.adverts for k in (a.c_public, a.s_public)]
        if len(set(pks)) != len(pks):
            raise SecAggIntegrityError("advertised public keys are not all distinct")
        for a in keys.adverts:
            self._check_session(a.session_id)
            if self._known is not None and self._known.get(a.client_id) != a.sign_public:
                raise SecAggIntegrityError(f"client {a.client_id}'s signing key is not its registered key")
            crypto.verify(
                a.sign_public, a.signature, a.signed_payload(), f"advertisement of client {a.client_id}"
            )
        self._peers = {a.client_id: a for a in keys.adverts}
        u1 = sorted(self._peers)
        xs = [v + 1 for v in u1]
        seed = os.urandom(SECRET_BYTES)
        s_shares = split_bytes(self._s_sk, cfg.threshold, xs)
        b_shares = split_bytes(seed, cfg.threshold, xs)
        out = []
        for v, s_sh, b_sh in zip(u1, s_shares, b_shares):
            if v == self.client_id:
                self._own_b_share = b_sh
                continue
            w = _Writer()
            w.fmt("QQ", self.client_id, v)
            w.blob(s_sh.to_bytes())
            w.blob(b_sh.to_bytes())
            key = crypto.share_key(
                crypto.agree(self._c_sk, self._peers[v].c_public), cfg.session_id, self.client_id, v
            )
            out.append(
                EncryptedShare(
                    self.client_id,
                    v,
                    crypto.aead_encrypt(key, w.getvalue(), _share_ad(cfg.session_id, self.client_id, v)),
                )
            )
        self._seed = seed
        msg = ShareKeys(
            cfg.session_id, self.client_id, _commitment(cfg.session_id, self.client_id, seed), tuple(out)
        )
        self.phase = "shared"
        return self._signed(msg)

    def receive_shares(self, delivery: ShareDelivery | Raw) -> None:
        """End of round 1: decrypt and authenticate the shares addressed to this client (a wrong AEAD
        tag raises :class:`SecAggIntegrityError` and aborts the client), learn U2, derive the mask keys."""
        self._expect("shared", "receive_shares")
        delivery = _parse(delivery, ShareDelivery)
        cfg = self.config
        assert cfg is not None
        self._check_session(delivery.session_id)
        if delivery.recipient != self.client_id:
            raise SecAggProtocolError(f"client {self.client_id}: delivery addressed to {delivery.recipient}")
        senders = [e.sender for e in delivery.shares]
        if len(set(senders)) != len(senders) or not set(senders) <= set(self._peers) - {self.client_id}:
            raise SecAggProtocolError(
                f"client {self.client_id}: delivery has duplicate or unknown senders {senders}"
            )
        if len(senders) + 1 < cfg.threshold:
            raise InsufficientClientsError(
                f"only {len(senders) + 1} clients shared keys; threshold {cfg.threshold}"
            )
        held: dict[int, tuple[Share, Share]] = {}
        try:
            for e in delivery.shares:
                if e.recipient != self.client_id:
                    raise SecAggProtocolError(f"share from {e.sender} is addressed to {e.recipient}")
                key = crypto.share_key(
                    crypto.agree(self._c_sk, self._peers[e.sender].c_public),
                    cfg.session_id,
                    e.sender,
                    self.client_id,
                )
                plain = crypto.aead_decrypt(
                    key,
                    e.ciphertext,
                    _share_ad(cfg.session_id, e.sender, self.client_id),
                    f"shares from client {e.sender} to client {self.client_id}",
                )
                r = _Reader(plain)
                ids = r.fmt("QQ")
                s_sh, b_sh = Share.from_bytes(r.blob()), Share.from_bytes(r.blob())
                r.done()
                if (
                    ids != (e.sender, self.client_id)
                    or s_sh.x != self.client_id + 1
                    or b_sh.x != self.client_id + 1
                    or s_sh.secret_len != SECRET_BYTES
                    or b_sh.secret_len != SECRET_BYTES
                ):
                    raise SecAggIntegrityError(
                        f"shares from client {e.sender} are not for client {self.client_id}"
                    )
                held[e.sender] = (s_sh, b_sh)
        except (SecAggIntegrityError, SecAggProtocolError, ShamirError) as err:
            self._abort()
            if isinstance(err, ShamirError):
                raise SecAggIntegrityError(f"malformed share: {err}") from err
            raise
        self._held = held
        self.u2 = frozenset(senders) | {self.client_id}
        sid = cfg.session_id
        self._terms = [MaskTerm(crypto.self_mask_key(self._seed, sid, self.client_id), 1)]
        for v in sorted(self.u2 - {self.client_id}):
            shared = crypto.agree(self._s_sk, self._peers[v].s_public)
            self._terms.append(
                MaskTerm(crypto.pair_mask_key(shared, sid, self.client_id, v), _pair_sign(self.client_id, v))
            )
        del self._c_sk
        self.phase = "ready"

    def _abort(self) -> None:
        self.phase = "aborted"
        for name in ("_c_sk", "_s_sk", "_seed", "_terms", "_held", "_own_b_share"):
            self.__dict__.pop(name, None)

    def masked_input(self, update: np.ndarray | torch.Tensor) -> MaskedInput:
        """Round 2: quantize ``w_u · clip(update, ±R)`` into Z_2^32 and add the self mask and the
        pairwise masks with U2; returns the signed :class:`MaskedInput`. A client masks exactly one
        input per round (a second call raises: reusing masks would leak the difference)."""
        self._expect("ready", "masked_input")
        cfg = self.config
        assert cfg is not None
        x = _as_vector(update)
        n = x.size
        total = n + 2
        if total > MAX_WORDS:
            raise ValueError(f"update of {n} parameters exceeds the {MAX_WORDS - 2} a mask can cover")
        self.phase = "masking"
        bw = cfg.block_words
        n_blocks = -(-total // bw)
        out = np.empty(total, dtype=U32)
        saturated = [0] * n_blocks
        digests = [b""] * n_blocks
        count_blocks = {n // bw, (n + 1) // bw}
        factor = scale_factor(cfg.weight_of(self.client_id), cfg.scale_bits)
        r = cfg.clip_range
        terms = self._terms
        size = min(bw, total)

        def work(i: int, scr: tuple[np.ndarray, np.ndarray, np.ndarray, bytes]) -> None:
            a = i * bw
            b = min(a + bw, total)
            blk = out[a:b]
            end = min(b, n)
            if end > a:
                saturated[i] = quantize_into(x[a:end], blk[: end - a], factor, r, scr[0], scr[1])
            if b > n:
                blk[max(n - a, 0) :] = 0
            crypto.mask_block(blk, a, terms, scr[2], scr[3])
            if i not in count_blocks:
                digests[i] = crypto.block_digest(blk)

        def scratch() -> tuple[np.ndarray, np.ndarray, np.ndarray, bytes]:
            return (
                np.empty(size, np.float64),
                np.empty(size, np.int64),
                np.empty(size, U32),
                bytes(4 * size),
            )

        try:
            crypto.run_blocks(n_blocks, work, scratch, self.threads)
        except BaseException:
            self._abort()
            raise
        count = sum(saturated)
        out[n] = (int(out[n]) + (count & 0xFFFF)) & 0xFFFFFFFF
        out[n + 1] = (int(out[n + 1]) + (count >> 16)) & 0xFFFFFFFF
        for i in count_blocks:
            digests[i] = crypto.block_digest(out[i * bw : (i + 1) * bw])
        msg = MaskedInput(cfg.session_id, self.client_id, n, out)
        tree = crypto.tree_digest(msg.header(), digests)
        signed = MaskedInput(
            cfg.session_id, self.client_id, n, out, crypto.sign(self._sign_key, msg.signed_payload_for(tree))
        )
        self.saturated = count
        for name in ("_s_sk", "_seed", "_terms"):  # forward secrecy: the masks are never needed again
            self.__dict__.pop(name, None)
        self.phase = "masked"
        return signed

    def unmask(self, request: UnmaskRequest | Raw) -> UnmaskResponse:
        """Round 4: reveal ``b``-shares of U3 and ``s``-shares of U2 \\ U3. Refuses
        (:class:`SecAggProtocolError`, revealing nothing) a request that would reveal, together with
        any earlier one, both kinds of share of one peer, or that does not list this client."""
        self._expect("masked", "unmask")
        request = _parse(request, UnmaskRequest)
        cfg = self.config
        assert cfg is not None
        self._check_session(request.session_id)
        u3 = set(request.survivors)
        if len(u3) != len(request.survivors) or not u3 <= self.u2:
            raise SecAggProtocolError(
                f"client {self.client_id}: survivors {request.survivors} are not a subset of "
                f"the clients that shared keys {sorted(self.u2)}"
            )
        if self.client_id not in u3:
            raise SecAggProtocolError(
                f"client {self.client_id} sent its input but is not listed as a survivor"
            )
        if len(u3) < cfg.threshold:
            raise InsufficientClientsError(f"only {len(u3)} survivors; threshold {cfg.threshold}")
        dropped = self.u2 - u3
        for v in u3:
            if self._revealed.get(v) == "s":
                raise SecAggProtocolError(
                    f"client {self.client_id} refuses: it already revealed its share of client "
                    f"{v}'s s^SK, so it will not reveal its share of b_{v} too"
                )
        for v in dropped:
            if self._revealed.get(v) == "b":
                raise SecAggProtocolError(
                    f"client {self.client_id} refuses: it already revealed its share of b_{v}, "
                    f"so it will not reveal its share of client {v}'s s^SK too"
                )
        b_out, s_out = [], []
        for v in sorted(u3):
            share = self._own_b_share if v == self.client_id else self._held[v][1]
            b_out.append((v, share.to_bytes()))
            self._revealed[v] = "b"
        for v in sorted(dropped):
            s_out.append((v, self._held[v][0].to_bytes()))
            self._revealed[v] = "s"
        return self._signed(UnmaskResponse(cfg.session_id, self.client_id, tuple(b_out), tuple(s_out)))


# ------------------------------------------------------------------------------ client state encoding

_STATE_TAG = 0xC0  # never a message tag: a saved client state is not a message
_PHASES = frozenset({"new", "advertised", "shared", "ready", "masking", "masked", "aborted"})


def _encoded(write: Any) -> Any:
    """``value -> bytes`` from a ``(writer, value)`` procedure."""

    def encode(value: Any) -> bytes:
        w = _Writer()
        write(w, value)
        return w.getvalue()

    return encode


def _write_pairs(w: _Writer, pairs: Sequence[tuple[int, bytes]]) -> None:
    _write_owned(w, list(pairs))


_CLIENT_STATE: dict[str, tuple[Any, Any]] = {
    # attribute: (encode value -> bytes, decode _Reader -> value)
    "config": (lambda c: c.to_bytes(), lambda r: SecAggConfig.from_bytes(r.raw(len(r.mv)))),
    "saturated": (_encoded(lambda w, v: w.fmt("Q", v)), lambda r: r.fmt("Q")[0]),
    "_known": (_encoded(lambda w, d: _write_pairs(w, sorted(d.items()))), lambda r: dict(_read_owned(r))),
    "_revealed": (
        _encoded(lambda w, d: _write_pairs(w, [(k, v.encode()) for k, v in sorted(d.items())])),
        lambda r: {k: v.decode() for k, v in _read_owned(r)},
    ),
    "_c_sk": (bytes, lambda r: r.raw(32)),
    "_s_sk": (bytes, lambda r: r.raw(32)),
    "_seed": (bytes, lambda r: r.raw(SECRET_BYTES)),
    "_advert": (lambda a: a.to_bytes(), lambda r: AdvertiseKeys.from_bytes(r.raw(len(r.mv)))),
    "_peers": (
        _encoded(lambda w, d: _write_pairs(w, [(k, a.to_bytes()) for k, a in sorted(d.items())])),
        lambda r: {k: AdvertiseKeys.from_bytes(a) for k, a in _read_owned(r)},
    ),
    "_own_b_share": (lambda s: s.to_bytes(), lambda r: Share.from_bytes(r.raw(len(r.mv)))),
    "_held": (
        _encoded(lambda w, d: _write_pairs(w, [(k, _share_pair_bytes(p)) for k, p in sorted(d.items())])),
        lambda r: {k: _read_share_pair(v) for k, v in _read_owned(r)},
    ),
    "u2": (_encoded(lambda w, ids: w.ids(sorted(ids))), lambda r: frozenset(r.ids())),
    "_terms": (
        _encoded(lambda w, ts: _write_pairs(w, [(t.sign & 0xFF, t.key) for t in ts])),
        lambda r: [MaskTerm(k, -1 if s == 0xFF else s) for s, k in _read_owned(r)],
    ),
}


def _share_pair_bytes(pair: tuple[Share, Share]) -> bytes:
    w = _Writer()
    w.blob(pair[0].to_bytes())
    w.blob(pair[1].to_bytes())
    return w.getvalue()


def _read_share_pair(data: bytes) -> tuple[Share, Share]:
    r = _Reader(data)
    pair = (Share.from_bytes(r.blob()), Share.from_bytes(r.blob()))
    r.done()
    return pair
