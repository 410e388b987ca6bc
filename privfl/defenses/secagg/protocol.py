"""Secure aggregation (Bonawitz et al., CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), semi-honest protocol with authenticated messages.

Explicit message rounds between a :class:`SecAggServer` and :class:`SecAggClient` objects; every
message is a dataclass with ``to_bytes()`` / ``from_bytes()``, so the same code runs in one process
(:class:`~privfl.defenses.secagg.defense.SecureAggregation`) or over a network (send the bytes).

Rounds (U1 ⊇ U2 ⊇ U3 ⊇ U5 are the clients still present at each step, ``t`` the threshold):

0. **Setup / advertise keys.** The server sends :class:`SecAggConfig` (session id, clients, public
   weights, threshold, clip range, scale). Each client ``u`` makes two fresh X25519 key pairs
   ``(c_u, s_u)`` and an Ed25519 signing key, and sends :class:`AdvertiseKeys` (signed). The
   server needs >= t of them (U1) and broadcasts them as a :class:`KeyList`.
1. **Share keys.** Client ``u`` draws a 32-byte self-mask seed ``b_u``, splits ``b_u`` and
   ``s_u^SK`` t-of-|U1| with Shamir (:mod:`~privfl.defenses.secagg.shamir`, x = id + 1), and
   encrypts ``v``'s two shares with ChaCha20-Poly1305 under ``HKDF(X25519(c_u^SK, c_v^PK))``
   (:class:`ShareKeys`, signed, with a hash commitment to ``b_u``). The server needs >= t (U2) and
   forwards to each ``v`` the ciphertexts addressed to it (:class:`ShareDelivery`); ``v`` checks
   every AEAD tag at once.
2. **Masked input.** Client ``u`` quantizes its weighted update into Z_2^32
   (:mod:`~privfl.defenses.secagg.quantize`) and adds the self mask ``PRG(b_u)`` and, for every
   ``v`` in U2 \\ {u}, the pairwise mask ``±PRG(s_{u,v})`` with ``s_{u,v} = HKDF(X25519(s_u^SK,
   s_v^PK))``: ``+`` if ``u > v``, ``-`` if ``u < v``, so pairs cancel in the sum. PRG = ChaCha20
   keystream (:mod:`~privfl.defenses.secagg.crypto`). It sends :class:`MaskedInput`, signed over a
   per-block SHA-256 tree digest. The server adds each input into a running sum as it arrives
   (one vector of memory, whatever the number of clients) and needs >= t of them (U3).
3. (Consistency check of the active protocol — **not implemented**, see the threat model.)
4. **Unmask.** The server sends :class:`UnmaskRequest` (the list U3). Client ``u`` answers with
   the ``b``-shares of U3 and the ``s``-shares of the dropped U2 \\ U3 (:class:`UnmaskResponse`),
   and never reveals both kinds of share for one peer, over all requests of the round. With >= t
   answers (U5) the server reconstructs ``b_v`` (v in U3, checked against the commitment) and
   ``s_v^SK`` (v dropped, checked against ``s_v^PK``), subtracts the self masks of U3 and the
   dropped clients' pairwise masks with U3, checks that every coordinate is in the range the
   configuration allows, and returns the integer sum of U3's quantized inputs (:class:`AggregateResult`).

Dropouts: a client that leaves after sharing keys but before sending its input (U2 \\ U3) is not in
the sum; its pairwise masks are removed through its reconstructed ``s^SK``. A client that leaves
after sending its input but before unmasking (U3 \\ U5) is in the sum; its ``b`` is reconstructed from
the others' shares. Fewer than t clients at any step raises :class:`InsufficientClientsError`:
nothing is reconstructed and no partial sum is returned.

Authentication. Every client-to-server message after the setup is signed with the client's Ed25519
key advertised in round 0; share ciphertexts are authenticated by AEAD under keys only the two
clients know; reconstructed secrets are checked against the public key / commitment sent earlier;
and the unmasked sum is range-checked. Tampering with a share, a masked input or an unmask response
raises :class:`SecAggIntegrityError`. The round-0 signing key is only as trustworthy as the channel it
arrived on, unless ``known_signing_keys`` (a PKI: long-term keys registered out of band) is given.

Threat model
------------
* Honest-but-curious server, and up to ``t - 1`` clients colluding with it (or each other): they
  learn nothing about the honest clients' inputs beyond the sum of the >= t inputs in U3 (for
  ``t - 1`` clients, Shamir shares are perfectly hiding; masks are ChaCha20 keystreams under keys
  from X25519 + HKDF, computationally hiding).
* The sum itself is revealed: combine with differential privacy (distributed noise) to protect
  individuals from what the sum shows. The quantization error is stated in
  :mod:`~privfl.defenses.secagg.quantize`.
* Semi-honest only. The consistency-check round (round 3 of Bonawitz's active protocol) is not
  implemented and the server is not prevented from creating Sybil clients. A malicious server may
  claim that a client dropped: it then obtains that client's ``s^SK`` shares; if the client's input
  also arrived, the server still cannot unmask it unless it also gets ``t`` shares of that client's
  ``b``. Each honest client reveals at most one kind of share per peer (enforced), so with
  ``t > n/2`` the server cannot collect ``t`` of both kinds from honest clients; with ``t <= n/2``
  it can (by telling two disjoint groups different stories) — use ``t > n/2`` where the server might
  be malicious. Dropouts of honest clients are not authenticated beyond this.
* Fresh keys every round (forward secrecy): client secrets are deleted after use, and nothing
  secret survives the round in any object's state.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias, TypeVar

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privfl.defenses.secagg import crypto
from privfl.defenses.secagg.crypto import U32, MaskTerm
from privfl.defenses.secagg.errors import (
    InsufficientClientsError,
    SecAggIntegrityError,
    SecAggProtocolError,
)
from privfl.defenses.secagg.quantize import (
    check_clip_range,
    check_no_wrap,
    check_weights,
    choose_scale_bits,
    client_bound,
    dequantize,
    max_dequantization_error,
    quantize_into,
    scale_factor,
)
from privfl.defenses.secagg.shamir import ShamirError, Share, reconstruct_bytes, split_bytes

__all__ = [
    "CLIENT_STEPS",
    "DEFAULT_BLOCK_WORDS",
    "AdvertiseKeys",
    "AggregateResult",
    "EncryptedShare",
    "KeyList",
    "MaskedInput",
    "Message",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "ShareDelivery",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
]

DEFAULT_BLOCK_WORDS = 1 << 18
"""Words per block (1 MiB): the unit of parallel masking and of the masked input's tree digest."""
MAX_CLIENTS = 4096  # the two saturation-count words cannot overflow below this
MAX_WORDS = 1 << 36  # ChaCha20's 32-bit block counter
MAGIC = b"PFSA"
VERSION = 1
SECRET_BYTES = 32
_SIG = b"privfl/secagg/v1/sig"
_SHARE_AD = b"privfl/secagg/v1/share"
_COMMIT = b"privfl/secagg/v1/commit-b"
_U64 = (1 << 64) - 1
Raw: TypeAlias = bytes | bytearray | memoryview
"""A message's wire encoding."""
CLIENT_STEPS = ("advertise", "share_keys", "receive_shares", "unmask")
"""The server-to-client exchanges of a round, in order (:meth:`SecAggClient.handle`)."""


