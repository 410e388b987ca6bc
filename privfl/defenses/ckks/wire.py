"""The CKKS wire format: framed envelopes for payloads and contexts, their JSON headers, and
:class:`CKKSPayloadError` for anything malformed.

An envelope is an 8-byte magic (format and version) followed by frames, each a little-endian uint64
length and that many bytes. A payload (one client's update, or an aggregate) is a JSON header frame
then one frame per chunk (a serialized TenSEAL ``CKKSTensor``); a context is a JSON header frame then
the serialized TenSEAL context. :func:`payload_header` reads a payload's header without any key.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict
from typing import Any

from privfl.defenses.ckks.presets import CKKSPreset, _preset_from_json
from privfl.errors import PrivflError
from privfl.updates import InvalidUpdateError, UpdateSpec, spec_from_fields

__all__ = ["CKKSPayloadError", "aggregate_head", "payload_header"]

_PAYLOAD_MAGIC = b"PFCKKS\x00\x01"  # privfl CKKS payload, format version 1
_CONTEXT_MAGIC = b"PFCKCTX\x01"  # privfl CKKS context envelope, version 1
_FRAME = struct.Struct("<Q")  # every frame: little-endian uint64 length, then that many bytes


class CKKSPayloadError(PrivflError, ValueError):
    """A payload or context is malformed, or does not match the others (key, layout, bound, weight)."""


def _frame(data: bytes) -> bytes:
    return _FRAME.pack(len(data)) + data


def _split(buf: Any, magic: bytes, what: str) -> list[memoryview]:
    """The frames of an envelope (``magic`` + length-prefixed frames), as zero-copy views."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise CKKSPayloadError(f"{what}: expected bytes, got {type(buf).__name__}")
    mv = memoryview(buf).cast("B")
    if len(mv) < len(magic) or bytes(mv[: len(magic)]) != magic:
        raise CKKSPayloadError(
            f"{what}: not a privfl CKKS {'payload' if magic == _PAYLOAD_MAGIC else 'context'} "
            "(bad magic bytes or unsupported format version)"
        )
    frames: list[memoryview] = []
    pos = len(magic)
    while pos < len(mv):
        if pos + _FRAME.size > len(mv):
            raise CKKSPayloadError(f"{what}: truncated (frame header cut at byte {pos})")
        (n,) = _FRAME.unpack_from(mv, pos)
        pos += _FRAME.size
        if pos + n > len(mv):
            raise CKKSPayloadError(
                f"{what}: truncated (frame of {n} bytes at byte {pos}, only {len(mv) - pos} left)"
            )
        frames.append(mv[pos : pos + n])
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


def _context_envelope(preset: CKKSPreset, key_id: str, secret: bool, raw: bytes) -> bytes:
    header = {
        "format": "privfl-ckks-context",
        "version": 1,
        "key_id": key_id,
        "secret": secret,
        "preset": asdict(preset),
    }
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


def payload_header(payload: bytes | bytearray | memoryview, what: str = "payload") -> dict[str, Any]:
    """The public JSON header of a CKKS payload or aggregate (layout, ``numel``, ``contributors``,
    …), read without any key and without checking the ciphertexts."""
    return _json(_split(payload, _PAYLOAD_MAGIC, what)[0], what)


def aggregate_head(client_header: dict[str, Any], weight_sum: float, contributors: list[int]) -> bytes:
    """Magic and header frame of an aggregate payload, from one contributor's (validated) header."""
    header = {
        k: client_header[k]
        for k in (
            "format",
            "version",
            "key_id",
            "preset",
            "scale_bits",
            "slots",
            "chunk_values",
            "chunks",
            "numel",
            "vector_dtype",
            "entries",
            "spec_id",
            "bound",
        )
    }
    header.update(kind="aggregate", weight_sum=weight_sum, contributors=contributors)
    return _PAYLOAD_MAGIC + _frame(json.dumps(header, separators=(",", ":")).encode())
