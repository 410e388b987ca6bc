"""privfl payloads, states and round contexts as Flower records, and back — with validation, so that
a malformed message is rejected with a reason instead of crashing the round.

Wire format (one :class:`flwr.app.RecordDict` per message):

* ``"privfl.state"`` (ArrayRecord): a full model state or a plain update (``dict`` payload).
* ``"privfl.bytes"`` (ConfigRecord ``{"payload": bytes}``): an opaque payload (CKKS ciphertext,
  masked vector).
* ``"privfl.ctx"`` (ConfigRecord): the :class:`~privfl.defenses.base.RoundContext` of the round —
  ``round``, ``num_clients``, ``sampled``, ``weights``, ``seed``, ``sampling_rate`` and, in a message
  to one client, ``client_id``.
* ``"privfl.aggregate"`` (ConfigRecord ``{"ciphertext": bytes}``): under CKKS, the encrypted mean
  update of the last round, sent instead of the state (the server cannot decrypt it).
* ``"privfl.metrics"`` (MetricRecord): ``num-examples``, ``train_loss``, ``client_id`` from a client.
* ``"privfl.secagg"`` (ConfigRecord): an exchange of an ``"interactive"`` aggregator (secure
  aggregation) — ``{"step", "message"}`` from the server (a ``query``), ``{"message"}`` in the reply
  (protocol bytes, e.g. of :mod:`privfl.defenses.secagg.protocol`).
* ``"privfl.layout"`` (ConfigRecord ``{"layout": JSON}``): next to an opaque payload (masked input,
  ciphertext), the names, shapes and dtypes of the update (public), so the server can unflatten the
  mean or account its release.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from privfl.defenses.base import Payload, RoundContext
from privfl.errors import PayloadTooLargeError, PrivflError, check_payload_size
from privfl.updates import InvalidUpdateError, Update, UpdateSpec, spec_fields, spec_from_fields

STATE = "privfl.state"
BYTES = "privfl.bytes"
CTX = "privfl.ctx"
AGGREGATE = "privfl.aggregate"
METRICS = "privfl.metrics"
SECAGG = "privfl.secagg"
LAYOUT = "privfl.layout"
_T = TypeVar("_T")


class MalformedPayloadError(PrivflError, ValueError):
    """A client's reply cannot be decoded into a privfl payload; ``reason`` says why."""


def state_to_record(update: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An update or model state as an ArrayRecord (CPU numpy copies; key order kept)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in update.items()})


def record_to_state(record: ArrayRecord) -> Update:
    """An ArrayRecord as ``{name: float32/int tensor}`` (copies; dtypes as sent)."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def payload_to_content(payload: Payload) -> RecordDict:
    """A client's protected payload as message content."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return RecordDict({BYTES: ConfigRecord({"payload": bytes(payload)})})
    if isinstance(payload, Mapping):
        return RecordDict({STATE: state_to_record(payload)})
    raise TypeError(f"cannot send a payload of type {type(payload).__name__}")