# ------------------------------------------------------------------------------ wire encoding

class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def raw(self, b: bytes, size: int | None = None) -> None:
        if size is not None and len(b) != size:
            raise SecAggProtocolError(f"field must be {size} bytes, got {len(b)}")
        self.parts.append(bytes(b))

    def fmt(self, f: str, *v: Any) -> None:
        self.parts.append(struct.pack("<" + f, *v))

    def blob(self, b: bytes) -> None:
        self.fmt("I", len(b))
        self.parts.append(bytes(b))

    def ids(self, ids: Sequence[int]) -> None:
        self.fmt("I", len(ids))
        self.fmt(f"{len(ids)}Q", *ids)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        self.mv = mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.mv):
            raise SecAggProtocolError(f"truncated message: need {n} bytes at offset {self.pos}, have "
                                      f"{len(self.mv) - self.pos}")
        out = self.mv[self.pos:self.pos + n]
        self.pos += n
        return out

    def raw(self, n: int) -> bytes:
        return bytes(self.take(n))

    def fmt(self, f: str) -> tuple:
        f = "<" + f
        return struct.unpack(f, self.take(struct.calcsize(f)))

    def blob(self) -> bytes:
        (n,) = self.fmt("I")
        return self.raw(n)

    def ids(self) -> tuple[int, ...]:
        (n,) = self.fmt("I")
        if 8 * n > len(self.mv) - self.pos:
            raise SecAggProtocolError("truncated message: id list")
        return self.fmt(f"{n}Q")

    def done(self) -> None:
        if self.pos != len(self.mv):
            raise SecAggProtocolError(f"{len(self.mv) - self.pos} trailing bytes after the message")


_REGISTRY: dict[int, type[Message]] = {}


