"""Homomorphically encrypted aggregation with CKKS (TenSEAL): the server adds ciphertexts it cannot read.

Three roles, three objects, and the bytes that travel between them::

    keys = CKKSKeys.generate("precise")           # once, by the clients (e.g. one of them)
    client = CKKSClient(keys.client_context)      # every client: holds the SECRET key
    server = CKKSServer(keys.server_context)      # the server: encryption parameters only

    payload = client.encrypt(update, weight=w_i, bound=B)          # bytes, on each client
    aggregate = server.aggregate([payload_0, None, payload_2], weights=w)  # bytes; None = dropped
    mean_update = client.decrypt(aggregate)       # a key holder (a client) decrypts the mean

:class:`CKKSAggregation` wraps the three into a :class:`~privfl.defenses.base.Defense` for in-process
simulation (``protect`` encrypts, ``aggregate`` sums on the server side and lets its ``keyholder``
client decrypt).

How an update is encoded
------------------------
* The update is flattened to one float32 (float64 if any entry is float64) vector
  (:func:`privfl.updates.flatten`), and each client multiplies it by ``weight / bound``: its own
  aggregation weight ``w_i`` (public, from ``RoundContext.weights``) and one public bound ``B`` on
  ``|value|`` shared by all clients, so the encoded values lie in ``[-2**h, 2**h]`` (``h`` = the
  preset's ``headroom_bits``: values up to ``2**h · B`` are accepted, larger ones raise).
* The vector is packed densely: ``N/2`` values per ciphertext (``N`` = poly modulus degree), all
  layers joined, ``chunk_ciphertexts`` ciphertexts per TenSEAL ``CKKSTensor`` (one chunk), so a
  client sends ``ceil(numel / (N/2))`` ciphertexts. TenSEAL encrypts, adds and decrypts the
  ciphertexts of a chunk on ``n_threads`` threads.
* Encryption is symmetric (with the secret key, which every client holds anyway): smaller noise and
  faster than public-key encryption; the server needs no key at all to add ciphertexts.
* Ciphertexts live at a single 44- or 60-bit prime (plus a special prime that never leaves the key
  generator) and are serialized with SEAL's built-in zstd compression.

Weights: applied by the clients, not the server
-----------------------------------------------
Each client multiplies its own update by its aggregation weight before encryption; the server only
adds ciphertexts; the key holder divides the decrypted sum by the sum of the weights of the clients
that sent (``weight_sum`` in the aggregate's header). This gives exactly the weighted mean over the
survivors, ``sum_i w_i u_i / sum_i w_i`` (dropped clients skipped, weights renormalised), the same
as :func:`privfl.updates.weighted_mean` of the survivors. A server-side multiplication by a plain
scalar was measured and rejected: TenSEAL encodes the scalar at the ciphertext's scale, so the product
has scale Δ² and needs about twice the modulus bits — two data primes for the ``precise`` error,
41–45 bytes/parameter instead of 32 and 0.6–1.1 s instead of 0.4 s per million values to encrypt on
the 2-core benchmark machine (``docs/ckks.md``). The weights are public
(``RoundContext.weights``); each payload's header states the weight its client used and the server
checks it against the round's.

Presets (measured on the 2-core benchmark machine, see ``docs/ckks.md``)
-------------------------------------------------------------------------
* ``precise``: N = 4096, one 60-bit prime, scale Δ = 2**53, headroom 2**5. About 32 bytes per
  parameter. Max abs error of one client's values ≤ 2**-42 · B (measured 2**-43.3 · B), of the
  mean of K clients whose weights sum to W ≤ ``2**-42 · B · sqrt(K) / W``: ≤ 1e-7 × the largest
  |value| of the clients' updates whenever that is ≥ 2.3e-6 · B · sqrt(K) / W.
* ``compact``: N = 4096, one 44-bit prime, Δ = 2**37, headroom 2**5. About 26.7 bytes per
  parameter. Max abs error ≤ ``2**-26 · B · sqrt(K) / W`` (one client measured: 2**-27.4 · B):
  ≤ 1e-4 × the largest |value| whenever that is ≥ 1.5e-4 · B · sqrt(K) / W.

The error bound is absolute, in units of ``B``: CKKS is fixed-point. Keep ``B`` tight (a clip norm
``C`` bounds every coordinate, ``|u_j| <= ||u||_2 <= C``); inside :class:`~privfl.defenses.base.Compose`
``CKKSAggregation`` takes ``B`` from the closest preceding clipping stage. float64 entries are
encoded with the same precision as float32 ones (``≈ 2**-42 · B`` for ``precise``), not float64's.

Threat model: see :class:`CKKSAggregation` and ``docs/ckks.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tenseal as ts
import torch

from privfl.defenses.base import Defense, Payload, RoundContext, check_before_reveal
from privfl.errors import PrivflError, check_payload_size
from privfl.updates import (
    InvalidUpdateError,
    Update,
    UpdateSpec,
    flatten_floating,
    spec_fields,
    spec_from_fields,
    unflatten,
)

__all__ = [
    "PRESETS",
    "CKKSPreset",
    "CKKSKeys",
    "CKKSClient",
    "CKKSServer",
    "CKKSAggregation",
    "CKKSReport",
    "CKKSPayloadError",
]

_PAYLOAD_MAGIC = b"PFCKKS\x00\x01"  # privfl CKKS payload, format version 1
_CONTEXT_MAGIC = b"PFCKCTX\x01"  # privfl CKKS context envelope, version 1
_FRAME = struct.Struct("<Q")  # every frame: little-endian uint64 length, then that many bytes


class CKKSPayloadError(PrivflError, ValueError):
    """A payload or context is malformed, or does not match the others (key, layout, bound, weight)."""


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CKKSPreset:
    """CKKS parameters of one recipe.

    Attributes:
        name: preset name.
        poly_modulus_degree: N; a ciphertext holds ``N/2`` values (slots).
        coeff_mod_bit_sizes: bit sizes of the primes: the data prime(s), then the special prime
            (which only the key generator uses; ciphertexts on the wire carry the data primes only).
        scale_bits: log2 of the CKKS scale Δ a value is encoded with.
        headroom_bits: encoded values (``u · w / B``) may reach ``2**headroom_bits``; a client whose
            update exceeds ``2**headroom_bits · B`` raises instead of overflowing.
        error_target: the max abs error, relative to the largest |value| of the clients' updates,
            this preset is designed for (1e-7 ``precise``, 1e-4 ``compact``).
        error_bound_bits: documented bound on the max abs error of one client's decrypted values,
            ``2**error_bound_bits · B`` (about 2.5× the largest error measured over 55 M values); see
            :meth:`max_abs_error` for the mean of several clients.
        chunk_ciphertexts: ciphertexts per TenSEAL tensor (one chunk of the payload); bounds the
            memory of a streaming aggregation.
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    headroom_bits: int
    error_target: float
    error_bound_bits: int
    chunk_ciphertexts: int = 128

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n < 1024 or n & (n - 1):
            raise ValueError(f"CKKSPreset {self.name!r}: poly_modulus_degree must be a power of two >= 1024, got {n}")
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ValueError(f"CKKSPreset {self.name!r}: need at least one data prime and the special prime")
        if self.scale_bits + self.headroom_bits + 2 > self.data_bits:
            raise ValueError(f"CKKSPreset {self.name!r}: scale 2**{self.scale_bits} with headroom "
                             f"2**{self.headroom_bits} does not fit {self.data_bits} data bits (need 2 spare bits)")
        if self.chunk_ciphertexts < 1:
            raise ValueError(f"CKKSPreset {self.name!r}: chunk_ciphertexts must be >= 1")

    @property
    def slots(self) -> int:
        """Values per ciphertext, ``N/2``."""
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        """Bits of the ciphertext modulus on the wire (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def chunk_values(self) -> int:
        """Values per chunk (one TenSEAL tensor)."""
        return self.slots * self.chunk_ciphertexts

    def max_abs_error(self, bound: float, clients: int = 1, weight_sum: float = 1.0) -> float:
        """Documented bound on the max abs error of the decrypted mean, in the update's units:
        ``2**error_bound_bits · bound · sqrt(clients) / weight_sum``.

        Every ciphertext carries its own encryption noise (independent, about ``2**9.5 / Δ`` at most per
        value in units of ``bound``); the clients' weights scale their values but not their noise, so
        the sum of ``clients`` payloads has ``sqrt(clients)`` times the noise, and dividing by the
        survivors' ``weight_sum`` (< 1 after dropouts) scales it up once more."""
        if clients < 1 or not weight_sum > 0:
            raise ValueError(f"max_abs_error: need clients >= 1 and weight_sum > 0, got {clients}, {weight_sum}")
        return math.ldexp(float(bound), self.error_bound_bits) * math.sqrt(clients) / float(weight_sum)

    def ciphertexts(self, numel: int) -> int:
        """Ciphertexts one client sends for an update of ``numel`` values."""
        return -(-int(numel) // self.slots)


PRESETS: dict[str, CKKSPreset] = {
    "precise": CKKSPreset("precise", 4096, (60, 30), scale_bits=53, headroom_bits=5, error_target=1e-7,
                          error_bound_bits=-42),
    "compact": CKKSPreset("compact", 4096, (44, 30), scale_bits=37, headroom_bits=5, error_target=1e-4,
                          error_bound_bits=-26),
}
"""The two recipes, for K clients with weight sum W: ``precise``: error ≤ 1e-7 × max |value| when
max |value| ≥ 2.3e-6 · bound · sqrt(K)/W; ``compact``: fewest bytes at error ≤ 1e-4 × max |value| when
max |value| ≥ 1.5e-4 · bound · sqrt(K)/W."""


def get_preset(preset: str | CKKSPreset) -> CKKSPreset:
    """A preset by name (``"precise"``, ``"compact"``), or a :class:`CKKSPreset` unchanged."""
    if isinstance(preset, CKKSPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown CKKS preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def _preset_from_json(d: dict[str, Any]) -> CKKSPreset:
    d = dict(d)
    d["coeff_mod_bit_sizes"] = tuple(d["coeff_mod_bit_sizes"])
    return CKKSPreset(**d)


# --------------------------------------------------------------------------------------------
# framing
# --------------------------------------------------------------------------------------------


def _frame(data: bytes) -> bytes:
    return _FRAME.pack(len(data)) + data


def _split(buf: Any, magic: bytes, what: str) -> list[memoryview]:
    """The frames of an envelope (``magic`` + length-prefixed frames), as zero-copy views."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise CKKSPayloadError(f"{what}: expected bytes, got {type(buf).__name__}")
    mv = memoryview(buf).cast("B")
    if len(mv) < len(magic) or bytes(mv[:len(magic)]) != magic:
        raise CKKSPayloadError(f"{what}: not a privfl CKKS {'payload' if magic == _PAYLOAD_MAGIC else 'context'} "
                               "(bad magic bytes or unsupported format version)")
    frames: list[memoryview] = []
    pos = len(magic)
    while pos < len(mv):
        if pos + _FRAME.size > len(mv):
            raise CKKSPayloadError(f"{what}: truncated (frame header cut at byte {pos})")
        (n,) = _FRAME.unpack_from(mv, pos)
        pos += _FRAME.size
        if pos + n > len(mv):
            raise CKKSPayloadError(f"{what}: truncated (frame of {n} bytes at byte {pos}, only {len(mv) - pos} left)")
        frames.append(mv[pos:pos + n])
        pos += n
    if not frames:
        raise CKKSPayloadError(f"{what}: no header frame")
    return frames


def _json(frame: memoryview, what: str) -> dict[str, Any]:
    try:
        header = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CKKSPayloadError(f"{what}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CKKSPayloadError(f"{what}: header is not a JSON object")
    return header


def _spec_id(vector_dtype: str, entries: list[list[Any]]) -> str:
    blob = json.dumps([vector_dtype, entries], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _spec_from_header(header: dict[str, Any], what: str) -> UpdateSpec:
    try:
        return spec_from_fields(header, what)
    except InvalidUpdateError as e:
        raise CKKSPayloadError(str(e)) from None


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


def _context_envelope(preset: CKKSPreset, key_id: str, secret: bool, raw: bytes) -> bytes:
    header = {"format": "privfl-ckks-context", "version": 1, "key_id": key_id, "secret": secret,
              "preset": asdict(preset)}
    return _CONTEXT_MAGIC + _frame(json.dumps(header).encode()) + _frame(raw)


def _open_context(blob: bytes, what: str) -> tuple[dict[str, Any], CKKSPreset, bytes]:
    frames = _split(blob, _CONTEXT_MAGIC, what)
    if len(frames) != 2:
        raise CKKSPayloadError(f"{what}: expected a header and a TenSEAL context, got {len(frames)} frames")
    header = _json(frames[0], what)
    try:
        preset = _preset_from_json(header["preset"])
        str(header["key_id"])
        bool(header["secret"])
    except (KeyError, TypeError) as e:
        raise CKKSPayloadError(f"{what}: malformed context header ({e})") from None
    return header, preset, bytes(frames[1])


class CKKSKeys:
    """A fresh CKKS key set: the clients' context (with the secret key) and the server's (without).

    Attributes:
        preset: the CKKS parameters.
        key_id: random public identifier of this key set (hex); every payload carries it, so
            ciphertexts under different keys are refused instead of decrypting to garbage.
        client_context: serialized context **with the secret key**. Give it to the clients only —
            whoever holds it can decrypt every payload and the aggregate.
        server_context: serialized encryption parameters without any key (symmetric CKKS needs
            none to add ciphertexts). Safe to give to the server.
    """

    __slots__ = ("preset", "key_id", "client_context", "server_context")

    # a plain class, not a dataclass: pretty-printers (pytest, hypothesis, rich) must never show the secret
    def __init__(self, preset: CKKSPreset, key_id: str, client_context: bytes, server_context: bytes):
        self.preset = preset
        self.key_id = key_id
        self.client_context = client_context
        self.server_context = server_context

    @classmethod
    def generate(cls, preset: str | CKKSPreset = "precise", n_threads: int | None = None) -> CKKSKeys:
        """Generate a secret key for ``preset`` (a few ms). Run it on a client, never on the server."""
        p = get_preset(preset)
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, p.poly_modulus_degree, coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=_threads(n_threads))
        # sums of ciphertexts and nothing else: no relinearisation, no rescaling (both would need keys/levels)
        ctx.auto_relin = False
        ctx.auto_rescale = False
        ctx.global_scale = 2.0 ** p.scale_bits
        key_id = secrets.token_hex(16)
        client_raw = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False,
                                   save_relin_keys=False)
        server_raw = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                                   save_relin_keys=False)
        return cls(p, key_id, _context_envelope(p, key_id, True, client_raw),
                   _context_envelope(p, key_id, False, server_raw))

    @classmethod
    def from_contexts(cls, client_context: bytes, server_context: bytes) -> CKKSKeys:
        """Keys from the two serialized contexts (e.g. files distributed out of band to a client).

        Raises:
            CKKSPayloadError: a context is malformed, the first has no secret key, the second has
                one, or they belong to different keys.
        """
        ch, preset, _ = _open_context(client_context, "client context")
        sh, _, _ = _open_context(server_context, "server context")
        if not ch["secret"] or sh["secret"]:
            raise CKKSPayloadError("from_contexts: the client context must hold the secret key and the server "
                                   "context must not")
        if ch["key_id"] != sh["key_id"]:
            raise CKKSPayloadError(f"from_contexts: contexts of different keys ({str(ch['key_id'])[:8]}… vs "
                                   f"{str(sh['key_id'])[:8]}…)")
        return cls(preset, str(ch["key_id"]), bytes(client_context), bytes(server_context))

    def __repr__(self) -> str:  # never print the secret context
        return (f"CKKSKeys(preset={self.preset.name!r}, key_id={self.key_id[:8]}…, client_context=<{len(self.client_context)} "
                f"bytes, secret>, server_context=<{len(self.server_context)} bytes>)")


def _threads(n_threads: int | None) -> int:
    n = (os.cpu_count() or 1) if n_threads is None else int(n_threads)
    if n < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return n


# --------------------------------------------------------------------------------------------
# client and server
# --------------------------------------------------------------------------------------------


class _Party:
    """Shared by client and server: the TenSEAL context, the preset and payload header checks."""

    preset: CKKSPreset
    key_id: str
    context: ts.Context

    def _header(self, frames: list[memoryview], what: str, kind: str | None = None) -> dict[str, Any]:
        h = _json(frames[0], what)
        if h.get("format") != "privfl-ckks" or h.get("version") != 1:
            raise CKKSPayloadError(f"{what}: unsupported header format {h.get('format')!r} v{h.get('version')!r}")
        if kind is not None and h.get("kind") != kind:
            raise CKKSPayloadError(f"{what}: is a {h.get('kind')!r} payload, expected {kind!r}")
        if h.get("key_id") != self.key_id:
            raise CKKSPayloadError(
                f"{what}: encrypted under key {str(h.get('key_id'))[:8]}…, but this party holds key {self.key_id[:8]}… "
                "— all clients must use the client context of the same CKKSKeys")
        if h.get("scale_bits") != self.preset.scale_bits or h.get("slots") != self.preset.slots:
            raise CKKSPayloadError(f"{what}: made for other CKKS parameters (scale 2**{h.get('scale_bits')}, "
                                   f"{h.get('slots')} slots) than preset {self.preset.name!r}")
        numel, chunks, chunk_values = h.get("numel"), h.get("chunks"), h.get("chunk_values")
        if not (isinstance(numel, int) and isinstance(chunks, int) and isinstance(chunk_values, int)) or numel < 1 \
                or chunk_values < 1 or chunks != -(-numel // chunk_values):
            raise CKKSPayloadError(f"{what}: inconsistent header ({numel} values, {chunks} chunks of {chunk_values})")
        if len(frames) - 1 != chunks:
            raise CKKSPayloadError(f"{what}: header announces {chunks} chunks, payload has {len(frames) - 1}")
        vector_dtype, entries = h.get("vector_dtype"), h.get("entries")
        if not isinstance(vector_dtype, str) or not isinstance(entries, list) \
                or h.get("spec_id") != _spec_id(vector_dtype, entries):
            raise CKKSPayloadError(f"{what}: layout fingerprint does not match its layout (corrupted header)")
        bound = h.get("bound")
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise CKKSPayloadError(f"{what}: bad bound {bound!r}")
        return h

    def _load(self, blob: memoryview | bytes, what: str) -> ts.CKKSTensor:
        try:
            return ts.ckks_tensor_from(self.context, bytes(blob))
        except Exception as e:  # TenSEAL raises ValueError/RuntimeError on foreign or corrupt data
            raise CKKSPayloadError(f"{what}: cannot load the ciphertexts ({type(e).__name__}: {e})") from None


class CKKSClient(_Party):
    """A client: encrypts its update and, as a key holder, decrypts the aggregate.

    Holds the **secret key** (``CKKSKeys.client_context``). Every client has the same key: whoever
    holds a client context can decrypt any payload encrypted under it (see the threat model in
    :class:`CKKSAggregation`).

    Args:
        client_context: ``CKKSKeys.client_context``.
        n_threads: TenSEAL worker threads (default: all cores).
    """

    def __init__(self, client_context: bytes, n_threads: int | None = None):
        header, preset, raw = _open_context(client_context, "CKKSClient context")
        if not header["secret"]:
            raise CKKSPayloadError("CKKSClient needs CKKSKeys.client_context (with the secret key); this is the "
                                   "server context, which cannot encrypt or decrypt")
        self.preset = preset
        self.key_id = str(header["key_id"])
        self.context = ts.context_from(raw, n_threads=_threads(n_threads))
        if not self.context.has_secret_key():
            raise CKKSPayloadError("CKKSClient context holds no secret key")
        self.last_payload_bytes: int | None = None

    # -- encryption -----------------------------------------------------------------------------

    def encrypt(self, update: Update, *, weight: float = 1.0, bound: float) -> bytes:
        """Encrypt a float update as one payload (bytes).

        Args:
            update: ``dict[str, Tensor]`` of floating tensors (no NaN/inf).
            weight: this client's aggregation weight in [0, 1] (public; the server checks it).
            bound: public bound on every |value| shared by all clients, in the update's units;
                values up to ``2**headroom_bits · bound`` are accepted.

        Raises:
            InvalidUpdateError: not a dict of floating tensors, empty, or NaN/inf values.
            ValueError: bad weight/bound, or a value above ``2**headroom_bits · bound``.
        """
        vec, spec = flatten_floating(update, "CKKSClient.encrypt")
        return self.encrypt_vector(vec, spec, weight=weight, bound=bound)

    def encrypt_vector(self, vec: torch.Tensor, spec: UpdateSpec, *, weight: float = 1.0, bound: float) -> bytes:
        """:meth:`encrypt` for an already flattened update (``vec, spec = flatten(update)``)."""
        payload = b"".join(self.encrypt_frames(vec, spec, weight=weight, bound=bound))
        self.last_payload_bytes = len(payload)
        return payload

    def encrypt_frames(self, vec: torch.Tensor, spec: UpdateSpec, *, weight: float = 1.0,
                       bound: float) -> Iterator[bytes]:
        """The payload of :meth:`encrypt_vector` piece by piece (magic + header frame first, then one
        frame per chunk), so a large update can be encrypted, sent and aggregated chunk by chunk.
        ``b"".join(...)`` of the pieces is the payload. Checks run before the first piece is made."""
        vec = _check_vector(vec, spec)
        w = float(weight)
        if not (math.isfinite(w) and 0.0 <= w <= 1.0):
            raise ValueError(f"CKKSClient: weight must be in [0, 1] (an aggregation weight), got {weight!r}")
        b = _check_bound(bound)
        limit = math.ldexp(b, self.preset.headroom_bits)
        amax = float(vec.abs().max())
        if amax > limit:
            raise ValueError(
                f"CKKSClient: update has max |value| {amax:.6g}, above the representable 2**{self.preset.headroom_bits} "
                f"× bound = {limit:.6g} (bound {b:.6g}); CKKS would overflow — pass a larger public bound=")
        return self._frames(vec, spec, w, b)

    def _frames(self, vec: torch.Tensor, spec: UpdateSpec, weight: float, bound: float) -> Iterator[bytes]:
        p = self.preset
        layout = spec_fields(spec)
        n = vec.numel()
        header = {"format": "privfl-ckks", "version": 1, "kind": "update", "key_id": self.key_id, "preset": p.name,
                  "scale_bits": p.scale_bits, "slots": p.slots, "chunk_values": p.chunk_values,
                  "chunks": -(-n // p.chunk_values), **layout, "numel": n,
                  "spec_id": _spec_id(layout["vector_dtype"], layout["entries"]), "bound": bound, "weight": weight}
        yield _PAYLOAD_MAGIC + _frame(json.dumps(header, separators=(",", ":")).encode())
        factor = weight / bound
        for start in range(0, n, p.chunk_values):
            piece = vec[start:start + p.chunk_values].to(torch.float64).numpy() * factor
            yield _frame(self.encrypt_chunk(piece))

    def encrypt_chunk(self, values: np.ndarray) -> bytes:
        """Encrypt up to ``preset.chunk_values`` already scaled values (|v| <= 2**headroom_bits) into
        one serialized TenSEAL ``CKKSTensor``: ``ceil(len/slots)`` ciphertexts, ciphertext ``j`` holds
        values ``j, j+m, j+2m, …`` (``m`` ciphertexts), zero-padded."""
        values = np.asarray(values, dtype=np.float64).ravel()
        s = self.preset.slots
        m = -(-values.size // s)
        if m < 1 or m > self.preset.chunk_ciphertexts:
            raise ValueError(f"encrypt_chunk: {values.size} values; a chunk holds 1 to {self.preset.chunk_values}")
        if values.size < m * s:
            values = np.concatenate([values, np.zeros(m * s - values.size)])
        # a (slots, 1) tensor is mis-encoded by TenSEAL 0.3.18's batching; one ciphertext goes in as 1-D
        plain = ts.plain_tensor(values if m == 1 else values.reshape(s, m))
        return ts.ckks_tensor(self.context, plain, scale=2.0 ** self.preset.scale_bits, batch=True).serialize()

    # -- decryption -----------------------------------------------------------------------------

    def decrypt(self, payload: bytes) -> Update:
        """Decrypt an aggregate (or a single client payload) into an update: the weighted mean,
        entries cast back to their dtypes."""
        vec, spec = self.decrypt_vector(payload)
        return unflatten(vec, spec)

    def decrypt_vector(self, payload: bytes) -> tuple[torch.Tensor, UpdateSpec]:
        """Decrypt into a float64 vector (before the cast to the entries' dtypes) and its layout.

        For an aggregate: ``bound · sum / weight_sum`` = the weighted mean over the clients that
        sent. For a client payload: ``bound · value / weight`` = that client's update (any key holder
        can do this: all clients share the key)."""
        frames = _split(payload, _PAYLOAD_MAGIC, "CKKSClient.decrypt")
        h = self._header(frames, "CKKSClient.decrypt")
        spec = _spec_from_header(h, "CKKSClient.decrypt")
        divisor = h.get("weight_sum") if h.get("kind") == "aggregate" else h.get("weight")
        if not (isinstance(divisor, (int, float)) and math.isfinite(divisor) and divisor > 0):
            raise CKKSPayloadError(f"CKKSClient.decrypt: weight {divisor!r} in the header; cannot undo a zero weight")
        out = np.empty(h["numel"], dtype=np.float64)
        cv = h["chunk_values"]
        for c, blob in enumerate(frames[1:]):
            start = c * cv
            count = min(cv, h["numel"] - start)
            out[start:start + count] = self.decrypt_chunk(blob, count)
        out *= float(h["bound"]) / float(divisor)
        return torch.from_numpy(out), spec

    def decrypt_chunk(self, blob: bytes | memoryview, count: int) -> np.ndarray:
        """Decrypt one chunk (:meth:`encrypt_chunk` / :meth:`CKKSServer.sum_chunks` output) into its
        first ``count`` values (still scaled by ``weight / bound``)."""
        tensor = self._load(blob, "CKKSClient.decrypt_chunk")
        # _decrypt() returns TenSEAL's C++ plain tensor; the public decrypt() copies it through numpy twice
        plain = tensor._decrypt() if hasattr(tensor, "_decrypt") else tensor.decrypt().data
        values = np.asarray(plain.data(), dtype=np.float64)
        if values.size < count:
            raise CKKSPayloadError(f"decrypt_chunk: chunk holds {values.size} values, expected at least {count}")
        return values[:count]


def payload_header(payload: bytes | bytearray | memoryview, what: str = "payload") -> dict[str, Any]:
    """The public JSON header of a CKKS payload or aggregate (layout, ``numel``, ``contributors``,
    …), read without any key and without checking the ciphertexts."""
    return _json(_split(payload, _PAYLOAD_MAGIC, what)[0], what)


def aggregate_head(client_header: dict[str, Any], weight_sum: float, contributors: list[int]) -> bytes:
    """Magic and header frame of an aggregate payload, from one contributor's (validated) header."""
    header = {k: client_header[k] for k in ("format", "version", "key_id", "preset", "scale_bits", "slots",
                                            "chunk_values", "chunks", "numel", "vector_dtype", "entries", "spec_id",
                                            "bound")}
    header.update(kind="aggregate", weight_sum=weight_sum, contributors=contributors)
    return _PAYLOAD_MAGIC + _frame(json.dumps(header, separators=(",", ":")).encode())


class CKKSServer(_Party):
    """The aggregator: sums ciphertexts it cannot decrypt.

    Built from ``CKKSKeys.server_context``, which holds the encryption parameters and no key:
    the server can deserialize and add ciphertexts, nothing else. ``CKKSServer`` refuses a context
    that holds the secret key.

    Replays: the server remembers a digest (SHA-256) of every payload it aggregated and refuses the
    same bytes again, in a later round or twice in one round (a client re-sending an old or another
    client's ciphertext). Payloads are not signed, so this stops naive replays, not a client that
    re-encrypts what it saw (it cannot: it has no other client's plaintext).

    Args:
        server_context: ``CKKSKeys.server_context``.
        n_threads: TenSEAL worker threads (default: all cores).
        max_payload_bytes: refuse a payload longer than this before parsing it
            (:class:`~privfl.errors.PayloadTooLargeError`); ``None``: no limit.
    """

    def __init__(self, server_context: bytes, n_threads: int | None = None, *, max_payload_bytes: int | None = None):
        self.max_payload_bytes = max_payload_bytes
        self._seen: set[bytes] = set()
        header, preset, raw = _open_context(server_context, "CKKSServer context")
        if header["secret"]:
            raise CKKSPayloadError("CKKSServer was given the client context (with the secret key); the server must "
                                   "only get CKKSKeys.server_context")
        self.preset = preset
        self.key_id = str(header["key_id"])
        self.context = ts.context_from(raw, n_threads=_threads(n_threads))
        if self.context.has_secret_key():
            raise CKKSPayloadError("CKKSServer context holds a secret key; refusing it")

    def aggregate(self, payloads: Sequence[bytes | None], weights: Sequence[float] | None = None) -> bytes:
        """Sum the payloads of the clients that sent into one encrypted aggregate (bytes).

        ``None`` entries are clients that dropped out; they are skipped and the aggregate's header
        records ``weight_sum`` (the sum of the survivors' weights) so the key holder's decryption
        renormalises the mean over the survivors. ``weights`` (e.g. ``RoundContext.weights``, same
        order as ``payloads``), if given, must match the weight each client used.

        Raises:
            CKKSPayloadError: a payload is not bytes, corrupt, under another key, for another update
                layout, bound or chunking, used a weight other than the round's, or was aggregated
                before (replay).
            PayloadTooLargeError: a payload beyond ``max_payload_bytes``.
            ValueError: every client dropped out, or the survivors' weights sum to 0 or above 1.
        """
        payloads = list(payloads)
        if weights is not None and len(weights) != len(payloads):
            raise ValueError(f"CKKSServer.aggregate: {len(payloads)} payloads but {len(weights)} weights")
        parsed: list[tuple[int, dict[str, Any], list[memoryview]]] = []
        digests: dict[bytes, int] = {}
        for i, p in enumerate(payloads):
            if p is None:
                continue
            what = f"payload {i}"
            h, frames, digest = self._check(p, None if weights is None else float(weights[i]), what)
            if digest in digests:
                raise CKKSPayloadError(f"{what}: identical to payload {digests[digest]} (replayed)")
            digests[digest] = i
            if parsed:
                j, h0, _ = parsed[0]
                if h["spec_id"] != h0["spec_id"]:
                    raise CKKSPayloadError(
                        f"{what}: update layout (keys, shapes, dtypes; id {h['spec_id'][:8]}…) differs from payload "
                        f"{j}'s (id {h0['spec_id'][:8]}…) — clients must send updates of the same structure")
                if h["bound"] != h0["bound"]:
                    raise CKKSPayloadError(f"{what}: encoded with bound {h['bound']!r}, payload {j} with "
                                           f"{h0['bound']!r}; all clients must use the same public bound")
                if h["chunk_values"] != h0["chunk_values"]:
                    raise CKKSPayloadError(f"{what}: chunked differently from payload {j}")
            parsed.append((i, h, frames))
        if not parsed:
            raise ValueError("CKKSServer.aggregate: every client dropped out; nothing to aggregate")
        weight_sum = math.fsum(float(h["weight"]) for _, h, _ in parsed)
        if not weight_sum > 0:
            raise ValueError("CKKSServer.aggregate: the clients that sent all have weight 0")
        if weight_sum > 1 + 1e-9:
            raise ValueError(f"CKKSServer.aggregate: the weights sum to {weight_sum!r} > 1; encoded sums could overflow")
        h0 = parsed[0][1]
        out = [aggregate_head(h0, weight_sum, [i for i, _, _ in parsed])]
        for c in range(h0["chunks"]):
            out.append(_frame(self.sum_chunks([frames[c + 1] for _, _, frames in parsed],
                                              [f"payload {i} chunk {c}" for i, _, _ in parsed])))
        self._seen.update(digests)
        return b"".join(out)

    def check_payload(self, payload: bytes, weight: float | None = None, what: str = "payload") -> None:
        """Check one client payload as :meth:`aggregate` would (size, framing, header, key, weight,
        replay), without aggregating it or remembering it. Ciphertext chunks are only checked when
        they are summed.

        Raises:
            CKKSPayloadError, PayloadTooLargeError: as :meth:`aggregate`.
        """
        self._check(payload, weight, what)

    def _check(self, payload: Any, weight: float | None, what: str
               ) -> tuple[dict[str, Any], list[memoryview], bytes]:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise CKKSPayloadError(f"{what}: expected bytes, got {type(payload).__name__}")
        check_payload_size(payload, self.max_payload_bytes, what)
        digest = hashlib.sha256(payload).digest()
        if digest in self._seen:
            raise CKKSPayloadError(f"{what}: identical to a payload aggregated in an earlier round (replayed)")
        frames = _split(payload, _PAYLOAD_MAGIC, what)
        h = self._header(frames, what, kind="update")
        w = h.get("weight")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and 0 <= w <= 1):
            raise CKKSPayloadError(f"{what}: bad weight {w!r} in the header")
        if weight is not None and not math.isclose(w, weight, rel_tol=1e-9, abs_tol=1e-12):
            raise CKKSPayloadError(f"{what}: client encrypted with weight {w!r}, but the round's weight is {weight!r}")
        return h, frames, digest

    def sum_chunks(self, blobs: Sequence[bytes | memoryview], names: Sequence[str] | None = None) -> bytes:
        """Add the same chunk of several clients (serialized TenSEAL tensors) into one serialized
        tensor. Only additions: the clients already applied their weights."""
        if not blobs:
            raise ValueError("sum_chunks: no chunks")
        names = list(names) if names is not None else [f"chunk {i}" for i in range(len(blobs))]
        acc = self._load(blobs[0], names[0])
        for blob, name in zip(blobs[1:], names[1:]):
            t = self._load(blob, name)
            if t.shape != acc.shape:
                raise CKKSPayloadError(f"{name}: {t.shape} ciphertexts, expected {acc.shape}")
            acc.add_(t)
        return acc.serialize()


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _check_vector(vec: torch.Tensor, spec: UpdateSpec) -> torch.Tensor:
    if not isinstance(vec, torch.Tensor) or vec.dim() != 1 or vec.numel() != spec.numel:
        raise InvalidUpdateError("CKKSClient: vector does not match its layout (use privfl.updates.flatten)")
    if vec.numel() == 0:
        raise InvalidUpdateError("CKKSClient: empty update (no values to encrypt)")
    if not vec.dtype.is_floating_point or any(not e.dtype.is_floating_point for e in spec.entries):
        raise InvalidUpdateError("CKKSClient: CKKS aggregation handles floating entries only")
    vec = vec.detach().cpu()
    finite = torch.isfinite(vec)
    if not bool(finite.all()):
        bad = [e.name for e in spec.entries if not bool(finite[e.offset:e.offset + e.numel].all())]
        raise InvalidUpdateError(f"CKKSClient: update has NaN or inf values in {bad[:5]}")
    return vec


def _check_bound(bound: Any) -> float:
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"CKKS bound must be a positive finite number (a public bound on |value|), got {bound!r}")
    return float(bound)