def content_to_payload(
    content: RecordDict, expected: Mapping[str, torch.Tensor] | None = None, max_bytes: int | None = None
) -> Payload:
    """The payload in a client's reply. With ``expected`` (the global state), a dict payload must use
    only its keys with its shapes and finite values. With ``max_bytes``, a payload larger than that
    (bytes, or the arrays' total size) is refused before it is decoded.

    Raises:
        MalformedPayloadError: no payload, both kinds, wrong types, unknown keys, wrong shapes,
            non-finite values.
        PayloadTooLargeError: beyond ``max_bytes``.
    """
    has_state, has_bytes = STATE in content.array_records, BYTES in content.config_records
    if has_state == has_bytes:
        raise MalformedPayloadError("the reply must carry exactly one of 'privfl.state' or 'privfl.bytes'")
    if has_bytes:
        blob = content.config_records[BYTES].get("payload")
        if not isinstance(blob, bytes) or not blob:
            raise MalformedPayloadError("'privfl.bytes' must hold a non-empty bytes value 'payload'")
        check_payload_size(blob, max_bytes, "'privfl.bytes' payload")
        return blob
    size = sum(len(a.data) for a in content.array_records[STATE].values())
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLargeError(
            f"'privfl.state' payload: {size} bytes exceed the limit of {max_bytes} bytes"
        )
    try:
        update = record_to_state(content.array_records[STATE])
    except Exception as e:  # noqa: BLE001 - any decoding failure is a malformed payload
        raise MalformedPayloadError(f"cannot decode 'privfl.state': {e}") from e
    if not update:
        raise MalformedPayloadError("'privfl.state' is empty")
    if expected is not None:
        unknown = [k for k in update if k not in expected]
        if unknown:
            raise MalformedPayloadError(f"unknown entries {unknown[:3]} (not in the global model)")
        for k, v in update.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise MalformedPayloadError(
                    f"'{k}' has shape {tuple(v.shape)}, the model's is {tuple(expected[k].shape)}"
                )
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise MalformedPayloadError(f"'{k}' has non-finite values")
    return update


def context_to_record(ctx: RoundContext) -> ConfigRecord:
    """A round context as a ConfigRecord (``extra`` is not sent)."""
    rec: dict[str, Any] = {
        "round": ctx.round,
        "num_clients": ctx.num_clients,
        "sampled": list(ctx.sampled),
        "weights": [float(w) for w in ctx.weights],
        "seed": int(ctx.seed),
        "sampling_rate": float(ctx.sampling_rate),
    }
    if ctx.client_id is not None:
        rec["client_id"] = int(ctx.client_id)
    return ConfigRecord(rec)


def record_value(rec: Mapping[str, Any], key: str, kind: type[_T] | tuple[type, ...], what: str) -> _T:
    """``rec[key]``, checked to be of ``kind`` (``bool`` never passes for a number).

    Raises:
        MalformedPayloadError: missing, or of another type.
    """
    value = rec.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise MalformedPayloadError(f"{what}: {key!r} must be {names}, got {type(value).__name__}")
    return value  # type: ignore[return-value]  # checked against kind just above


def record_to_context(rec: ConfigRecord) -> RoundContext:
    """Inverse of :func:`context_to_record`; raises :class:`MalformedPayloadError` on a bad record."""
    what = "bad 'privfl.ctx'"

    def number(key: str) -> float:
        return record_value(rec, key, (int, float), what)

    def numbers(key: str) -> list[float]:
        values: list[Any] = record_value(rec, key, list, what)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise MalformedPayloadError(f"{what}: {key!r} must be a list of numbers")
        return values

    try:
        return RoundContext(
            round=int(number("round")),
            num_clients=int(number("num_clients")),
            sampled=tuple(int(c) for c in numbers("sampled")),
            weights=tuple(float(w) for w in numbers("weights")),
            client_id=int(number("client_id")) if "client_id" in rec else None,
            seed=int(number("seed")),
            sampling_rate=float(number("sampling_rate")),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, MalformedPayloadError):
            raise
        raise MalformedPayloadError(f"{what}: {e}") from e


def layout_to_record(spec: UpdateSpec) -> ConfigRecord:
    """An update's layout (names, shapes, dtypes; public) as a ConfigRecord."""
    return ConfigRecord({"layout": json.dumps(spec_fields(spec), separators=(",", ":"))})


def record_to_layout(content: RecordDict) -> UpdateSpec:
    """The layout of the update in a client's reply whose payload is opaque."""
    rec = content.config_records.get(LAYOUT)
    if rec is None or not isinstance(rec.get("layout"), str):
        raise MalformedPayloadError("an opaque payload arrived without its 'privfl.layout'")
    try:
        return spec_from_fields(
            json.loads(record_value(rec, "layout", str, "'privfl.layout'")), "'privfl.layout'"
        )
    except (json.JSONDecodeError, InvalidUpdateError, AttributeError) as e:
        raise MalformedPayloadError(f"bad 'privfl.layout': {e}") from e