class Message:
    """Base of all protocol messages: ``MAGIC ‖ version ‖ tag ‖ fields [‖ signature]``."""

    TAG: ClassVar[int]
    SIGNED: ClassVar[bool] = False
    session_id: bytes  # every message names its round (a dataclass field of each subclass)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "TAG" in cls.__dict__:
            _REGISTRY[cls.TAG] = cls

    def _write_fields(self, w: _Writer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _read_fields(cls, r: _Reader) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The message's wire encoding (``MAGIC ‖ version ‖ tag ‖ fields [‖ signature]``)."""
        w = _Writer()
        w.raw(MAGIC + bytes([VERSION, self.TAG]))
        self._write_fields(w)
        if self.SIGNED:
            w.raw(self.signature, 64)  # type: ignore[attr-defined]
        return w.getvalue()

    def signed_payload(self) -> bytes:
        """The bytes a signed message's Ed25519 signature covers (domain, tag, all other fields)."""
        w = _Writer()
        self._write_fields(w)
        return _SIG + bytes([self.TAG]) + w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Any:
        r = _Reader(data)
        head = r.raw(6)
        if head[:4] != MAGIC or head[4] != VERSION:
            raise SecAggProtocolError("not a privfl secure-aggregation message (bad magic or version)")
        if head[5] != cls.TAG:
            raise SecAggProtocolError(f"expected a {cls.__name__} message, got tag {head[5]}")
        fields = cls._read_fields(r)
        if cls.SIGNED:
            fields["signature"] = r.raw(64)
        r.done()
        return cls(**fields)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse any protocol message from its bytes."""
    head = bytes(memoryview(data)[:6])
    if len(head) < 6 or head[:4] != MAGIC:
        raise SecAggProtocolError("not a privfl secure-aggregation message")
    cls = _REGISTRY.get(head[5])
    if cls is None:
        raise SecAggProtocolError(f"unknown message tag {head[5]}")
    return cls.from_bytes(data)


def _check_id(cid: int, what: str = "client id") -> int:
    if not isinstance(cid, (int, np.integer)) or isinstance(cid, bool) or not 0 <= int(cid) < _U64:
        raise SecAggProtocolError(f"{what} must be an int in [0, 2^64 - 1), got {cid!r}")
    return int(cid)


# ------------------------------------------------------------------------------ messages

@dataclass(frozen=True)
class SecAggConfig(Message):
    """Round setup, server -> clients (round 0): everything public about the round.

    Attributes:
        session_id: 32 random bytes naming the round; salts every key derivation.
        threshold: t — secrets are shared t-of-n; >= t clients must remain at every step.
        clients: ids of the clients invited to the round (distinct, < 2^64 - 1).
        weights: public aggregation weight of each client (same order); each client multiplies its
            update by its weight before quantization, so the unmasked sum is the weighted sum.
        clip_range: R — each coordinate is clipped to [-R, R] (update units).
        scale_bits: k — quantization step 2^-k update units (per weighted coordinate).
        block_words: words per block for parallel masking and the masked input's tree digest.
    """

    TAG: ClassVar[int] = 1
    session_id: bytes
    threshold: int
    clients: tuple[int, ...]
    weights: tuple[float, ...]
    clip_range: float
    scale_bits: int
    block_words: int = DEFAULT_BLOCK_WORDS

    def __post_init__(self) -> None:
        if len(self.session_id) != 32:
            raise SecAggProtocolError(f"session_id must be 32 bytes, got {len(self.session_id)}")
        clients = tuple(_check_id(c) for c in self.clients)
        object.__setattr__(self, "clients", clients)
        if len(set(clients)) != len(clients):
            raise SecAggProtocolError(f"client ids must be distinct, got {clients}")
        if not 1 <= len(clients) <= MAX_CLIENTS:
            raise SecAggProtocolError(f"need 1..{MAX_CLIENTS} clients, got {len(clients)}")
        if len(self.weights) != len(clients):
            raise SecAggProtocolError(f"{len(clients)} clients but {len(self.weights)} weights")
        object.__setattr__(self, "weights", check_weights(self.weights))
        if not isinstance(self.threshold, (int, np.integer)) or not 1 <= int(self.threshold) <= len(clients):
            raise SecAggProtocolError(f"threshold must be in [1, {len(clients)}], got {self.threshold!r}")
        object.__setattr__(self, "threshold", int(self.threshold))
        object.__setattr__(self, "clip_range", check_clip_range(self.clip_range))
        if not isinstance(self.block_words, (int, np.integer)) or self.block_words < 16 or self.block_words % 16:
            raise SecAggProtocolError(f"block_words must be a positive multiple of 16, got {self.block_words!r}")
        object.__setattr__(self, "block_words", int(self.block_words))
        check_no_wrap(self.weights, self.clip_range, self.scale_bits)
        object.__setattr__(self, "scale_bits", int(self.scale_bits))

    @classmethod
    def create(cls, clients: Sequence[int], weights: Sequence[float], threshold: int, clip_range: float,
               scale_bits: int | None = None, block_words: int = DEFAULT_BLOCK_WORDS) -> SecAggConfig:
        """A config with a fresh random session id; ``scale_bits=None`` takes the finest scale that
        cannot wrap (:func:`~privfl.defenses.secagg.quantize.choose_scale_bits`)."""
        if scale_bits is None:
            scale_bits = choose_scale_bits(weights, clip_range)
        return cls(os.urandom(32), threshold, tuple(clients), tuple(weights), clip_range, scale_bits, block_words)

    def weight_of(self, client_id: int) -> float:
        """The public aggregation weight of ``client_id`` in this round."""
        return self.weights[self.clients.index(client_id)]

    def _write_fields(self, w: _Writer) -> None:
        w.raw(self.session_id, 32)
        w.fmt("I", self.threshold)
        w.ids(self.clients)
        w.fmt(f"{len(self.weights)}d", *self.weights)
        w.fmt("dhI", self.clip_range, self.scale_bits, self.block_words)

    @classmethod
    def _read_fields(cls, r: _Reader) -> dict[str, Any]:
        session = r.raw(32)
        (threshold,) = r.fmt("I")
        clients = r.ids()
        weights = r.fmt(f"{len(clients)}d")
        clip_range, scale_bits, block_words = r.fmt("dhI")
        return dict(session_id=session, threshold=threshold, clients=clients, weights=weights,
                    clip_range=clip_range, scale_bits=scale_bits, block_words=block_words)


@dataclass(frozen=True)
class AdvertiseKeys(Message):
    """Round 0, client -> server: the client's two X25519 public keys (``c``: share encryption,
    ``s``: pairwise masks) and its Ed25519 verification key, self-signed."""

    TAG: ClassVar[int] = 2
    SIGNED: ClassVar[bool] = True
    session_id: bytes
    client_id: int
    c_public: bytes
    s_public: bytes
    sign_public: bytes
    signature: bytes = b""

    def _write_fields(self, w: _Writer) -> None:
        w.raw(self.session_id, 32)
        w.fmt("Q", self.client_id)
        w.raw(self.c_public, 32)
        w.raw(self.s_public, 32)
        w.raw(self.sign_public, 32)

    @classmethod
    def _read_fields(cls, r: _Reader) -> dict[str, Any]:
        return dict(session_id=r.raw(32), client_id=r.fmt("Q")[0], c_public=r.raw(32), s_public=r.raw(32),
                    sign_public=r.raw(32))


@dataclass(frozen=True)
class KeyList(Message):
    """Round 0, server -> clients: the advertisements of U1 (with their signatures)."""

    TAG: ClassVar[int] = 3
    session_id: bytes
    adverts: tuple[AdvertiseKeys, ...]

    def _write_fields(self, w: _Writer) -> None:
        w.raw(self.session_id, 32)
        w.fmt("I", len(self.adverts))
        for a in self.adverts:
            a._write_fields(w)
            w.raw(a.signature, 64)

    @classmethod
    def _read_fields(cls, r: _Reader) -> dict[str, Any]:
        session = r.raw(32)
        (n,) = r.fmt("I")
        adverts = []
        for _ in range(n):
            fields = AdvertiseKeys._read_fields(r)
            adverts.append(AdvertiseKeys(**fields, signature=r.raw(64)))
        return dict(session_id=session, adverts=tuple(adverts))


@dataclass(frozen=True)
class EncryptedShare:
    """``sender``'s shares of ``s_sender^SK`` and ``b_sender`` for ``recipient``, AEAD-encrypted."""

    sender: int
    recipient: int
    ciphertext: bytes

    def _write(self, w: _Writer) -> None:
        w.fmt("QQ", self.sender, self.recipient)
        w.blob(self.ciphertext)

    @classmethod
    def _read(cls, r: _Reader) -> EncryptedShare:
        sender, recipient = r.fmt("QQ")
        return cls(sender, recipient, r.blob())


