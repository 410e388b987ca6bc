"""Partial sharing: each client sends only part of its update and keeps the rest of its model local.

Two ways to choose what is shared (give exactly one):

* **By parameter name** — ``PartialSharing(share=["global_branch.*", "local_branch.*"])`` shares
  the entries whose names match one of the ``fnmatch`` patterns (case-sensitive, matched against
  the whole key) and keeps every other entry local for good. With DHU-Net this shares both encoders
  and keeps the decoder (``fuse*``, heads) on each client, as FLOP and LG-FedAvg (Li et al. 2019,
  "Think locally, act globally", which keeps the representation local) do with their split of the
  network. The payload is a *smaller* dict with only the shared keys; the aggregate has only those
  keys, so the global values of the other keys never change.
* **By fraction per round** — ``PartialSharing(fraction=θ)`` (Shokri & Shmatikov 2015, "Privacy-
  preserving deep learning", selective parameter sharing) shares ``k = ⌈θ·d⌉`` of the ``d``
  coordinates of the (all-floating) update each round: the ``k`` largest ``|delta|`` over all
  entries joined (``select="topk"``) or ``k`` drawn uniformly (``select="random"``). The payload
  has every key, with the unshared coordinates set to zero.

What a client does not share stays local and is merged back on the client: :meth:`protect`
remembers, per client id, ``start + delta`` for the unshared keys (coordinates), where ``start`` is
the state :meth:`personalize` handed the client before it trained. :meth:`personalize` returns the
global state with this client's kept values put back (whole keys, or single coordinates in fraction
mode); before a client's first ``protect`` it returns the global state. In a real deployment this
object lives on each client (one per client) and only :meth:`aggregate` runs on the server; privfl's
simulation holds all clients' memories in one object, keyed by client id.

Threat model
------------
Partial sharing is **not** a privacy guarantee and privfl reports no privacy number for it. It
reduces what is sent, not what can be inferred from what is sent:

* The shared part travels in the clear (unless a later stage protects it). Gradient inversion
  (e.g. Geiping et al. 2020) on the shared encoder layers still reconstructs images: the first
  layers carry most of the input information. Membership inference on the shared part still works.
* In fraction mode with ``select="topk"`` the *selection itself* is data-dependent: which
  coordinates are the largest leaks information about the client's data, on top of their values.
  ``select="random"`` is data-independent; its choice is seeded from (seed, round, client) with
  :func:`~privfl.seeding.derive_seed` and is **not secret** (anyone who knows the seed knows
  which coordinates were shared) — it does not need to be, since it says nothing about the data.
* The local part is exposed to whoever sees the client's model (the deployed personalised model,
  the client's machine, checkpoints — see :meth:`state_dict`).

For a guarantee, compose with DP and/or secure aggregation, with partial sharing **first**::

    Compose(PartialSharing(share=["global_branch.*", "local_branch.*"]),
            ClipUpdate(max_norm=0.05), GaussianMechanism(noise_multiplier=1.0))

Clipping and noise then apply to the shared part only (its norm is the sensitivity), and the DP
guarantee covers the whole payload — including a data-dependent top-k selection, since clipping
bounds the sensitivity of any function of the client's data. It covers nothing that stays local.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Any, Literal

import torch

from privfl.defenses.base import Defense, Payload, RoundContext
from privfl.seeding import torch_generator
from privfl.updates import InvalidUpdateError, Update, apply, flatten, weighted_mean

Selection = Literal["topk", "random"]
SELECTIONS = ("topk", "random")

__all__ = ["PartialSharing", "shared_count", "topk_mask", "random_mask"]


def shared_count(fraction: float, numel: int) -> int:
    """How many of ``numel`` coordinates a fraction ``θ`` shares: ``⌈θ·numel⌉``, at least 1.

    ``θ`` is read as the shortest decimal that prints as the float (``0.1`` is exactly 1/10), so
    float rounding cannot add a coordinate: ``shared_count(0.1, 30) == 3`` (not 4) and
    ``shared_count(0.3, 10) == 3``.
    """
    if numel <= 0:
        return 0
    k = math.ceil(Fraction(repr(float(fraction))) * numel)
    return min(numel, max(1, k))


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` entries of the 1-D ``values`` with the largest ``|value|``.

    Ties at the threshold are broken by position: the lowest indices win, so the result is
    deterministic (the same as a stable descending sort of ``|values|`` and taking the first ``k``).
    Linear time (``kthvalue``), no full sort.
    """
    d = values.numel()
    if not 0 <= k <= d:
        raise ValueError(f"topk_mask: k must be in [0, {d}], got {k}")
    if k == d:
        return torch.ones(d, dtype=torch.bool, device=values.device)
    if k == 0:
        return torch.zeros(d, dtype=torch.bool, device=values.device)
    mag = values.detach().abs()
    threshold = torch.kthvalue(mag, d - k + 1).values  # the k-th largest magnitude
    mask = mag > threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(mag == threshold).flatten()[:need]
        mask[ties] = True
    return mask


