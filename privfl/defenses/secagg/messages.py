"""The secure-aggregation protocol's messages and their byte encoding.

Every message is a frozen dataclass with ``to_bytes()`` / ``from_bytes()``:
``MAGIC ‖ version ‖ tag ‖ fields [‖ signature]``, little-endian; :func:`decode` parses any of them
from its bytes. The rounds they belong to, and the threat model, are described in
:mod:`~privfl.defenses.secagg.protocol`; :mod:`~privfl.defenses.secagg.client` and
:mod:`~privfl.defenses.secagg.server` produce and consume them. Also here: the derivations both
sides must agree on (the commitment to a self-mask seed, the associated data of an encrypted share,
the sign of a pairwise mask).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias, TypeVar

import numpy as np

from privfl.defenses.secagg.crypto import U32
from privfl.defenses.secagg.errors import SecAggProtocolError
from privfl.defenses.secagg.quantize import check_clip_range, check_no_wrap, check_weights, choose_scale_bits

__all__ = [
    "DEFAULT_BLOCK_WORDS",
    "AdvertiseKeys",
    "EncryptedShare",
    "KeyList",
    "MaskedInput",
    "Message",
    "SecAggConfig",
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
            raise SecAggProtocolError(
                f"truncated message: need {n} bytes at offset {self.pos}, have {len(self.mv) - self.pos}"
            )
        out = self.mv[self.pos : self.pos + n]
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
        if (
            not isinstance(self.block_words, (int, np.integer))
            or self.block_words < 16
            or self.block_words % 16
        ):
            raise SecAggProtocolError(
                f"block_words must be a positive multiple of 16, got {self.block_words!r}"
            )
        object.__setattr__(self, "block_words", int(self.block_words))
        check_no_wrap(self.weights, self.clip_range, self.scale_bits)
        object.__setattr__(self, "scale_bits", int(self.scale_bits))

    @classmethod
    def create(
        cls,
        clients: Sequence[int],
        weights: Sequence[float],
        threshold: int,
        clip_range: float,
        scale_bits: int | None = None,
        block_words: int = DEFAULT_BLOCK_WORDS,
    ) -> SecAggConfig:
        """A config with a fresh random session id; ``scale_bits=None`` takes the finest scale that
        cannot wrap (:func:`~privfl.defenses.secagg.quantize.choose_scale_bits`)."""
        if scale_bits is None:
            scale_bits = choose_scale_bits(weights, clip_range)
        return cls(
            os.urandom(32), threshold, tuple(clients), tuple(weights), clip_range, scale_bits, block_words
        )

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
        return dict(
            session_id=session,
            threshold=threshold,
            clients=clients,
            weights=weights,
            clip_range=clip_range,
            scale_bits=scale_bits,
            block_words=block_words,
        )


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
        return dict(
            session_id=r.raw(32),
            client_id=r.fmt("Q")[0],
            c_public=r.raw(32),
            s_public=r.raw(32),
            sign_public=r.raw(32),
        )


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
        return dict(
            session_id=r.raw(32), sender=r.fmt("Q")[0], b_commitment=r.raw(32), shares=_read_shares(r)
        )


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
        return b"".join(
            [MAGIC, bytes([VERSION, self.TAG]), self.header(), data.data.cast("B"), self.signature]
        )

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
        return dict(
            session_id=r.raw(32), client_id=r.fmt("Q")[0], b_shares=_read_owned(r), s_shares=_read_owned(r)
        )


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
    """Bonawitz's Δ_{u,v}: client ``u`` adds the pairwise mask with ``v`` if ``u > v``, subtracts it if
    ``u < v``."""
    return 1 if u > v else -1