def _write_shares(w: _Writer, shares: Sequence[EncryptedShare]) -> None:
    w.fmt("I", len(shares))
    for s in shares:
        s._write(w)


def _read_shares(r: _Reader) -> tuple[EncryptedShare, ...]:
    (n,) = r.fmt("I")
    return tuple(EncryptedShare._read(r) for _ in range(n))


@dataclass(frozen=True)
class ShareKeys(Message):
    """Round 1, client -> server: encrypted shares for every other client of U1, and a commitment
    ``SHA-256(domain ‖ session ‖ id ‖ b_u)`` to the self-mask seed; signed."""

    TAG: ClassVar[int] = 4
    SIGNED: ClassVar[bool] = True
    session_id: bytes
    sender: int
    b_commitment: bytes
    shares: tuple[EncryptedShare, ...]
    signature: bytes = b""

    def _write_fields(self, w: _Writer) -> None:
        w.raw(self.session_id, 32)
        w.fmt("Q", self.sender)
        w.raw(self.b_commitment, 32)
        _write_shares(w, self.shares)

    @classmethod
    def _read_fields(cls, r: _Reader) -> dict[str, Any]:
        return dict(session_id=r.raw(32), sender=r.fmt("Q")[0], b_commitment=r.raw(32), shares=_read_shares(r))


@dataclass(frozen=True)
class ShareDelivery(Message):
    """Round 1, server -> client ``recipient``: the ciphertexts addressed to it; their senders and
    the recipient form U2."""

    TAG: ClassVar[int] = 5
    session_id: bytes
    recipient: int
    shares: tuple[EncryptedShare, ...]

    def _write_fields(self, w: _Writer) -> None:
        w.raw(self.session_id, 32)
        w.fmt("Q", self.recipient)
        _write_shares(w, self.shares)

    @classmethod
    def _read_fields(cls, r: _Reader) -> dict[str, Any]:
        return dict(session_id=r.raw(32), recipient=r.fmt("Q")[0], shares=_read_shares(r))


