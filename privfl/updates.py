"""The one data type of privfl: a model update.

An *update* is a ``dict[str, torch.Tensor]`` shaped like a ``state_dict``: either a delta
(``new - old`` weights) or full weights. Every defense takes and returns one (or an opaque payload
whose aggregate is one). Code that needs a single vector (secure aggregation, homomorphic
encryption, clipping) uses :func:`flatten` / :func:`unflatten`.

Units: entries are in the units of the model's parameters/buffers (no rescaling anywhere in this
module); norms are plain Euclidean (L2) norms of those values, returned as Python ``float``.

Exactness guarantees
--------------------
* ``unflatten(*flatten(u))`` reproduces ``u`` **bitwise** (same keys in the same order, same
  shapes, dtypes and values, including ``-0.0``, subnormals and infinities) for every floating
  dtype up to 64 bits, ``bool`` and every integer dtype whose values fit the vector dtype exactly
  (see :func:`flatten`). The one exception is NaN: it stays NaN, but its sign and payload bits are
  not preserved (dtype conversions quiet/canonicalise NaNs; :func:`validate` rejects NaN anyway).
* :func:`weighted_mean` accumulates in float64 around the first update
  (``u0 + sum_i w_i (u_i - u0)``), so the mean of identical updates is exactly that update and the
  result has one final rounding to each entry's dtype.
* :func:`global_l2_norm` and :func:`per_key_l2_norms` accumulate in float64.

Integer entries (e.g. BatchNorm's ``num_batches_tracked``, int64) are carried along by every
function; where arithmetic makes them non-integral (scaling, averaging) the result is rounded to
the nearest integer (ties to even) and cast back to the entry's dtype. Norms ignore them: they are
buffers, not parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from privfl.errors import PrivflError

__all__ = [
    "Update",
    "InvalidUpdateError",
    "flatten_floating",
    "SpecEntry",
    "UpdateSpec",
    "spec_fields",
    "spec_from_fields",
    "flatten",
    "unflatten",
    "difference",
    "apply",
    "add",
    "scale",
    "zeros_like",
    "weighted_mean",
    "global_l2_norm",
    "per_key_l2_norms",
    "validate",
    "clone",
    "to",
]

Update = dict[str, torch.Tensor]
"""A model update: ``state_dict``-shaped mapping from parameter/buffer name to tensor."""

#: Largest magnitude up to which every integer is exactly representable in float64 / float32.
_F64_EXACT_INT = 2**53
_F32_EXACT_INT = 2**24


class InvalidUpdateError(PrivflError, ValueError):
    """An update is malformed or does not match what it is compared with.

    The message always names the offending key when there is one.
    """


# --------------------------------------------------------------------------------------------
# flatten / unflatten
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecEntry:
    """Where one entry of an update lives in the flat vector.

    ``vector[offset : offset + numel].view(shape)`` holds entry ``name`` (of dtype ``dtype``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int
    offset: int


@dataclass(frozen=True)
class UpdateSpec:
    """Layout of a flattened update: the entries in key order and the vector's dtype.

    Attributes:
        entries: one :class:`SpecEntry` per key, in the update's key order.
        dtype: dtype of the flat vector produced by :func:`flatten`.
    """

    entries: tuple[SpecEntry, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Total length of the flat vector."""
        if not self.entries:
            return 0
        last = self.entries[-1]
        return last.offset + last.numel

    @property
    def keys(self) -> tuple[str, ...]:
        """The update's keys, in vector order."""
        return tuple(e.name for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> SpecEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _int_bits(dtype: torch.dtype) -> int:
    """Number of magnitude bits of an integer dtype (so |v| < 2**bits for every value)."""
    info = torch.iinfo(dtype)
    return max(abs(info.min), info.max).bit_length()


def _exact_in_float32(dtype: torch.dtype) -> bool:
    """Whether *every* value of ``dtype`` is exactly representable in float32."""
    if dtype == torch.bool:
        return True
    if _is_float(dtype):
        return dtype != torch.float64 and dtype.itemsize <= 4
    return _int_bits(dtype) <= 24


def _check_int_range(name: str, t: torch.Tensor, limit: int, vec_dtype: torch.dtype) -> None:
    """Raise if some integer value of ``t`` has magnitude above ``limit`` (not exact in vec_dtype)."""
    if t.numel() == 0 or _int_bits(t.dtype) <= limit.bit_length() - 1:
        return
    info = torch.iinfo(t.dtype)
    hi = min(limit, info.max)
    lo = max(-limit, info.min)
    if bool(((t > hi) | (t < lo)).any()):
        raise InvalidUpdateError(
            f"update[{name!r}]: integer value with magnitude > 2**{limit.bit_length() - 1} "
            f"cannot be represented exactly in a {vec_dtype} vector"
        )


def flatten(
    update: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, UpdateSpec]:
    """Concatenate all entries of ``update`` (in key order) into one 1-D vector.

    Vector dtype (chosen so that :func:`unflatten` restores the update exactly):

    * ``torch.float64`` if any entry is float64, or an integer dtype not contained in float32
      (int32, int64, uint32, uint64);
    * ``torch.float32`` otherwise (float32, float16, bfloat16, bool, int8/uint8/int16/uint16 —
      all exactly representable in float32).

    Integer entries in a float64 vector are exact when ``|v| <= 2**53``; a larger value raises
    :class:`InvalidUpdateError` (it would be silently rounded). A typical ``state_dict`` with
    BatchNorm (``num_batches_tracked`` is int64) therefore flattens to float64. Pass
    ``dtype=torch.float32`` to force a float32 vector; this is accepted only when it is still
    exact: no float64 entry, and every integer value has ``|v| <= 2**24`` (checked by value).
    Complex entries are rejected.

    All entries must be on the same device; the vector is on that device (CPU for an empty update).

    Returns:
        ``(vector, spec)``; ``spec`` records name, shape, dtype, numel and offset of each entry.
    """
    _check_mapping(update)
    items = list(update.items())
    for name, t in items:
        _check_tensor(name, t)
        if t.dtype.is_complex:
            raise InvalidUpdateError(f"update[{name!r}]: complex dtype {t.dtype} is not supported")
    if dtype is None:
        dtype = torch.float32 if all(_exact_in_float32(t.dtype) for _, t in items) else torch.float64
    elif dtype not in (torch.float32, torch.float64):
        raise ValueError(f"flatten: vector dtype must be torch.float32 or torch.float64, got {dtype}")
    limit = _F64_EXACT_INT if dtype == torch.float64 else _F32_EXACT_INT
    for name, t in items:
        if dtype == torch.float32 and t.dtype == torch.float64:
            raise InvalidUpdateError(
                f"update[{name!r}]: float64 entry cannot be flattened exactly into a float32 vector"
            )
        if _is_int(t.dtype):
            _check_int_range(name, t, limit, dtype)

    device = items[0][1].device if items else torch.device("cpu")
    for name, t in items:
        if t.device != device:
            raise InvalidUpdateError(
                f"update[{name!r}]: on {t.device}, but flatten needs all entries on one device "
                f"(first entry {items[0][0]!r} is on {device})"
            )

    entries: list[SpecEntry] = []
    offset = 0
    for name, t in items:
        n = t.numel()
        entries.append(SpecEntry(name=name, shape=tuple(t.shape), dtype=t.dtype, numel=n, offset=offset))
        offset += n
    spec = UpdateSpec(entries=tuple(entries), dtype=dtype)
    if not items:
        return torch.zeros(0, dtype=dtype, device=device), spec
    vec = torch.cat([t.detach().reshape(-1).to(dtype) for _, t in items])
    return vec, spec


def unflatten(vector: torch.Tensor, spec: UpdateSpec) -> Update:
    """Inverse of :func:`flatten`: split ``vector`` back into an update laid out as ``spec``.

    Each entry gets its original shape and dtype and lives on ``vector``'s device; entries are
    fresh tensors (they do not alias ``vector``). Integer entries are rounded to the nearest
    integer (ties to even) before the cast, so an aggregated vector yields integral buffers; for a
    vector produced by :func:`flatten` this is a no-op and the round trip is bitwise exact. ``bool``
    entries are ``value != 0``.

    ``vector`` may have any real dtype (e.g. float64 after an aggregation), but its length must be
    ``spec.numel``.

    Raises:
        InvalidUpdateError: ``vector`` is not 1-D or its length differs from ``spec.numel``.
    """
    if not isinstance(vector, torch.Tensor):
        raise InvalidUpdateError(f"unflatten: expected a torch.Tensor, got {type(vector).__name__}")
    if vector.dim() != 1:
        raise InvalidUpdateError(f"unflatten: expected a 1-D vector, got shape {tuple(vector.shape)}")
    if vector.numel() != spec.numel:
        raise InvalidUpdateError(
            f"unflatten: vector has {vector.numel()} elements but the spec describes {spec.numel}"
        )
    out: Update = {}
    for e in spec.entries:
        piece = vector[e.offset : e.offset + e.numel].view(e.shape)
        if e.dtype == torch.bool:
            out[e.name] = piece != 0
        elif _is_int(e.dtype) and vector.dtype.is_floating_point:
            out[e.name] = torch.round(piece).to(e.dtype)
        else:
            out[e.name] = piece.to(e.dtype, copy=True)
    return out


# --------------------------------------------------------------------------------------------
# structure checks
# --------------------------------------------------------------------------------------------


def _check_mapping(update: object, what: str = "update") -> None:
    if not isinstance(update, Mapping):
        raise InvalidUpdateError(f"{what}: expected a mapping str -> Tensor, got {type(update).__name__}")


def _check_tensor(name: str, t: object, what: str = "update") -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidUpdateError(f"{what}[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")


def _check_same_structure(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    a_name: str,
    b_name: str,
    *,
    allow_missing: bool = False,
) -> None:
    """``b`` must have the keys (or, with ``allow_missing``, a subset of the keys) and shapes of ``a``."""
    _check_mapping(a, a_name)
    _check_mapping(b, b_name)
    for k in b:
        if k not in a:
            raise InvalidUpdateError(f"{b_name}[{k!r}]: key is not in {a_name}")
    for k, ta in a.items():
        _check_tensor(k, ta, a_name)
        if k not in b:
            if allow_missing:
                continue
            raise InvalidUpdateError(f"{b_name}[{k!r}]: key is missing (present in {a_name})")
        tb = b[k]
        _check_tensor(k, tb, b_name)
        if ta.shape != tb.shape:
            raise InvalidUpdateError(
                f"{b_name}[{k!r}]: shape {tuple(tb.shape)} does not match {a_name}'s {tuple(ta.shape)}"
            )


def _round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a float result to ``dtype``, rounding to nearest (ties to even) for integer dtypes."""
    if dtype == torch.bool:
        return t != 0
    if _is_int(dtype) and t.dtype.is_floating_point:
        return torch.round(t).to(dtype)
    return t.to(dtype)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """Dtype used for arithmetic on entries of ``dtype``: float32 for <=32-bit floats, else float64."""
    if _is_float(dtype) and dtype != torch.float64:
        return torch.float32
    return torch.float64


# --------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------


def difference(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> Update:
    """``new - old`` per key (a delta), in ``new``'s key order and dtypes.

    Keys and shapes must match. Floating entries are subtracted in their own dtype (one rounding);
    integer entries exactly.

    Raises:
        InvalidUpdateError: keys or shapes differ (the message names the key).
    """
    _check_same_structure(new, old, "new", "old")
    out: Update = {}
    for k, tn in new.items():
        to = old[k]
        if to.dtype == tn.dtype:
            out[k] = (tn.detach() - to.detach()).to(tn.dtype)
        else:
            op = torch.promote_types(_opmath(tn.dtype), _opmath(to.dtype))
            out[k] = _round_to(tn.detach().to(op) - to.detach().to(op), tn.dtype)
    return out


def apply(
    base: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    scale: float = 1.0,
    *,
    allow_missing: bool = False,
) -> Update:
    """``base + scale * delta`` per key, in ``base``'s key order and dtypes.

    Floating entries are computed in float32 (float64 for float64 entries) and rounded once to the
    base dtype. Integer entries: exact integer addition when ``delta`` is integral and ``scale == 1``;
    otherwise computed in float64 and rounded to the nearest integer.

    Args:
        allow_missing: if True, keys of ``base`` absent from ``delta`` are copied unchanged (e.g. a
            partially shared update). Keys in ``delta`` but not in ``base`` are always an error.

    Raises:
        InvalidUpdateError: keys or shapes differ (the message names the key).
    """
    _check_same_structure(base, delta, "base", "delta", allow_missing=allow_missing)
    factor = float(scale)
    out: Update = {}
    for k, tb in base.items():
        tb = tb.detach()
        if k not in delta:
            out[k] = tb.clone()
            continue
        td = delta[k].detach().to(tb.device)
        if _is_int(tb.dtype) and not td.dtype.is_floating_point and factor == 1.0:
            out[k] = (tb + td.to(tb.dtype)).to(tb.dtype)
            continue
        op = torch.promote_types(_opmath(tb.dtype), _opmath(td.dtype))
        res = torch.add(tb.to(op), td.to(op), alpha=factor)
        out[k] = _round_to(res, tb.dtype)
    return out


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Update:
    """``a + b`` per key, in ``a``'s key order and dtypes (same as ``apply(a, b)``)."""
    return apply(a, b, 1.0)


def scale(update: Mapping[str, torch.Tensor], factor: float) -> Update:
    """``factor * update`` per key, in the entries' dtypes.

    Floating entries are multiplied in float32 (float64 for float64) and rounded once; integer
    entries are multiplied in float64 and rounded to the nearest integer; bool entries become
    ``value * factor != 0``.
    """
    _check_mapping(update)
    f = float(factor)
    out: Update = {}
    for k, t in update.items():
        _check_tensor(k, t)
        t = t.detach()
        out[k] = _round_to(t.to(_opmath(t.dtype)) * f, t.dtype)
    return out


def zeros_like(update: Mapping[str, torch.Tensor]) -> Update:
    """An update of zeros with the keys, shapes, dtypes and devices of ``update``."""
    _check_mapping(update)
    out: Update = {}
    for k, t in update.items():
        _check_tensor(k, t)
        out[k] = torch.zeros_like(t, memory_format=torch.contiguous_format)
    return out


def _normalized_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if n == 0:
        raise ValueError("weighted_mean: no updates given")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weighted_mean: {n} updates but {len(w)} weights")
    for i, x in enumerate(w):
        if not math.isfinite(x):
            raise ValueError(f"weighted_mean: weight {i} is not finite ({x})")
        if x < 0:
            raise ValueError(f"weighted_mean: weight {i} is negative ({x})")
    total = math.fsum(w)
    if total <= 0:
        raise ValueError("weighted_mean: all weights are zero")
    return [x / total for x in w]


def weighted_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> Update:
    """Weighted average ``sum_i w_i u_i / sum_i w_i`` of updates with identical structure.

    Weights (default: uniform) must be finite and non-negative with a positive sum; they are
    normalized to sum 1. Computation is in float64, as ``u_0 + sum_i w_i (u_i - u_0)`` (so the mean
    of identical updates is exactly that update), then cast back to each entry's dtype (integer
    entries rounded to nearest, ties to even). The result is on the first update's devices; other
    updates are moved there.

    Raises:
        ValueError: empty ``updates``, weight count mismatch, negative / non-finite / all-zero
            weights.
        InvalidUpdateError: an update's keys, shapes or dtypes differ from the first's (the message
            names the key and the update's index).
    """
    updates = list(updates)
    w = _normalized_weights(len(updates), weights)
    first = updates[0]
    _check_mapping(first, "updates[0]")
    for i, u in enumerate(updates[1:], start=1):
        _check_same_structure(first, u, "updates[0]", f"updates[{i}]")
        for k, t0 in first.items():
            if u[k].dtype != t0.dtype:
                raise InvalidUpdateError(
                    f"updates[{i}][{k!r}]: dtype {u[k].dtype} does not match updates[0]'s {t0.dtype}"
                )
    if len(updates) == 1:
        _check_same_structure(first, first, "updates[0]", "updates[0]")
    out: Update = {}
    for k, t0 in first.items():
        ref = t0.detach().to(torch.float64)
        acc = torch.zeros_like(ref)
        for wi, u in zip(w, updates):
            if wi == 0.0 or u is first:
                continue
            acc.add_(u[k].detach().to(device=ref.device, dtype=torch.float64) - ref, alpha=wi)
        # where(): adding an all-zero correction must not turn -0.0 into +0.0
        out[k] = _round_to(torch.where(acc == 0, ref, ref + acc), t0.dtype)
    return out


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


def _float_items(update: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    _check_mapping(update)
    items = []
    for k, t in update.items():
        _check_tensor(k, t)
        if t.dtype.is_floating_point:
            items.append((k, t))
    return items


def _key_norms(items: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor | None]:
    names: list[str] = []
    norms: list[torch.Tensor] = []
    for k, t in items:
        names.append(k)
        norms.append(torch.linalg.vector_norm(t.detach(), dtype=torch.float64))
    if not norms:
        return names, None
    dev = norms[0].device
    return names, torch.stack([n.to(dev) for n in norms])


def global_l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm of all **floating** entries joined into one vector, in float64.

    Integer and bool entries (buffers such as ``num_batches_tracked``) are ignored: they are not
    trainable parameters. Returns 0.0 when there is no floating entry. The value is the L2 norm in
    the parameters' own units, as a Python float (one device sync).
    """
    _, norms = _key_norms(_float_items(update))
    if norms is None:
        return 0.0
    return float(torch.linalg.vector_norm(norms))


def per_key_l2_norms(update: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of each **floating** entry (float64 accumulation), in key order.

    Non-floating entries are omitted, so ``sum(v**2 for v in per_key_l2_norms(u).values())``
    equals ``global_l2_norm(u)**2`` up to rounding.
    """
    names, norms = _key_norms(_float_items(update))
    if norms is None:
        return {}
    values = norms.cpu().tolist()
    return dict(zip(names, values))


# --------------------------------------------------------------------------------------------
# validation and movement
# --------------------------------------------------------------------------------------------


def validate(
    update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    allow_missing: bool = False,
) -> None:
    """Check that ``update`` is a well-formed update compatible with ``reference``.

    Checks, in this order, each raising :class:`InvalidUpdateError` whose message names the key:

    1. ``update`` is a mapping and no key is absent from ``reference`` (extra key);
    2. every key of ``reference`` is present (missing key), unless ``allow_missing``;
    3. per key: the value is a ``torch.Tensor``; same shape; same dtype; same device as the
       reference entry (device is a separate check, after shape and dtype);
    4. no NaN or Inf in floating entries (one device sync for the whole update when all finite).
    """
    _check_mapping(update)
    _check_mapping(reference, "reference")
    for k in update:
        if k not in reference:
            raise InvalidUpdateError(f"update[{k!r}]: unexpected key (not in the reference)")
    if not allow_missing:
        for k in reference:
            if k not in update:
                raise InvalidUpdateError(f"update[{k!r}]: missing key (present in the reference)")
    floats: list[tuple[str, torch.Tensor]] = []
    for k, t in update.items():
        ref = reference[k]
        _check_tensor(k, ref, "reference")
        _check_tensor(k, t)
        if t.shape != ref.shape:
            raise InvalidUpdateError(
                f"update[{k!r}]: shape {tuple(t.shape)} does not match the reference {tuple(ref.shape)}"
            )
        if t.dtype != ref.dtype:
            raise InvalidUpdateError(
                f"update[{k!r}]: dtype {t.dtype} does not match the reference {ref.dtype}"
            )
        if t.device != ref.device:
            raise InvalidUpdateError(
                f"update[{k!r}]: device {t.device} does not match the reference {ref.device}"
            )
        if t.dtype.is_floating_point:
            floats.append((k, t))
    if not floats:
        return
    flags = [torch.isfinite(t.detach()).all() for _, t in floats]
    dev = flags[0].device
    ok = torch.stack([f.to(dev) for f in flags])
    if bool(ok.all()):
        return
    for (k, t), f in zip(floats, ok.cpu().tolist()):
        if not f:
            d = t.detach()
            n_nan = int(torch.isnan(d).sum())
            n_inf = int(torch.isinf(d).sum())
            raise InvalidUpdateError(f"update[{k!r}]: non-finite values ({n_nan} NaN, {n_inf} Inf)")


def clone(update: Mapping[str, torch.Tensor]) -> Update:
    """Detached copies of all entries (same keys, order, dtypes, devices)."""
    _check_mapping(update)
    out: Update = {}
    for k, t in update.items():
        _check_tensor(k, t)
        out[k] = t.detach().clone()
    return out


def to(
    update: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Update:
    """Move entries to ``device`` and/or convert **floating** entries to ``dtype``.

    Integer and bool entries keep their dtype (only moved). Returns new tensors only where
    something changes (like ``Tensor.to``); entries are detached.

    Raises:
        ValueError: ``dtype`` is not a floating dtype.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"to: dtype must be a floating dtype, got {dtype}")
    _check_mapping(update)
    out: Update = {}
    for k, t in update.items():
        _check_tensor(k, t)
        t = t.detach()
        if dtype is not None and t.dtype.is_floating_point:
            out[k] = t.to(device=device, dtype=dtype)
        else:
            out[k] = t.to(device=device)
    return out


def flatten_floating(update: object, what: str, *, finite: bool = True) -> tuple[torch.Tensor, UpdateSpec]:
    """:func:`flatten` for privacy defenses: ``update`` must be a ``dict[str, Tensor]`` of floating
    entries only (integer buffers would pass unprotected) and, with ``finite``, free of NaN/inf.
    ``what`` names the caller in the :class:`InvalidUpdateError` messages."""
    if not isinstance(update, dict):
        raise InvalidUpdateError(f"{what}: expected a dict[str, Tensor] update, got {type(update).__name__}")
    for k, t in update.items():
        if not isinstance(t, torch.Tensor):
            raise InvalidUpdateError(f"{what}: update[{k!r}] is {type(t).__name__}, not a Tensor")
        if not t.dtype.is_floating_point:
            raise InvalidUpdateError(
                f"{what}: update[{k!r}] has dtype {t.dtype}; only floating entries are protected — "
                "drop integer/bool buffers (e.g. num_batches_tracked) from the update first"
            )
    vec, spec = flatten(update)
    if finite and not bool(torch.isfinite(vec).all()):
        bad = [k for k, t in update.items() if not bool(torch.isfinite(t).all())]
        raise InvalidUpdateError(f"{what}: update has NaN or inf values in {bad[:5]}")
    return vec, spec


def spec_fields(spec: UpdateSpec) -> dict[str, Any]:
    """The layout as JSON-ready fields: ``vector_dtype``, ``entries`` (``[name, shape, dtype]`` per
    entry) and ``numel`` — public metadata, e.g. to send next to an encrypted or masked vector."""
    entries = [[e.name, list(e.shape), str(e.dtype).removeprefix("torch.")] for e in spec.entries]
    return {"vector_dtype": str(spec.dtype).removeprefix("torch."), "entries": entries, "numel": spec.numel}


def spec_from_fields(fields: Mapping[str, Any], what: str = "layout") -> UpdateSpec:
    """Inverse of :func:`spec_fields` for floating layouts (other keys of ``fields`` are ignored).

    Raises:
        InvalidUpdateError: missing or malformed fields, a non-floating dtype, or a ``numel`` that
            does not match the entries.
    """
    entries: list[SpecEntry] = []
    offset = 0
    try:
        for name, shape, dtype in fields["entries"]:
            shape_t = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape_t):
                raise ValueError(f"negative dimension in {shape_t}")
            numel = math.prod(shape_t)
            entries.append(SpecEntry(str(name), shape_t, _float_dtype(dtype, what), numel, offset))
            offset += numel
        spec = UpdateSpec(tuple(entries), _float_dtype(fields["vector_dtype"], what))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, InvalidUpdateError):
            raise
        raise InvalidUpdateError(f"{what}: malformed update layout ({e})") from None
    if spec.numel != fields.get("numel"):
        raise InvalidUpdateError(f"{what}: says {fields.get('numel')} values, its entries {spec.numel}")
    return spec


def _float_dtype(name: object, what: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidUpdateError(f"{what}: {name!r} is not a floating torch dtype")
    return dtype