# --------------------------------------------------------------------------------------------
# the Defense
# --------------------------------------------------------------------------------------------


@dataclass
class CKKSReport:
    """What one round of :class:`CKKSAggregation` cost and how accurate it was.

    Attributes:
        round: the round index.
        preset: preset name.
        params: values per update.
        ciphertexts_per_client: CKKS ciphertexts each client sent.
        bytes_per_client: payload size in bytes, per client id that sent.
        bytes_per_param: mean payload bytes / params.
        aggregate_bytes: size of the encrypted aggregate (server → key holder).
        dropped: ids of the sampled clients whose payload was ``None``.
        weight_sum: sum of the weights of the clients that sent (the mean is renormalised by it).
        bound: the public bound B the values were scaled by (update units).
        error_bound: the preset's documented max abs error for this bound (update units).
        protect_seconds: wall time of ``protect`` per client id (encryption + serialization).
        aggregate_seconds: server wall time (deserialize, add, serialize).
        decrypt_seconds: key holder wall time (deserialize, decrypt, decode).
        max_abs_error: max |decrypted mean − plain weighted mean| in float64 (before the cast to the
            entries' dtypes), or ``None`` when not measured (``measure_error=False``).
        max_abs_value: largest |value| of the survivors' updates (``None`` when not measured).
        relative_error: ``max_abs_error / max_abs_value`` (``None`` when not measured).
    """

    round: int
    preset: str
    params: int
    ciphertexts_per_client: int
    bytes_per_client: dict[int, int]
    bytes_per_param: float
    aggregate_bytes: int
    dropped: tuple[int, ...]
    weight_sum: float
    bound: float
    error_bound: float
    protect_seconds: dict[int, float] = field(default_factory=dict)
    aggregate_seconds: float = 0.0
    decrypt_seconds: float = 0.0
    max_abs_error: float | None = None
    max_abs_value: float | None = None
    relative_error: float | None = None