@dataclass(frozen=True, eq=False)
class MaskedInput(Message):
    """Round 2, client -> server: the masked quantized update, ``length + 2`` little-endian uint32
    words (``length`` parameters, then the client's saturated-coordinate count as two masked words,
    low 16 bits and the rest), signed over a tree digest of its blocks.

    On the wire: 6-byte header, 32-byte session id, client id (u64), length (u64), the words
    (4 bytes each), the 64-byte signature — 4 bytes per parameter plus 126 bytes.
    """

    TAG: ClassVar[int] = 6
    SIGNED: ClassVar[bool] = True
    OVERHEAD: ClassVar[int] = 6 + 32 + 8 + 8 + 4 * 2 + 64
    session_id: bytes
    client_id: int
    length: int
    data: np.ndarray
    signature: bytes = b""

    def header(self) -> bytes:
        """What the tree digest binds besides the blocks: session, client id, length."""
        return self.session_id + struct.pack("<QQ", self.client_id, self.length)

    def to_bytes(self) -> bytes:
        """The wire encoding: header, the ``length + 2`` little-endian words, the signature."""
        data = np.ascontiguousarray(self.data, dtype=U32)
        if data.size != self.length + 2:
            raise SecAggProtocolError(f"masked input has {data.size} words for length {self.length}")
        if len(self.signature) != 64:
            raise SecAggProtocolError("masked input is not signed")
        return b"".join([MAGIC, bytes([VERSION, self.TAG]), self.header(), data.data.cast("B"),
                         self.signature])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> MaskedInput:
        """Parse without copying the words (``data`` is a read-only view of the buffer)."""
        r = _Reader(data)
        head = r.raw(6)
        if head[:4] != MAGIC or head[4] != VERSION or head[5] != cls.TAG:
            raise SecAggProtocolError("not a privfl MaskedInput message")
        session = r.raw(32)
        client_id, length = r.fmt("QQ")
        if length + 2 > MAX_WORDS:
            raise SecAggProtocolError(f"masked input length {length} too large")
        words = np.frombuffer(r.take(4 * (length + 2)), dtype=U32)
        signature = r.raw(64)
        r.done()
        return cls(session, client_id, length, words, signature)

    def signed_payload_for(self, tree: bytes) -> bytes:
        """The bytes the signature covers, given the input's tree digest (:func:`crypto.tree_digest`)."""
        return _SIG + bytes([self.TAG]) + tree

    def signed_payload(self) -> bytes:  # pragma: no cover - use signed_payload_for
        raise NotImplementedError("a MaskedInput is signed over its tree digest: signed_payload_for(tree)")


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Round 4, server -> clients in U3: the clients whose masked inputs arrived (U3). Each client
    infers the dropped ones as U2 \\ U3."""

    TAG: ClassVar[int] = 7
    session_id: bytes
    survivors: tuple[int, ...]

    def _write_fields(self, w: _Writer) -> None:
        w.raw(self.session_id, 32)
        w.ids(self.survivors)

    @classmethod
    def _read_fields(cls, r: _Reader) -> dict[str, Any]:
        return dict(session_id=r.raw(32), survivors=r.ids())


def _write_owned(w: _Writer, shares: Sequence[tuple[int, bytes]]) -> None:
    w.fmt("I", len(shares))
    for owner, share in shares:
        w.fmt("Q", owner)
        w.blob(share)


def _read_owned(r: _Reader) -> tuple[tuple[int, bytes], ...]:
    (n,) = r.fmt("I")
    return tuple((r.fmt("Q")[0], r.blob()) for _ in range(n))


@dataclass(frozen=True)
class UnmaskResponse(Message):
    """Round 4, client -> server: ``(owner, share bytes)`` of ``b_owner`` for every owner in U3 and of
    ``s_owner^SK`` for every owner in U2 \\ U3; signed."""

    TAG: ClassVar[int] = 8
    SIGNED: ClassVar[bool] = True
    session_id: bytes
    client_id: int
    b_shares: tuple[tuple[int, bytes], ...]
    s_shares: tuple[tuple[int, bytes], ...]
    signature: bytes = b""

    def _write_fields(self, w: _Writer) -> None:
        w.raw(self.session_id, 32)
        w.fmt("Q", self.client_id)
        _write_owned(w, self.b_shares)
        _write_owned(w, self.s_shares)

    @classmethod
    def _read_fields(cls, r: _Reader) -> dict[str, Any]:
        return dict(session_id=r.raw(32), client_id=r.fmt("Q")[0], b_shares=_read_owned(r), s_shares=_read_owned(r))


_M = TypeVar("_M", bound="Message")


def _parse(msg: object, cls: type[_M]) -> _M:
    """``msg`` itself if it is a ``cls``, else ``cls`` decoded from its bytes."""
    if isinstance(msg, cls):
        return msg
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return cls.from_bytes(msg)
    raise TypeError(f"expected a {cls.__name__} or its bytes, got {type(msg).__name__}")


def _commitment(session_id: bytes, client_id: int, seed: bytes) -> bytes:
    return hashlib.sha256(_COMMIT + session_id + struct.pack("<Q", client_id) + seed).digest()


def _share_ad(session_id: bytes, sender: int, recipient: int) -> bytes:
    return _SHARE_AD + session_id + struct.pack("<QQ", sender, recipient)


def _pair_sign(u: int, v: int) -> int:
    """Bonawitz's Δ_{u,v}: client ``u`` adds the pairwise mask with ``v`` if ``u > v``, subtracts it if ``u < v``."""
    return 1 if u > v else -1


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


