""":class:`CKKSAggregation`, the CKKS roles wrapped into a :class:`~privfl.defenses.base.Defense`,
and the :class:`CKKSReport` of each round."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from privfl.defenses.base import Aggregation, Defense, Payload, RoundContext, check_before_reveal
from privfl.defenses.ckks.keys import CKKSKeys
from privfl.defenses.ckks.parties import CKKSClient, CKKSServer, _check_bound
from privfl.defenses.ckks.presets import CKKSPreset, get_preset
from privfl.defenses.ckks.wire import payload_header
from privfl.updates import Update, flatten_floating, unflatten

__all__ = ["CKKSAggregation", "CKKSReport"]


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
    aggregation: Aggregation = "encrypted"
    """The capability :mod:`privfl.integrations.flower` runs it by: the server adds the ciphertexts
    with a :class:`CKKSServer` only (the server's defense holds no ``CKKSAggregation``), the clients
    open the encrypted mean with :meth:`open_aggregate` and report :attr:`layout` next to their
    payload."""

    def __init__(
        self,
        preset: str | CKKSPreset = "precise",
        *,
        bound: float | None = None,
        keys: CKKSKeys | None = None,
        n_threads: int | None = None,
        measure_error: bool = False,
        max_payload_bytes: int | None = None,
    ):
        self.preset = get_preset(preset)
        if keys is not None and keys.preset != self.preset:
            raise ValueError(
                f"CKKSAggregation: keys are for preset {keys.preset.name!r}, not {self.preset.name!r}"
            )
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
            raise ValueError(
                "CKKSAggregation must be the last stage of a Compose (it returns ciphertext bytes)"
            )
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
            raise ValueError(
                "CKKSAggregation needs a public bound on |value|: pass bound= (e.g. your clip norm), or put "
                "a ClipUpdate (or a clipping DP mechanism) before it in a Compose"
            )
        return self.bound

    def protect(self, update: Update, ctx: RoundContext) -> bytes:
        """Client side: encrypt ``update`` (pre-multiplied by this client's weight) into bytes."""
        if ctx.client_id is None:
            raise ValueError(
                "CKKSAggregation.protect runs on a client: pass ctx.for_client(client_id) (the client "
                "applies its own aggregation weight)"
            )
        t0 = time.perf_counter()
        vec, spec = flatten_floating(update, "CKKSAggregation.protect")
        self.layout = spec  # public: the payload's header carries it too
        payload = self.client.encrypt_vector(
            vec, spec, weight=ctx.weight_of(ctx.client_id), bound=self._bound()
        )
        self._protect_seconds[(ctx.round, ctx.client_id)] = time.perf_counter() - t0
        if self.measure_error:  # simulation-only: keep the plaintext to measure the CKKS error later
            self._plain[(ctx.round, ctx.client_id)] = vec.detach().to(torch.float64).cpu().clone()
        return payload

    def aggregate(self, payloads: Sequence[Payload], ctx: RoundContext) -> Update:
        """Server: sum the ciphertexts (no key); key holder: decrypt the weighted mean of the survivors."""
        payloads = list(payloads)
        if len(payloads) != len(ctx.sampled):
            raise ValueError(
                f"CKKSAggregation: {len(payloads)} payloads for {len(ctx.sampled)} sampled clients"
            )
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
            round=ctx.round,
            preset=self.preset.name,
            params=spec.numel,
            ciphertexts_per_client=self.preset.ciphertexts(spec.numel),
            bytes_per_client={cid: len(p) for cid, p in survivors},
            bytes_per_param=sum(len(p) for _, p in survivors) / len(survivors) / spec.numel,
            aggregate_bytes=len(encrypted_mean),
            dropped=tuple(cid for cid, p in zip(ctx.sampled, payloads) if p is None),
            weight_sum=math.fsum(ctx.weight_of(cid) for cid, _ in survivors),
            bound=self._bound(),
            error_bound=self.preset.max_abs_error(
                self._bound(), len(survivors), math.fsum(ctx.weight_of(cid) for cid, _ in survivors)
            ),
            protect_seconds={cid: s for (r, cid), s in self._protect_seconds.items() if r == ctx.round},
            aggregate_seconds=t1 - t0,
            decrypt_seconds=t2 - t1,
        )
        if self.measure_error:
            found = [(ctx.weight_of(cid), self._plain.get((ctx.round, cid))) for cid, _ in survivors]
            plains = [(w, u) for w, u in found if u is not None]
            if len(plains) == len(found):
                ref = torch.stack([w * u for w, u in plains]).sum(0) / report.weight_sum
                report.max_abs_error = float((vec - ref).abs().max())
                report.max_abs_value = max(float(u.abs().max()) for _, u in plains)
                report.relative_error = (
                    report.max_abs_error / report.max_abs_value if report.max_abs_value > 0 else 0.0
                )
        self._plain = {k: v for k, v in self._plain.items() if k[0] > ctx.round}
        self._protect_seconds = {k: v for k, v in self._protect_seconds.items() if k[0] > ctx.round}
        self.last_report = report
        return unflatten(vec, spec)

    def open_aggregate(self, aggregate: bytes) -> Update:
        """Key holder: decrypt an encrypted aggregate (:meth:`CKKSServer.aggregate`) into the
        weighted mean update of the clients that sent."""
        return unflatten(*self.keyholder.decrypt_vector(aggregate))

    def state_dict(self) -> dict[str, Any]:
        """Only the preset name: keys are never checkpointed (a resumed run makes fresh ones)."""
        return {"preset": self.preset.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = state.get("preset", self.preset.name)
        if name != self.preset.name:
            raise ValueError(
                f"CKKSAggregation: checkpoint was made with preset {name!r}, this is {self.preset.name!r}"
            )

    def __repr__(self) -> str:
        src = (
            f", bound from {self.bound_source}" if self.bound_source and self.bound_source != "bound=" else ""
        )
        return (
            f"CKKSAggregation(preset={self.preset.name!r}, bound={self.bound}{src}, "
            f"key_id={self.keys.key_id[:8]}…)"
        )
