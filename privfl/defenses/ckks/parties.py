"""The two parties: :class:`CKKSClient` (encrypts, and as a key holder decrypts) and
:class:`CKKSServer` (adds ciphertexts it cannot read).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tenseal as ts
import torch

from privfl.defenses.ckks.keys import _threads
from privfl.defenses.ckks.presets import CKKSPreset
from privfl.defenses.ckks.wire import (
    _PAYLOAD_MAGIC,
    CKKSPayloadError,
    _frame,
    _json,
    _open_context,
    _spec_from_header,
    _spec_id,
    _split,
    aggregate_head,
)
from privfl.errors import check_payload_size
from privfl.updates import InvalidUpdateError, Update, UpdateSpec, flatten_floating, spec_fields, unflatten

__all__ = ["CKKSClient", "CKKSServer"]


class _Party:
    """Shared by client and server: the TenSEAL context, the preset and payload header checks."""

    preset: CKKSPreset
    key_id: str
    context: ts.Context

    def _open(
        self,
        context: bytes,
        what: str,
        n_threads: int | None,
        *,
        secret: bool,
        wrong_role: str,
        wrong_key: str,
    ) -> None:
        """Load a serialized context into :attr:`preset`, :attr:`key_id` and :attr:`context`; its header
        and its TenSEAL context must hold the secret key exactly when ``secret`` (else
        :class:`CKKSPayloadError` with ``wrong_role`` / ``wrong_key``)."""
        header, preset, raw = _open_context(context, what)
        if bool(header["secret"]) != secret:
            raise CKKSPayloadError(wrong_role)
        self.preset = preset
        self.key_id = str(header["key_id"])
        self.context = ts.context_from(raw, n_threads=_threads(n_threads))
        if bool(self.context.has_secret_key()) != secret:
            raise CKKSPayloadError(wrong_key)

    def _header(self, frames: list[memoryview], what: str, kind: str | None = None) -> dict[str, Any]:
        h = _json(frames[0], what)
        if h.get("format") != "privfl-ckks" or h.get("version") != 1:
            raise CKKSPayloadError(
                f"{what}: unsupported header format {h.get('format')!r} v{h.get('version')!r}"
            )
        if kind is not None and h.get("kind") != kind:
            raise CKKSPayloadError(f"{what}: is a {h.get('kind')!r} payload, expected {kind!r}")
        if h.get("key_id") != self.key_id:
            raise CKKSPayloadError(
                f"{what}: encrypted under key {str(h.get('key_id'))[:8]}…, but this party holds key "
                f"{self.key_id[:8]}… — all clients must use the client context of the same CKKSKeys"
            )
        if h.get("scale_bits") != self.preset.scale_bits or h.get("slots") != self.preset.slots:
            raise CKKSPayloadError(
                f"{what}: made for other CKKS parameters (scale 2**{h.get('scale_bits')}, "
                f"{h.get('slots')} slots) than preset {self.preset.name!r}"
            )
        numel, chunks, chunk_values = h.get("numel"), h.get("chunks"), h.get("chunk_values")
        if (
            not (isinstance(numel, int) and isinstance(chunks, int) and isinstance(chunk_values, int))
            or numel < 1
            or chunk_values < 1
            or chunks != -(-numel // chunk_values)
        ):
            raise CKKSPayloadError(
                f"{what}: inconsistent header ({numel} values, {chunks} chunks of {chunk_values})"
            )
        if len(frames) - 1 != chunks:
            raise CKKSPayloadError(f"{what}: header announces {chunks} chunks, payload has {len(frames) - 1}")
        vector_dtype, entries = h.get("vector_dtype"), h.get("entries")
        if (
            not isinstance(vector_dtype, str)
            or not isinstance(entries, list)
            or h.get("spec_id") != _spec_id(vector_dtype, entries)
        ):
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
        self._open(
            client_context,
            "CKKSClient context",
            n_threads,
            secret=True,
            wrong_role="CKKSClient needs CKKSKeys.client_context (with the secret key); this is the "
            "server context, which cannot encrypt or decrypt",
            wrong_key="CKKSClient context holds no secret key",
        )
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

    def encrypt_vector(
        self, vec: torch.Tensor, spec: UpdateSpec, *, weight: float = 1.0, bound: float
    ) -> bytes:
        """:meth:`encrypt` for an already flattened update (``vec, spec = flatten(update)``)."""
        payload = b"".join(self.encrypt_frames(vec, spec, weight=weight, bound=bound))
        self.last_payload_bytes = len(payload)
        return payload

    def encrypt_frames(
        self, vec: torch.Tensor, spec: UpdateSpec, *, weight: float = 1.0, bound: float
    ) -> Iterator[bytes]:
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
                f"CKKSClient: update has max |value| {amax:.6g}, above the representable "
                f"2**{self.preset.headroom_bits} × bound = {limit:.6g} (bound {b:.6g}); CKKS would overflow "
                "— pass a larger public bound="
            )
        return self._frames(vec, spec, w, b)

    def _frames(self, vec: torch.Tensor, spec: UpdateSpec, weight: float, bound: float) -> Iterator[bytes]:
        p = self.preset
        layout = spec_fields(spec)
        n = vec.numel()
        header = {
            "format": "privfl-ckks",
            "version": 1,
            "kind": "update",
            "key_id": self.key_id,
            "preset": p.name,
            "scale_bits": p.scale_bits,
            "slots": p.slots,
            "chunk_values": p.chunk_values,
            "chunks": -(-n // p.chunk_values),
            **layout,
            "numel": n,
            "spec_id": _spec_id(layout["vector_dtype"], layout["entries"]),
            "bound": bound,
            "weight": weight,
        }
        yield _PAYLOAD_MAGIC + _frame(json.dumps(header, separators=(",", ":")).encode())
        factor = weight / bound
        for start in range(0, n, p.chunk_values):
            piece = vec[start : start + p.chunk_values].to(torch.float64).numpy() * factor
            yield _frame(self.encrypt_chunk(piece))

    def encrypt_chunk(self, values: np.ndarray) -> bytes:
        """Encrypt up to ``preset.chunk_values`` already scaled values (|v| <= 2**headroom_bits) into
        one serialized TenSEAL ``CKKSTensor``: ``ceil(len/slots)`` ciphertexts, ciphertext ``j`` holds
        values ``j, j+m, j+2m, …`` (``m`` ciphertexts), zero-padded."""
        values = np.asarray(values, dtype=np.float64).ravel()
        s = self.preset.slots
        m = -(-values.size // s)
        if m < 1 or m > self.preset.chunk_ciphertexts:
            raise ValueError(
                f"encrypt_chunk: {values.size} values; a chunk holds 1 to {self.preset.chunk_values}"
            )
        if values.size < m * s:
            values = np.concatenate([values, np.zeros(m * s - values.size)])
        # a (slots, 1) tensor is mis-encoded by TenSEAL 0.3.18's batching; one ciphertext goes in as 1-D
        plain = ts.plain_tensor(values if m == 1 else values.reshape(s, m))
        return ts.ckks_tensor(self.context, plain, scale=2.0**self.preset.scale_bits, batch=True).serialize()

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
            raise CKKSPayloadError(
                f"CKKSClient.decrypt: weight {divisor!r} in the header; cannot undo a zero weight"
            )
        out = np.empty(h["numel"], dtype=np.float64)
        cv = h["chunk_values"]
        for c, blob in enumerate(frames[1:]):
            start = c * cv
            count = min(cv, h["numel"] - start)
            out[start : start + count] = self.decrypt_chunk(blob, count)
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
            raise CKKSPayloadError(
                f"decrypt_chunk: chunk holds {values.size} values, expected at least {count}"
            )
        return values[:count]


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

    def __init__(
        self, server_context: bytes, n_threads: int | None = None, *, max_payload_bytes: int | None = None
    ):
        self.max_payload_bytes = max_payload_bytes
        self._seen: set[bytes] = set()
        self._open(
            server_context,
            "CKKSServer context",
            n_threads,
            secret=False,
            wrong_role="CKKSServer was given the client context (with the secret key); the server must "
            "only get CKKSKeys.server_context",
            wrong_key="CKKSServer context holds a secret key; refusing it",
        )

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
                        f"{what}: update layout (keys, shapes, dtypes; id {h['spec_id'][:8]}…) differs from "
                        f"payload {j}'s (id {h0['spec_id'][:8]}…) — clients must send updates of the same "
                        "structure"
                    )
                if h["bound"] != h0["bound"]:
                    raise CKKSPayloadError(
                        f"{what}: encoded with bound {h['bound']!r}, payload {j} with "
                        f"{h0['bound']!r}; all clients must use the same public bound"
                    )
                if h["chunk_values"] != h0["chunk_values"]:
                    raise CKKSPayloadError(f"{what}: chunked differently from payload {j}")
            parsed.append((i, h, frames))
        if not parsed:
            raise ValueError("CKKSServer.aggregate: every client dropped out; nothing to aggregate")
        weight_sum = math.fsum(float(h["weight"]) for _, h, _ in parsed)
        if not weight_sum > 0:
            raise ValueError("CKKSServer.aggregate: the clients that sent all have weight 0")
        if weight_sum > 1 + 1e-9:
            raise ValueError(
                f"CKKSServer.aggregate: the weights sum to {weight_sum!r} > 1; encoded sums could overflow"
            )
        h0 = parsed[0][1]
        out = [aggregate_head(h0, weight_sum, [i for i, _, _ in parsed])]
        for c in range(h0["chunks"]):
            out.append(
                _frame(
                    self.sum_chunks(
                        [frames[c + 1] for _, _, frames in parsed],
                        [f"payload {i} chunk {c}" for i, _, _ in parsed],
                    )
                )
            )
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

    def _check(
        self, payload: Any, weight: float | None, what: str
    ) -> tuple[dict[str, Any], list[memoryview], bytes]:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise CKKSPayloadError(f"{what}: expected bytes, got {type(payload).__name__}")
        check_payload_size(payload, self.max_payload_bytes, what)
        digest = hashlib.sha256(payload).digest()
        if digest in self._seen:
            raise CKKSPayloadError(
                f"{what}: identical to a payload aggregated in an earlier round (replayed)"
            )
        frames = _split(payload, _PAYLOAD_MAGIC, what)
        h = self._header(frames, what, kind="update")
        w = h.get("weight")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and 0 <= w <= 1):
            raise CKKSPayloadError(f"{what}: bad weight {w!r} in the header")
        if weight is not None and not math.isclose(w, weight, rel_tol=1e-9, abs_tol=1e-12):
            raise CKKSPayloadError(
                f"{what}: client encrypted with weight {w!r}, but the round's weight is {weight!r}"
            )
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
        bad = [e.name for e in spec.entries if not bool(finite[e.offset : e.offset + e.numel].all())]
        raise InvalidUpdateError(f"CKKSClient: update has NaN or inf values in {bad[:5]}")
    return vec


def _check_bound(bound: Any) -> float:
    if (
        isinstance(bound, bool)
        or not isinstance(bound, (int, float))
        or not math.isfinite(bound)
        or bound <= 0
    ):
        raise ValueError(
            f"CKKS bound must be a positive finite number (a public bound on |value|), got {bound!r}"
        )
    return float(bound)