# ------------------------------------------------------------------------------ client

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

    def __init__(self, client_id: int, *, signing_key: Ed25519PrivateKey | None = None,
                 known_signing_keys: Mapping[int, bytes] | None = None, threads: int | None = None) -> None:
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
        raise SecAggProtocolError(f"client {self.client_id}: unknown step {step!r} (expected one of {CLIENT_STEPS})")

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
    def from_state_bytes(cls, data: bytes | bytearray | memoryview, *, threads: int | None = None) -> SecAggClient:
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
            raise SecAggProtocolError(f"client {self.client_id}: {step} called in phase {self.phase!r} "
                                      f"(expected {phase!r})")

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
        ad = AdvertiseKeys(config.session_id, self.client_id, c_pk, s_pk, crypto.signing_public(self._sign_key))
        self._advert = AdvertiseKeys(ad.session_id, ad.client_id, c_pk, s_pk, ad.sign_public,
                                     crypto.sign(self._sign_key, ad.signed_payload()))
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
            raise SecAggProtocolError(f"client {self.client_id}: key list has duplicate or uninvited clients {ids}")
        if len(ids) < cfg.threshold:
            raise InsufficientClientsError(f"only {len(ids)} clients advertised keys; threshold {cfg.threshold}")
        mine = [a for a in keys.adverts if a.client_id == self.client_id]
        if len(mine) != 1 or mine[0] != self._advert:
            raise SecAggIntegrityError(f"client {self.client_id}: its own keys are missing or altered in the key list")
        pks = [k for a in keys.adverts for k in (a.c_public, a.s_public)]
        if len(set(pks)) != len(pks):
            raise SecAggIntegrityError("advertised public keys are not all distinct")
        for a in keys.adverts:
            self._check_session(a.session_id)
            if self._known is not None and self._known.get(a.client_id) != a.sign_public:
                raise SecAggIntegrityError(f"client {a.client_id}'s signing key is not its registered key")
            crypto.verify(a.sign_public, a.signature, a.signed_payload(), f"advertisement of client {a.client_id}")
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
            key = crypto.share_key(crypto.agree(self._c_sk, self._peers[v].c_public), cfg.session_id,
                                   self.client_id, v)
            out.append(EncryptedShare(self.client_id, v, crypto.aead_encrypt(
                key, w.getvalue(), _share_ad(cfg.session_id, self.client_id, v))))
        self._seed = seed
        msg = ShareKeys(cfg.session_id, self.client_id, _commitment(cfg.session_id, self.client_id, seed), tuple(out))
        self.phase = "shared"
        return ShareKeys(msg.session_id, msg.sender, msg.b_commitment, msg.shares,
                         crypto.sign(self._sign_key, msg.signed_payload()))

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
            raise SecAggProtocolError(f"client {self.client_id}: delivery has duplicate or unknown senders {senders}")
        if len(senders) + 1 < cfg.threshold:
            raise InsufficientClientsError(f"only {len(senders) + 1} clients shared keys; threshold {cfg.threshold}")
        held: dict[int, tuple[Share, Share]] = {}
        try:
            for e in delivery.shares:
                if e.recipient != self.client_id:
                    raise SecAggProtocolError(f"share from {e.sender} is addressed to {e.recipient}")
                key = crypto.share_key(crypto.agree(self._c_sk, self._peers[e.sender].c_public), cfg.session_id,
                                       e.sender, self.client_id)
                plain = crypto.aead_decrypt(key, e.ciphertext, _share_ad(cfg.session_id, e.sender, self.client_id),
                                            f"shares from client {e.sender} to client {self.client_id}")
                r = _Reader(plain)
                ids = r.fmt("QQ")
                s_sh, b_sh = Share.from_bytes(r.blob()), Share.from_bytes(r.blob())
                r.done()
                if ids != (e.sender, self.client_id) or s_sh.x != self.client_id + 1 or b_sh.x != self.client_id + 1 \
                        or s_sh.secret_len != SECRET_BYTES or b_sh.secret_len != SECRET_BYTES:
                    raise SecAggIntegrityError(f"shares from client {e.sender} are not for client {self.client_id}")
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
            self._terms.append(MaskTerm(crypto.pair_mask_key(shared, sid, self.client_id, v),
                                        _pair_sign(self.client_id, v)))
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
                saturated[i] = quantize_into(x[a:end], blk[:end - a], factor, r, scr[0], scr[1])
            if b > n:
                blk[max(n - a, 0):] = 0
            crypto.mask_block(blk, a, terms, scr[2], scr[3])
            if i not in count_blocks:
                digests[i] = crypto.block_digest(blk)

        def scratch() -> tuple[np.ndarray, np.ndarray, np.ndarray, bytes]:
            return (np.empty(size, np.float64), np.empty(size, np.int64), np.empty(size, U32), bytes(4 * size))

        try:
            crypto.run_blocks(n_blocks, work, scratch, self.threads)
        except BaseException:
            self._abort()
            raise
        count = sum(saturated)
        out[n] = (int(out[n]) + (count & 0xFFFF)) & 0xFFFFFFFF
        out[n + 1] = (int(out[n + 1]) + (count >> 16)) & 0xFFFFFFFF
        for i in count_blocks:
            digests[i] = crypto.block_digest(out[i * bw:(i + 1) * bw])
        msg = MaskedInput(cfg.session_id, self.client_id, n, out)
        tree = crypto.tree_digest(msg.header(), digests)
        signed = MaskedInput(cfg.session_id, self.client_id, n, out,
                             crypto.sign(self._sign_key, msg.signed_payload_for(tree)))
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
            raise SecAggProtocolError(f"client {self.client_id}: survivors {request.survivors} are not a subset of "
                                      f"the clients that shared keys {sorted(self.u2)}")
        if self.client_id not in u3:
            raise SecAggProtocolError(f"client {self.client_id} sent its input but is not listed as a survivor")
        if len(u3) < cfg.threshold:
            raise InsufficientClientsError(f"only {len(u3)} survivors; threshold {cfg.threshold}")
        dropped = self.u2 - u3
        for v in u3:
            if self._revealed.get(v) == "s":
                raise SecAggProtocolError(f"client {self.client_id} refuses: it already revealed its share of client "
                                          f"{v}'s s^SK, so it will not reveal its share of b_{v} too")
        for v in dropped:
            if self._revealed.get(v) == "b":
                raise SecAggProtocolError(f"client {self.client_id} refuses: it already revealed its share of b_{v}, "
                                          f"so it will not reveal its share of client {v}'s s^SK too")
        b_out, s_out = [], []
        for v in sorted(u3):
            share = self._own_b_share if v == self.client_id else self._held[v][1]
            b_out.append((v, share.to_bytes()))
            self._revealed[v] = "b"
        for v in sorted(dropped):
            s_out.append((v, self._held[v][0].to_bytes()))
            self._revealed[v] = "s"
        msg = UnmaskResponse(cfg.session_id, self.client_id, tuple(b_out), tuple(s_out))
        return UnmaskResponse(msg.session_id, msg.client_id, msg.b_shares, msg.s_shares,
                              crypto.sign(self._sign_key, msg.signed_payload()))


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
    "_revealed": (_encoded(lambda w, d: _write_pairs(w, [(k, v.encode()) for k, v in sorted(d.items())])),
                  lambda r: {k: v.decode() for k, v in _read_owned(r)}),
    "_c_sk": (bytes, lambda r: r.raw(32)),
    "_s_sk": (bytes, lambda r: r.raw(32)),
    "_seed": (bytes, lambda r: r.raw(SECRET_BYTES)),
    "_advert": (lambda a: a.to_bytes(), lambda r: AdvertiseKeys.from_bytes(r.raw(len(r.mv)))),
    "_peers": (_encoded(lambda w, d: _write_pairs(w, [(k, a.to_bytes()) for k, a in sorted(d.items())])),
               lambda r: {k: AdvertiseKeys.from_bytes(a) for k, a in _read_owned(r)}),
    "_own_b_share": (lambda s: s.to_bytes(), lambda r: Share.from_bytes(r.raw(len(r.mv)))),
    "_held": (_encoded(lambda w, d: _write_pairs(w, [(k, _share_pair_bytes(p)) for k, p in sorted(d.items())])),
              lambda r: {k: _read_share_pair(v) for k, v in _read_owned(r)}),
    "u2": (_encoded(lambda w, ids: w.ids(sorted(ids))), lambda r: frozenset(r.ids())),
    "_terms": (_encoded(lambda w, ts: _write_pairs(w, [(t.sign & 0xFF, t.key) for t in ts])),
               lambda r: [MaskTerm(k, -1 if s == 0xFF else s) for s, k in _read_owned(r)]),
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