def random_mask(
    numel: int, k: int, *seed_parts: int | str, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean mask of ``k`` of ``numel`` positions drawn uniformly without replacement, from a CPU
    generator seeded with ``derive_seed(*seed_parts)`` (reproducible, not secret)."""
    if not 0 <= k <= numel:
        raise ValueError(f"random_mask: k must be in [0, {numel}], got {k}")
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=torch_generator(*seed_parts))[:k]] = True
    return mask.to(device) if device is not None else mask


@dataclass
class _Start:
    """What :meth:`PartialSharing.personalize` recorded for one client: the round and references to
    the global tensors it started from (with their in-place version counters)."""

    round: int
    refs: dict[str, torch.Tensor]
    versions: dict[str, int]


def _version(t: torch.Tensor) -> int:
    return int(getattr(t, "_version", 0))


class PartialSharing(Defense):
    """Share part of each client's update; keep the rest of its model local and merge it back.

    Args:
        share: ``fnmatch`` patterns of the parameter names to share (a single string is one
            pattern). Every pattern must match at least one key of the update (checked on first use).
        fraction: ``θ ∈ (0, 1]``: share ``⌈θ·d⌉`` of the ``d`` update coordinates each round (see
            :func:`shared_count`). Every entry of the update must be floating point.
        select: fraction mode only: ``"topk"`` (default) — the largest ``|delta|`` over all entries
            joined, ties broken by position (key order, then row-major; see :func:`topk_mask`);
            ``"random"`` — uniformly at random, seeded per (seed, round, client).
        seed: ``select="random"`` only: the seed of the selection; ``None`` uses the experiment seed
            ``ctx.seed``. Not secret (see the module docstring).

    Give exactly one of ``share`` and ``fraction``.

    Protocol per round (the order :func:`~privfl.fl.loop.run_federated` calls it in):

    1. client: ``start = personalize(global_state, ctx.for_client(c))`` — the global state with the
       client's kept values put back; records which global tensors the client starts from. The
       input is not mutated (kept entries are new tensors; the others are the global tensors).
    2. client: trains from ``start``; ``delta = trained − start``.
    3. client: ``payload = protect(delta, ctx.for_client(c))`` — remembers ``start + delta`` for what
       is not shared, returns what is shared. ``personalize`` must have been called for this client
       in this round, and the global tensors it saw must not have been modified in place since.
    4. server: ``aggregate(payloads, ctx)`` — weighted mean of the payloads (``None`` = a dropped
       client, skipped, the other weights renormalised).

    In pattern mode the aggregate has only the shared keys; applied with
    ``apply(global, mean, allow_missing=True)`` it leaves the other keys of the global state
    unchanged. In fraction mode it is the zero-filled weighted mean over all sampled clients, so a
    coordinate that only some clients shared moves by their weighted contribution only (it is
    shrunk towards zero by the clients that kept it local) — the same as Shokri & Shmatikov's server,
    which adds the shared gradients. A mean over the sharers only would need each client's selection
    mask in the clear next to its payload, which reveals the (top-k) selection and would be clipped,
    noised or encrypted along with the values by later stages; it is not offered. Note that each
    client's ``delta`` is relative to its *personalised* start, so a coordinate it kept local last
    round and shares this round contributes its local change, not ``local − global``.

    Threat model: no guarantee (see the module docstring) — the shared part leaks as it would
    without this defense, a top-k selection leaks which coordinates are largest, and the local part
    leaks to whoever sees the client's model. Compose with DP / secure aggregation for guarantees,
    with ``PartialSharing`` as the first stage.
    """

    def __init__(
        self,
        share: Sequence[str] | str | None = None,
        *,
        fraction: float | None = None,
        select: Selection | None = None,
        seed: int | None = None,
    ):
        if (share is None) == (fraction is None):
            raise ValueError(
                "PartialSharing: give exactly one of share= (name patterns) or fraction= (θ per round)"
            )
        self.patterns: tuple[str, ...] | None = None
        self.fraction: float | None = None
        self.select: Selection | None = None
        self.seed: int | None = None
        if share is not None:
            patterns = (share,) if isinstance(share, str) else tuple(share)
            if not patterns:
                raise ValueError("PartialSharing: share= is empty, so nothing would be shared")
            for p in patterns:
                if not isinstance(p, str) or not p:
                    raise TypeError(f"PartialSharing: share= patterns must be non-empty strings, got {p!r}")
            if select is not None or seed is not None:
                raise ValueError("PartialSharing: select= and seed= only apply to fraction= mode")
            self.patterns = patterns
        else:
            if isinstance(fraction, bool):
                raise TypeError("PartialSharing: fraction must be a number in (0, 1], got a bool")
            try:
                theta = float(fraction)  # type: ignore[arg-type]
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"PartialSharing: fraction must be a number in (0, 1], got {fraction!r}"
                ) from err
            if not (math.isfinite(theta) and 0 < theta <= 1):
                raise ValueError(f"PartialSharing: fraction must be in (0, 1], got {fraction!r}")
            select = "topk" if select is None else select
            if select not in SELECTIONS:
                raise ValueError(f"PartialSharing: select must be one of {SELECTIONS}, got {select!r}")
            if seed is not None and select != "random":
                raise ValueError("PartialSharing: seed= only applies to select='random'")
            self.fraction = theta
            self.select = select
            self.seed = None if seed is None else int(seed)
        # client id -> kept-local values (pattern mode: whole entries; fraction mode: dense entries
        # whose kept coordinates are given by _masks, zero elsewhere)
        self._kept: dict[int, Update] = {}
        self._masks: dict[int, dict[str, torch.Tensor]] = {}
        self._start: dict[int, _Start] = {}

    # ---------------------------------------------------------------- helpers

    @property
    def mode(self) -> Literal["share", "fraction"]:
        """``"share"`` (by parameter-name patterns) or ``"fraction"`` (by coordinates per round)."""
        return "share" if self.patterns is not None else "fraction"

    def is_shared(self, key: str) -> bool:
        """Pattern mode: whether entry ``key`` is shared (matches one of the patterns)."""
        if self.patterns is None:
            raise ValueError("PartialSharing.is_shared: only defined in share= (pattern) mode")
        return any(fnmatchcase(key, p) for p in self.patterns)

    def shared_keys(self, keys: Sequence[str] | Mapping[str, Any]) -> list[str]:
        """Pattern mode: the keys (in order) that are shared. Raises ``ValueError`` if a pattern matches
        none of ``keys``."""
        keys = list(keys)
        if self.patterns is None:
            raise ValueError("PartialSharing.shared_keys: only defined in share= (pattern) mode")
        unmatched = [p for p in self.patterns if not any(fnmatchcase(k, p) for k in keys)]
        if unmatched:
            sample = ", ".join(repr(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
            raise ValueError(
                f"PartialSharing: share= pattern(s) {unmatched} match no parameter name "
                f"(names look like {sample or 'nothing: the update is empty'})"
            )
        return [k for k in keys if self.is_shared(k)]

    @staticmethod
    def _client(ctx: RoundContext, what: str) -> int:
        if ctx.client_id is None:
            raise ValueError(f"PartialSharing.{what} runs on a client: pass ctx.for_client(client_id)")
        return ctx.client_id

    def _kept_entry(self, cid: int, key: str, glob: torch.Tensor) -> torch.Tensor | None:
        """This client's value of entry ``key`` when it starts from ``glob`` (``None``: nothing kept)."""
        kept = self._kept.get(cid, {})
        if key not in kept:
            return None
        value = kept[key]
        if value.shape != glob.shape:
            raise InvalidUpdateError(
                f"PartialSharing: client {cid} kept {key!r} with shape {tuple(value.shape)}, "
                f"but the global state has {tuple(glob.shape)}"
            )
        value = value.to(device=glob.device, dtype=glob.dtype)
        if self.patterns is not None:
            return value.clone()
        mask = self._masks[cid][key].to(glob.device)
        return torch.where(mask, value, glob.detach())

    # ---------------------------------------------------------------- client side

    def personalize(self, global_state: Update, ctx: RoundContext) -> Update:
        """The state client ``ctx.client_id`` trains from: ``global_state`` with the client's kept
        values put back (a new dict; ``global_state`` and its tensors are not modified)."""
        cid = self._client(ctx, "personalize")
        if not isinstance(global_state, Mapping):
            raise InvalidUpdateError(
                f"PartialSharing.personalize: expected a dict of tensors, got {type(global_state).__name__}"
            )
        missing = [k for k in self._kept.get(cid, {}) if k not in global_state]
        if missing:
            raise InvalidUpdateError(
                f"PartialSharing: client {cid} kept {missing[:5]} locally, but the global "
                "state has no such entries"
            )
        if self.patterns is not None:
            shared = set(self.shared_keys(global_state))
            local_keys = [k for k in global_state if k not in shared]
        else:
            local_keys = list(global_state)
        out: Update = dict(global_state)
        for k in self._kept.get(cid, {}):
            value = self._kept_entry(cid, k, global_state[k])
            if value is not None:
                out[k] = value
        refs = {k: global_state[k] for k in local_keys}
        self._start[cid] = _Start(ctx.round, refs, {k: _version(t) for k, t in refs.items()})
        return out

    def _start_values(self, cid: int, keys: Sequence[str], ctx: RoundContext) -> dict[str, torch.Tensor]:
        """The values client ``cid`` started this round from, for ``keys`` (checked and consumed)."""
        start = self._start.pop(cid, None)
        if start is None or start.round != ctx.round:
            when = "never" if start is None else f"for round {start.round}"
            raise RuntimeError(
                f"PartialSharing.protect: client {cid} in round {ctx.round}, but personalize() was called "
                f"{when} for it this round; call defense.personalize(global_state, ctx.for_client({cid})) "
                "before the client trains (it needs the state the client starts from)"
            )
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            if k not in start.refs:
                raise InvalidUpdateError(
                    f"PartialSharing.protect: update[{k!r}] is not in the state passed to personalize()"
                )
            ref = start.refs[k]
            if _version(ref) != start.versions[k]:
                raise RuntimeError(
                    f"PartialSharing.protect: global_state[{k!r}] was modified in place between "
                    "personalize() and protect(); replace the global state, do not update it in place"
                )
            kept = self._kept_entry(cid, k, ref)
            out[k] = ref.detach() if kept is None else kept
        return out

    def protect(self, update: Update, ctx: RoundContext) -> Update:
        """Client side: remember the unshared part of ``start + update`` for this client and return the
        shared part (pattern mode: a dict with the shared keys; fraction mode: every key, unshared
        coordinates zero). ``update`` is not mutated."""
        cid = self._client(ctx, "protect")
        if not isinstance(update, Mapping):
            raise InvalidUpdateError(
                f"PartialSharing.protect: expected a dict of tensors, got {type(update).__name__}"
            )
        for k, t in update.items():
            if not isinstance(t, torch.Tensor):
                raise InvalidUpdateError(
                    f"PartialSharing.protect: update[{k!r}] is {type(t).__name__}, not a Tensor"
                )
        if self.patterns is not None:
            return self._protect_by_name(dict(update), cid, ctx)
        return self._protect_by_fraction(dict(update), cid, ctx)

    def _protect_by_name(self, update: Update, cid: int, ctx: RoundContext) -> Update:
        shared = set(self.shared_keys(update))
        local_keys = [k for k in update if k not in shared]
        start = self._start_values(cid, local_keys, ctx)
        delta = {k: update[k] for k in local_keys}
        self._kept[cid] = apply(start, delta) if local_keys else {}
        return {k: t.detach().clone() for k, t in update.items() if k in shared}

    def _protect_by_fraction(self, update: Update, cid: int, ctx: RoundContext) -> Update:
        for name, t in update.items():
            if not t.dtype.is_floating_point:
                raise InvalidUpdateError(
                    f"PartialSharing(fraction=...): update[{name!r}] has dtype {t.dtype}; coordinate "
                    "selection only applies to floating entries — drop integer buffers (e.g. "
                    "num_batches_tracked) first"
                )
        vec, spec = flatten(update)
        if vec.numel() == 0:
            raise InvalidUpdateError("PartialSharing(fraction=...): the update is empty, nothing to share")
        if not bool(torch.isfinite(vec).all()):
            bad = [k for k, t in update.items() if not bool(torch.isfinite(t).all())]
            raise InvalidUpdateError(
                f"PartialSharing(fraction=...): update has NaN or inf values in {bad[:5]}"
            )
        assert self.fraction is not None
        k = shared_count(self.fraction, vec.numel())
        if self.select == "topk":
            mask = topk_mask(vec, k)
        else:
            seed = ctx.seed if self.seed is None else self.seed
            mask = random_mask(vec.numel(), k, seed, ctx.round, cid, "PartialSharing", device=vec.device)
        start = self._start_values(cid, list(update), ctx)
        payload: Update = {}
        kept: Update = {}
        masks: dict[str, torch.Tensor] = {}
        for e in spec.entries:
            delta = update[e.name].detach()
            sent = mask[e.offset : e.offset + e.numel].view(e.shape).to(delta.device)
            payload[e.name] = torch.where(sent, delta, torch.zeros_like(delta))
            if not bool(sent.all()):
                local = apply({e.name: start[e.name]}, {e.name: delta})[e.name]
                keep = ~sent.to(local.device)
                kept[e.name] = torch.where(keep, local, torch.zeros_like(local))
                masks[e.name] = keep
        self._kept[cid] = kept
        self._masks[cid] = masks
        return payload

    def bind(self, before: Sequence[Defense], after: Sequence[Defense]) -> None:
        """Called by :class:`~privfl.defenses.base.Compose`: warn when a stage runs before this one
        (it would also transform the part kept local, e.g. clip it)."""
        if before:
            names = ", ".join(type(d).__name__ for d in before)
            warnings.warn(
                f"PartialSharing should be the first stage of a Compose: {names} before it also "
                "transform(s) the part each client keeps local",
                stacklevel=3,
            )

    # ---------------------------------------------------------------- server side

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        """Weighted mean of the payloads that arrived (``None`` = dropped client, skipped, the others'
        weights renormalised). Pattern mode: only the shared keys (a partial update)."""
        payloads = list(payloads)
        if len(payloads) != len(ctx.weights):
            raise ValueError(
                f"PartialSharing.aggregate: {len(payloads)} payloads for {len(ctx.weights)} sampled clients"
            )
        arrived = [(p, w) for p, w in zip(payloads, ctx.weights) if p is not None]
        if not arrived:
            raise ValueError(
                "PartialSharing.aggregate: every sampled client dropped out; nothing to aggregate"
            )
        for i, (p, _) in enumerate(arrived):
            if not isinstance(p, Mapping):
                raise TypeError(
                    f"PartialSharing.aggregate: payload {i} is {type(p).__name__}, not a dict of tensors"
                )
            if self.patterns is not None:
                local = [k for k in p if not self.is_shared(k)]
                if local:
                    raise InvalidUpdateError(
                        f"PartialSharing.aggregate: payload {i} has entries {local[:5]} that "
                        "are meant to stay local (they match no share= pattern)"
                    )
        return weighted_mean([p for p, _ in arrived], [w for _, w in arrived])

    # ---------------------------------------------------------------- state

    def kept(self, client_id: int) -> Update:
        """Copies of what client ``client_id`` keeps local (fraction mode: zero where not kept; see
        :meth:`kept_mask`). Empty before its first :meth:`protect`."""
        return {k: t.detach().clone() for k, t in self._kept.get(client_id, {}).items()}

    def kept_mask(self, client_id: int) -> dict[str, torch.Tensor]:
        """Fraction mode: per entry, ``True`` where client ``client_id`` keeps the coordinate local
        (entries it shared entirely are absent)."""
        return {k: t.clone() for k, t in self._masks.get(client_id, {}).items()}

    def _config(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "share": list(self.patterns) if self.patterns is not None else None,
            "fraction": self.fraction,
            "select": self.select,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """The configuration and every client's kept-local values (and masks in fraction mode).

        These are the clients' **private local parameters**: a resumed run restores them, but in a
        real deployment each client checkpoints its own and the file must stay on its side — never
        hand a checkpoint containing this state to the server.
        """
        return {
            "config": self._config(),
            "clients": {
                str(cid): {
                    "kept": {k: t.detach().cpu().clone() for k, t in kept.items()},
                    "masks": {k: t.cpu().clone() for k, t in self._masks.get(cid, {}).items()},
                }
                for cid, kept in sorted(self._kept.items())
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the configuration must match)."""
        if "config" not in state or "clients" not in state:
            raise ValueError(
                "PartialSharing.load_state_dict: not a PartialSharing state (needs 'config' and 'clients')"
            )
        if state["config"] != self._config():
            raise ValueError(
                f"PartialSharing.load_state_dict: state was written by {state['config']}, "
                f"this defense is {self._config()}"
            )
        kept: dict[int, Update] = {}
        masks: dict[int, dict[str, torch.Tensor]] = {}
        for cid, st in state["clients"].items():
            kept[int(cid)] = {k: t.clone() for k, t in st["kept"].items()}
            if self.patterns is None:
                if set(st["masks"]) != set(st["kept"]):
                    raise ValueError(
                        f"PartialSharing.load_state_dict: client {cid} has kept values and masks "
                        "for different entries"
                    )
                masks[int(cid)] = {k: t.clone().bool() for k, t in st["masks"].items()}
        self._kept, self._masks, self._start = kept, masks, {}

    def __repr__(self) -> str:
        if self.patterns is not None:
            return f"PartialSharing(share={list(self.patterns)!r})"
        seed = f", seed={self.seed}" if self.seed is not None else ""
        return f"PartialSharing(fraction={self.fraction}, select={self.select!r}{seed})"