class CKKSAggregation(Defense):
    """Encrypted FedAvg with CKKS (TenSEAL): clients encrypt, the server adds ciphertexts, a client
    decrypts the weighted mean.

    ``protect`` (client): flatten the float update, multiply by ``weight / bound``, encrypt with the
    shared secret key, return bytes. ``aggregate`` (server): add the ciphertexts of the clients that
    sent — with :class:`CKKSServer`, which holds no key — then hand the encrypted sum to
    :attr:`keyholder`, a :class:`CKKSClient`, which decrypts it and divides by the survivors' weight
    sum. In this in-process simulation the key holder lives inside the Defense object; in a
    deployment it is one of the clients, and the server only ever handles bytes.

    Threat model:

    * **Honest-but-curious server**: sees only ciphertexts and, per payload, a plaintext header with
      the key id, the update layout (names, shapes, dtypes), the public bound and the client's
      public aggregation weight. It learns nothing else about any client's update.
    * **All clients share one secret key.** Any client — or anyone who compromises one client or
      steals ``client_context`` — can decrypt every other client's payload seen on the wire or at
      the server. Payloads must travel over authenticated encrypted channels (TLS) to the server,
      and clients must not be able to read each other's traffic. CKKS here protects against the
      server, not against other clients.
    * **The aggregate is revealed** to the key holders (and, as the new global model, usually to
      everyone, including the server: :meth:`aggregate` returns it in the clear to the FL loop).
      Nothing protects what the aggregate itself reveals about one client: combine with
      differential privacy (e.g. ``GaussianMechanism(placement="distributed")`` before this stage).
    * **No integrity**: a malicious server can drop, replay, re-weight or alter contributions, or
      return a wrong aggregate; a malicious client can send anything within ``2**h · bound``.
      Nothing here detects it, except that the server refuses a byte-identical replay of a
      payload it already aggregated.
    * **Approximate arithmetic**: CKKS adds noise; the decrypted mean differs from the exact
      weighted mean by at most ``preset.max_abs_error(B, K, W)`` = ``2**-42 · B · sqrt(K) / W``
      (``precise``) or ``2**-26 · B · sqrt(K) / W`` (``compact``) for K senders with weight sum W,
      then is rounded to the entries' dtypes.

    Args:
        preset: ``"precise"`` (default), ``"compact"`` or a :class:`CKKSPreset`.
        bound: public bound B on every |value| of every client's update (update units), shared by
            all clients. ``None``: taken, inside :class:`~privfl.defenses.base.Compose`, from the
            closest preceding clipping stage (``ClipUpdate.max_norm`` or a mechanism's
            ``sensitivity``: an L2 or L1 clip norm bounds every coordinate); noise added after the
            clip must stay within ``2**headroom_bits · B`` (32 B), else the client raises.
        keys: a :class:`CKKSKeys` to use; default: fresh keys generated here.
        n_threads: TenSEAL worker threads (default: all cores).
        measure_error: simulation-only check — keep each client's plaintext in this process and put
            the max abs error against the plain weighted mean in :attr:`last_report`. A real
            deployment cannot measure it (nobody may hold all plaintexts).
        max_payload_bytes: the server refuses a payload longer than this before parsing it
            (:class:`~privfl.errors.PayloadTooLargeError`); ``None``: no limit.

    Dropped clients (``None`` payloads) are skipped and the mean is renormalised over the clients
    that sent. Only floating entries are accepted (drop integer buffers first). Nothing secret is
    checkpointed: :meth:`state_dict` holds only the preset name, so a resumed run generates fresh
    keys (harmless — no ciphertext outlives its round).
    """

    hides_individual_updates = True

    def __init__(self, preset: str | CKKSPreset = "precise", *, bound: float | None = None,
                 keys: CKKSKeys | None = None, n_threads: int | None = None, measure_error: bool = False,
                 max_payload_bytes: int | None = None):
        self.preset = get_preset(preset)
        if keys is not None and keys.preset != self.preset:
            raise ValueError(f"CKKSAggregation: keys are for preset {keys.preset.name!r}, not {self.preset.name!r}")
        self.bound: float | None = _check_bound(bound) if bound is not None else None
        self.bound_source = "bound=" if bound is not None else None
        self.keys = keys if keys is not None else CKKSKeys.generate(self.preset, n_threads)
        self.client = CKKSClient(self.keys.client_context, n_threads)  # every simulated client's encryptor
        self.keyholder = self.client  # the client that decrypts the aggregate (same key, same object here)
        self.server = CKKSServer(self.keys.server_context, n_threads, max_payload_bytes=max_payload_bytes)
        self.measure_error = bool(measure_error)
        self.last_report: CKKSReport | None = None
        self._plain: dict[tuple[int, int], torch.Tensor] = {}
        self._protect_seconds: dict[tuple[int, int], float] = {}

    def bind(self, before: Sequence[Defense], after: Sequence[Defense]) -> None:
        """Called by :class:`Compose`: must be the last stage; take B from the closest clip before it."""
        if after:
            raise ValueError("CKKSAggregation must be the last stage of a Compose (it returns ciphertext bytes)")
        if self.bound is not None:
            return
        for stage in reversed(before):
            for attr in ("max_norm", "sensitivity"):
                value = getattr(stage, attr, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                    self.bound = float(value)
                    self.bound_source = f"{type(stage).__name__}.{attr}"
                    return

    def _bound(self) -> float:
        if self.bound is None:
            raise ValueError("CKKSAggregation needs a public bound on |value|: pass bound= (e.g. your clip norm), or put "
                             "a ClipUpdate (or a clipping DP mechanism) before it in a Compose")
        return self.bound

    def protect(self, update: Update, ctx: RoundContext) -> bytes:
        """Client side: encrypt ``update`` (pre-multiplied by this client's weight) into bytes."""
        if ctx.client_id is None:
            raise ValueError("CKKSAggregation.protect runs on a client: pass ctx.for_client(client_id) (the client "
                             "applies its own aggregation weight)")
        t0 = time.perf_counter()
        vec, spec = flatten_floating(update, "CKKSAggregation.protect")
        payload = self.client.encrypt_vector(vec, spec, weight=ctx.weight_of(ctx.client_id), bound=self._bound())
        self._protect_seconds[(ctx.round, ctx.client_id)] = time.perf_counter() - t0
        if self.measure_error:  # simulation-only: keep the plaintext to measure the CKKS error later
            self._plain[(ctx.round, ctx.client_id)] = vec.detach().to(torch.float64).cpu().clone()
        return payload

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        """Server: sum the ciphertexts (no key); key holder: decrypt the weighted mean of the survivors."""
        payloads = list(payloads)
        if len(payloads) != len(ctx.sampled):
            raise ValueError(f"CKKSAggregation: {len(payloads)} payloads for {len(ctx.sampled)} sampled clients")
        t0 = time.perf_counter()
        encrypted_mean = self.server.aggregate(payloads, ctx.weights)
        head = payload_header(encrypted_mean, "aggregate")
        # the contributors are known and nothing is decrypted yet: a round that does not fit stops here
        check_before_reveal(ctx, [ctx.sampled[i] for i in head["contributors"]], head["numel"])
        t1 = time.perf_counter()
        vec, spec = self.keyholder.decrypt_vector(encrypted_mean)
        t2 = time.perf_counter()
        survivors = [(cid, p) for cid, p in zip(ctx.sampled, payloads) if p is not None]
        report = CKKSReport(
            round=ctx.round, preset=self.preset.name, params=spec.numel,
            ciphertexts_per_client=self.preset.ciphertexts(spec.numel),
            bytes_per_client={cid: len(p) for cid, p in survivors},
            bytes_per_param=sum(len(p) for _, p in survivors) / len(survivors) / spec.numel,
            aggregate_bytes=len(encrypted_mean),
            dropped=tuple(cid for cid, p in zip(ctx.sampled, payloads) if p is None),
            weight_sum=math.fsum(ctx.weight_of(cid) for cid, _ in survivors), bound=self._bound(),
            error_bound=self.preset.max_abs_error(self._bound(), len(survivors),
                                                  math.fsum(ctx.weight_of(cid) for cid, _ in survivors)),
            protect_seconds={cid: s for (r, cid), s in self._protect_seconds.items() if r == ctx.round},
            aggregate_seconds=t1 - t0, decrypt_seconds=t2 - t1)
        if self.measure_error:
            found = [(ctx.weight_of(cid), self._plain.get((ctx.round, cid))) for cid, _ in survivors]
            plains = [(w, u) for w, u in found if u is not None]
            if len(plains) == len(found):
                ref = torch.stack([w * u for w, u in plains]).sum(0) / report.weight_sum
                report.max_abs_error = float((vec - ref).abs().max())
                report.max_abs_value = max(float(u.abs().max()) for _, u in plains)
                report.relative_error = (report.max_abs_error / report.max_abs_value
                                         if report.max_abs_value > 0 else 0.0)
        self._plain = {k: v for k, v in self._plain.items() if k[0] > ctx.round}
        self._protect_seconds = {k: v for k, v in self._protect_seconds.items() if k[0] > ctx.round}
        self.last_report = report
        return unflatten(vec, spec)

    def state_dict(self) -> dict[str, Any]:
        """Only the preset name: keys are never checkpointed (a resumed run makes fresh ones)."""
        return {"preset": self.preset.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = state.get("preset", self.preset.name)
        if name != self.preset.name:
            raise ValueError(f"CKKSAggregation: checkpoint was made with preset {name!r}, this is {self.preset.name!r}")

    def __repr__(self) -> str:
        src = f", bound from {self.bound_source}" if self.bound_source and self.bound_source != "bound=" else ""
        return f"CKKSAggregation(preset={self.preset.name!r}, bound={self.bound}{src}, key_id={self.keys.key_id[:8]}…)"