# ------------------------------------------------------------------------------ server

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

    def __init__(self, config: SecAggConfig, *, known_signing_keys: Mapping[int, bytes] | None = None,
                 threads: int | None = None) -> None:
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
        self._check_sender(cid, self.config.clients, self._adverts, "advertisement from uninvited or repeated")
        if self._known is not None and self._known.get(cid) != msg.sign_public:
            raise SecAggIntegrityError(f"client {cid}'s signing key is not its registered key")
        crypto.verify(msg.sign_public, msg.signature, msg.signed_payload(), f"advertisement of client {cid}")
        self._adverts[cid] = msg

    def key_list(self) -> KeyList:
        """Close round 0 (U1 = clients that advertised)."""
        self._expect("advertise", "key_list")
        if len(self._adverts) < self.config.threshold:
            raise self._abort(f"only {len(self._adverts)} clients advertised keys, threshold {self.config.threshold}")
        self.u1 = frozenset(self._adverts)
        self.phase = "share"
        return KeyList(self.config.session_id, tuple(self._adverts[c] for c in sorted(self.u1)))

    # round 1
    def receive_shares(self, msg: ShareKeys | Raw) -> None:
        """Round 1: accept one client of U1's signed, encrypted shares (one for every other client of U1)."""
        msg = self._accept("share", "receive_shares", msg, ShareKeys)
        u = msg.sender
        self._check_sender(u, self.u1, self._share_msgs, "shares from unknown or repeated")
        crypto.verify(self._adverts[u].sign_public, msg.signature, msg.signed_payload(), f"shares of client {u}")
        recipients = [e.recipient for e in msg.shares]
        if any(e.sender != u for e in msg.shares) or sorted(recipients) != sorted(self.u1 - {u}):
            raise SecAggProtocolError(f"server: client {u} must send one share to each other client of U1")
        self._share_msgs[u] = msg

    def share_deliveries(self) -> dict[int, ShareDelivery]:
        """Close round 1 (U2 = clients that sent shares): the ciphertexts for each client of U2."""
        self._expect("share", "share_deliveries")
        if len(self._share_msgs) < self.config.threshold:
            raise self._abort(f"only {len(self._share_msgs)} clients shared keys, threshold {self.config.threshold}")
        self.u2 = frozenset(self._share_msgs)
        self.phase = "mask"
        return {v: ShareDelivery(self.config.session_id, v, tuple(
            e for u in sorted(self.u2 - {v}) for e in self._share_msgs[u].shares if e.recipient == v))
            for v in sorted(self.u2)}

    # round 2
    def receive_masked_input(self, msg: MaskedInput | Raw) -> None:
        """Verify a masked input's signature and add it into the running sum (rolled back if invalid)."""
        msg = self._accept("mask", "receive_masked_input", msg, MaskedInput)
        u = msg.client_id
        self._check_sender(u, self.u2, self._inputs, "masked input from unknown or repeated")
        if self.length is not None and msg.length != self.length:
            raise SecAggProtocolError(f"server: client {u} sent {msg.length} parameters, others {self.length}")
        data = msg.data
        if data.size != msg.length + 2:
            raise SecAggProtocolError(f"server: masked input of client {u} has {data.size} words")
        acc = self._acc if self._acc is not None else np.zeros(msg.length + 2, dtype=U32)
        bw = self.config.block_words
        n_blocks = -(-data.size // bw)
        digests = [b""] * n_blocks

        def add(i: int, _: None) -> None:
            a = i * bw
            blk = data[a:a + bw]
            np.add(acc[a:a + bw], blk, out=acc[a:a + bw])
            digests[i] = crypto.block_digest(blk)

        crypto.run_blocks(n_blocks, add, lambda: None, self.threads)
        try:
            crypto.verify(self._adverts[u].sign_public, msg.signature,
                          msg.signed_payload_for(crypto.tree_digest(msg.header(), digests)),
                          f"masked input of client {u}")
        except SecAggIntegrityError:
            def undo(i: int, _: None) -> None:
                a = i * bw
                np.subtract(acc[a:a + bw], data[a:a + bw], out=acc[a:a + bw])

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
            raise self._abort(f"only {len(self._inputs)} of {len(self.u2)} clients sent masked inputs, "
                              f"threshold {self.config.threshold}")
        self.u3 = frozenset(self._inputs)
        self.phase = "unmask"
        return UnmaskRequest(self.config.session_id, tuple(sorted(self.u3)))

    # round 4
    def receive_unmask_response(self, msg: UnmaskResponse | Raw) -> None:
        """Round 4: accept one survivor's signed shares (b of U3, s^SK of U2 \\ U3)."""
        msg = self._accept("unmask", "receive_unmask_response", msg, UnmaskResponse)
        u = msg.client_id
        self._check_sender(u, self.u3, self._responses, "unmask response from unknown or repeated")
        crypto.verify(self._adverts[u].sign_public, msg.signature, msg.signed_payload(),
                      f"unmask response of client {u}")
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
            raise self._abort(f"only {len(self._responses)} clients answered the unmask request, threshold {t}")
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
                raise SecAggIntegrityError(f"shares of client {owner}'s {'b' if kind == 0 else 's^SK'} are "
                                           f"inconsistent: {err}") from err

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
            sum=int_sum, saturated=saturated, survivors=tuple(survivors), dropped_before_input=tuple(dropped),
            dropped_before_unmask=tuple(sorted(self.u3 - set(responders))), responders=tuple(responders),
            weight_total=math.fsum(cfg.weight_of(u) for u in survivors), scale_bits=cfg.scale_bits,
            timings=timings)

    def _range_check(self, int_sum: np.ndarray, bound: int) -> None:
        bw = self.config.block_words
        n_blocks = -(-int_sum.size // bw)
        bad = [False] * n_blocks

        def check(i: int, _: None) -> None:
            blk = int_sum[i * bw:(i + 1) * bw]
            bad[i] = int(blk.min()) < -bound or int(blk.max()) > bound

        crypto.run_blocks(n_blocks, check, lambda: None, self.threads)
        if any(bad):
            self.phase = "aborted"
            raise SecAggIntegrityError(f"unmasked sum leaves the range ±{bound} that the survivors' inputs allow: "
                                       "an input or a mask was corrupted")
