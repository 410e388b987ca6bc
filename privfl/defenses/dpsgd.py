"""Sample-level DP-SGD for a client's local training, through opacus (Abadi et al. 2016).

Threat model and unit of privacy
--------------------------------
What is protected is **one training sample of one client** — one image (tile) with its mask — in
that client's local dataset. Two neighbouring datasets differ in one sample being present or absent
(add/remove adjacency, as opacus' accountants assume). The adversary is anyone who sees what the
client's local training produces — the weight delta it sends (the server, other clients, an
eavesdropper), over every round it takes part in — and may know the global model, the code, the
hyper-parameters and every other sample. Against them the client's updates over all its rounds are
(ε, δ)-DP with the ε that :attr:`DPSGDResult.epsilon` reports (given the whole ``history``).

What it does **not** cover:

* **Patients and slides.** The unit is one tile. Tiles cut from one whole-slide image (and slides
  of one patient) are strongly correlated; the guarantee for a patient contributing ``k`` tiles is
  only the group-privacy bound (roughly ``k·ε`` with δ growing accordingly). To protect slides or
  patients, make one *sample* per slide/patient or use client-level DP
  (:mod:`privfl.defenses.dp`), whose unit is the whole client.
* **The reported training loss** (:attr:`DPSGDResult.loss`) is computed on the private data with no
  noise; releasing it is not covered.
* **Participation.** Calibration assumes the client trains in every planned round; client sampling
  by the server is not credited (it would only lower ε).
* **Dataset size.** ``n`` is treated as public, as everywhere in opacus: it sets ``q`` and, with
  ``local_epochs``, the number of steps (privfl's client-level mechanisms also treat sizes as public).

Mechanism and units
-------------------
Each local step Poisson-samples the client's data with rate ``q`` (every sample independently), clips
each sample's gradient to L2 norm ``C = max_grad_norm`` (over all parameters joined), sums, adds
``N(0, (z·C)²)`` per coordinate (``z = noise_multiplier``, dimensionless) and divides by the expected
batch size. One round is the composition of ``steps`` such sampled Gaussian mechanisms; a client's
privacy history is a list of ``(z, q, steps)`` entries, one per round it trained in, which
:func:`sample_level_epsilon` (opacus' RDP / PRV / GDP accountants) turns into ε at a given δ.

``q`` is what opacus uses: ``1 / len(DataLoader(dataset, batch_size))`` = ``1 / ceil(n / B)``, which
equals ``B / n`` when ``B`` divides ``n`` and is slightly smaller otherwise; the accounting uses
the rate actually sampled with. The gradient is divided by opacus' ``expected_batch_size``
``= int(n·q)`` (a scale, not a privacy matter).

Model requirements
------------------
opacus' per-sample gradients need a model without BatchNorm and with batch-first layers throughout;
DHU-Net and U-Net get there with :func:`privfl.models.dp_compat.make_private_compatible`, which
changes the ``state_dict`` keys (BatchNorm running statistics disappear, two parameter names move).
:func:`fit_dp_sgd` therefore does **not** convert silently: the FL loop's global model must itself be
built as ``make_private_compatible(build_model(...))`` so that the global state and every client
agree on the keys, and a model that fails :func:`~privfl.models.dp_compat.check_private_compatible`
raises ``ValueError`` with that hint. The loss must be the per-sample variant
(:func:`privfl.models.losses.per_sample_loss`, applied here): the reference soft Dice couples the
samples of a batch, which would make per-sample clipping meaningless.

Randomness
----------
The DP noise comes from ``DPSGD.noise``, a :class:`~privfl.defenses.rng.NoiseSource`: by default
:class:`~privfl.defenses.rng.SecureNoise` (ChaCha20 keyed from ``os.urandom``), which replaces
opacus' ``torch.normal`` draw in its optimizer's ``add_noise``; Poisson sampling then uses a torch
generator seeded from ``os.urandom`` (which tiles are sampled is never observable, only the noised
update). With :class:`~privfl.defenses.rng.SeededNoise` (experiments), noise is keyed by (round,
client, step, parameter) and sampling seeded from ``(seed, round, client)`` via
:func:`privfl.fl.seeding.derive_seed`: runs replay exactly, and the noise is **predictable to
anyone who knows the seed**. Floating-point attacks on the noise (Mironov 2012) are not mitigated.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privfl.defenses.rng import NoiseSource, default_noise
from privfl.fl.client import Augment, ClientConfig, _Augmented, load_state, scheduled_batches, trainable_state
from privfl.fl.seeding import derive_seed, torch_generator
from privfl.models.dp_compat import check_private_compatible
from privfl.models.losses import per_sample_loss
from privfl.updates import Update

__all__ = ["ACCOUNTANTS", "DPSGD", "DPSGDResult", "PrivacyEvent", "fit_dp_sgd", "sample_level_epsilon"]

ACCOUNTANTS = ("rdp", "prv", "gdp")
"""opacus accountants accepted by :class:`DPSGD` (``gdp`` is a CLT approximation, not a bound)."""

PrivacyEvent = tuple[float, float, int]
"""``(noise_multiplier z, sample_rate q, steps)``: one round of DP-SGD for one client."""

_IGNORED_WARNINGS = (
    "Secure RNG turned off",  # opacus' own generator is unused: privfl draws the noise (module docstring)
    "Full backward hook is firing",  # torch, when the input batch does not require grad (it never does)
)
_CALIBRATION_WARNINGS = ("Optimal order is the",)  # opacus RDP while bisecting over far-off noise levels


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _check_rate_steps(sample_rate: float, steps: int) -> None:
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    with warnings.catch_warnings():
        for msg in _CALIBRATION_WARNINGS:
            warnings.filterwarnings("ignore", message=msg)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


@dataclass
class DPSGD:
    """Sample-level DP-SGD settings for :func:`fit_dp_sgd`.

    Give exactly one of ``noise_multiplier`` (``z``: noise std / clip norm, dimensionless) and
    ``target_epsilon`` (then ``z`` is calibrated with opacus' ``get_noise_multiplier`` so that the
    client's whole planned run — ``total_rounds × steps per round`` steps at its sample rate — stays
    at or below ``target_epsilon`` at ``delta`` under ``accountant``).

    ``max_grad_norm`` is the per-sample L2 clip ``C`` in gradient units, over all parameters joined.
    ``noise_multiplier=0`` (clipping only, ε = ∞) is accepted for experiments.
    ``noise``: where the Gaussian noise comes from (default :class:`SecureNoise`; pass
    :class:`SeededNoise` for reproducible experiments — see the module docstring).
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    noise: NoiseSource = field(default_factory=default_noise)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_grad_norm, (int, float)) and math.isfinite(self.max_grad_norm)
                and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and not (
            math.isfinite(self.target_epsilon) and self.target_epsilon > 0
        ):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon!r}")
        _check_delta(self.delta)
        _check_accountant(self.accountant)

    def resolve_noise_multiplier(self, sample_rate: float, steps: int) -> float:
        """``z`` for a run of ``steps`` Poisson-sampled steps at rate ``sample_rate`` in all: the given
        ``noise_multiplier``, or the smallest ``z`` (to opacus' search tolerance) whose ε over those
        steps is at most ``target_epsilon``. Raises ``ValueError`` if no ``z`` up to 1e6 reaches it."""
        _check_rate_steps(sample_rate, steps)
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        assert self.target_epsilon is not None
        return _calibrate(float(self.target_epsilon), float(self.delta), float(sample_rate), int(steps),
                          self.accountant)


@dataclass
class DPSGDResult:
    """What :func:`fit_dp_sgd` returns for one client and round.

    ``delta``: local − global weights, keyed like ``trainable_state`` of the compatible model.
    ``loss``: mean per-sample training loss over the samples drawn this round (NaN if every batch was
    empty); computed without noise, so not covered by the DP guarantee.
    ``steps``, ``sample_rate``, ``noise_multiplier``: this round's privacy event (:attr:`event`).
    ``history``: the client's events so far (``accountant_state`` + this round) — pass it back as
    ``accountant_state`` next round. ``epsilon``: ε of ``history`` at ``dp_delta``.
    """

    delta: Update
    loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float | None = None
    dp_delta: float | None = None
    history: list[PrivacyEvent] = field(default_factory=list)

    @property
    def event(self) -> PrivacyEvent:
        """This round's ``(z, q, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _merge(history: Sequence[PrivacyEvent]) -> list[PrivacyEvent]:
    """Validate events and merge consecutive ones with equal ``(z, q)`` (their steps add)."""
    merged: list[PrivacyEvent] = []
    for entry in history:
        if len(entry) != 3:
            raise ValueError(f"history entries are (noise_multiplier, sample_rate, steps), got {entry!r}")
        z, q, steps = float(entry[0]), float(entry[1]), entry[2]
        if not (math.isfinite(z) and z >= 0):
            raise ValueError(f"noise multiplier must be finite and >= 0, got {z!r}")
        if not (0 < q <= 1):
            raise ValueError(f"sample rate must be in (0, 1], got {q!r}")
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        if steps == 0:
            continue
        if merged and merged[-1][:2] == (z, q):
            merged[-1] = (z, q, merged[-1][2] + int(steps))
        else:
            merged.append((z, q, int(steps)))
    return merged


def sample_level_epsilon(history: Sequence[PrivacyEvent], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of a client's DP-SGD history ``[(z, q, steps), …]``, by opacus' ``accountant``.

    An empty history costs 0; any event with ``z = 0`` (and steps > 0) costs ∞. ``gdp`` (a central
    limit approximation, not an upper bound) only composes identical events and raises
    ``ValueError`` for a mixed history.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    events = _merge(history)
    if not events:
        return 0.0
    if any(z == 0 for z, _, _ in events):
        return math.inf
    if accountant == "gdp" and len(events) > 1:
        raise ValueError("opacus' GDP accountant only composes identical (z, q) events; use 'rdp' or 'prv'")
    acc = create_accountant(accountant)
    acc.history = events
    return float(acc.get_epsilon(delta=delta))


def _check_state_keys(model: nn.Module, global_state: Update) -> None:
    expected = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    given = set(global_state)
    if given == expected:
        return
    unexpected, missing = sorted(given - expected), sorted(expected - given)
    hint = ""
    if any(k.endswith(("running_mean", "running_var")) for k in unexpected):
        hint = (" The global state has BatchNorm statistics: build the FL global model itself with "
                "make_private_compatible(...) so that server and clients share the DP-compatible keys.")
    raise ValueError(
        f"global_state does not match the model's trainable state: unexpected {unexpected[:5]}"
        f"{'…' if len(unexpected) > 5 else ''}, missing {missing[:5]}{'…' if len(missing) > 5 else ''}.{hint}"
    )


def _draw_noise_from(optimizer: DPOptimizer, noise: NoiseSource, key: tuple) -> None:
    """Make opacus' ``optimizer`` draw its Gaussian noise (std ``z·C`` on the summed clipped
    gradients, as opacus' own ``add_noise``) from privfl's ``noise`` source."""
    counter = itertools.count()

    def add_noise() -> None:
        step = next(counter)
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for i, p in enumerate(optimizer.params):
            summed = p.summed_grad
            _check_processed_flag(summed)
            sample = noise.gaussian(summed.shape, std, key=("dpsgd", *key, step, i), dtype=summed.dtype,
                                    device=summed.device)
            p.grad = (summed + sample).view_as(p)
            _mark_as_processed(summed)

    optimizer.add_noise = add_noise


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, z: float, dp: DPSGD,
                 noise_key: tuple) -> tuple:
    """opacus' ``make_private`` with privfl's settings (Poisson sampling, per-sample clip
    ``dp.max_grad_norm``, noise multiplier ``z``), the noise drawn from ``dp.noise`` under
    ``noise_key``; opacus' known warnings silenced. Call it inside ``warnings.catch_warnings()``.
    Returns ``(engine, grad-sample module, DP optimizer, DP data loader)``; the engine's
    accountant counts the noised steps."""
    for msg in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)
    engine = PrivacyEngine(accountant=dp.accountant)
    gsm, dp_optimizer, dp_loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=z,
        max_grad_norm=dp.max_grad_norm, loss_reduction="mean", poisson_sampling=True, grad_sample_mode="hooks")
    _draw_noise_from(dp_optimizer, dp.noise, noise_key)
    return engine, gsm, dp_optimizer, dp_loader


def fit_dp_sgd(
    model: nn.Module,
    dataset: Dataset,
    global_state: Update,
    config: ClientConfig,
    dp: DPSGD,
    *,
    loss_fn: nn.Module,
    augment: Augment | None = None,
    round_idx: int,
    total_rounds: int,
    seed: int,
    client_id: int = 0,
    device: torch.device | str | None = None,
    accountant_state: Sequence[PrivacyEvent] | None = None,
) -> DPSGDResult:
    """One client's local training for one round with sample-level DP-SGD (see the module docstring).

    ``model`` must already be DP-compatible (``make_private_compatible``; ``ValueError`` otherwise);
    it is not modified — a deep copy is loaded with ``global_state``, wrapped by opacus' ``PrivacyEngine``
    (SGD with ``config``'s lr, momentum and weight decay; Poisson sampling at ``q = 1/ceil(n/B)``;
    per-sample clip ``dp.max_grad_norm``; noise multiplier from ``dp.resolve_noise_multiplier(q,
    total_rounds · steps)``) and trained for ``config.steps_per_round(len(dataset))`` steps with the
    poly learning rate of :class:`~privfl.fl.client.Client`. Batches vary in size and may be empty;
    every step, empty or not, adds noise and is accounted. ``config.grad_clip`` is ignored
    (per-sample clipping replaces it).

    ``loss_fn`` is turned into its per-sample variant (:func:`~privfl.models.losses.per_sample_loss`,
    ``TypeError`` for an unknown loss); ``augment`` is applied per sample as in ``Client.fit``.
    ``accountant_state`` is the client's earlier history (``result.history`` of its last round).
    With a seeded ``dp.noise`` the result is deterministic per (seed, round, client).
    ``device`` defaults to the model's.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"client {client_id} has no training samples")
    if total_rounds < 1 or not 0 <= round_idx < total_rounds:
        raise ValueError(f"need 0 <= round_idx < total_rounds, got round_idx={round_idx}, total_rounds={total_rounds}")
    loss_fn = per_sample_loss(loss_fn)
    history = _merge(accountant_state or [])

    work = copy.deepcopy(model).train()
    errors = check_private_compatible(work)
    if errors:
        raise ValueError(
            "fit_dp_sgd needs a model opacus can compute exact per-sample gradients for; pass "
            "privfl.models.dp_compat.make_private_compatible(model) and use it as the FL global model too "
            "(BatchNorm becomes GroupNorm, so its state_dict keys differ). Problems:\n  - "
            + "\n  - ".join(errors[:10])
        )
    _check_state_keys(work, global_state)
    dev = torch.device(device) if device is not None else next(work.parameters()).device
    work.to(dev)
    load_state(work, global_state)

    torch.manual_seed(derive_seed(seed, round_idx, client_id, "dropout+augment"))
    data = dataset if augment is None else _Augmented(dataset, augment)
    sampling_gen = (torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1) if dp.noise.secure
                    else torch_generator(seed, round_idx, client_id, "dpsgd-sampling"))
    loader = DataLoader(data, batch_size=config.batch_size, generator=sampling_gen)
    sample_rate = 1 / len(loader)  # what opacus' DPDataLoader.from_data_loader samples with
    steps = config.steps_per_round(n)
    total_steps = max(total_rounds * steps, 1)
    z = dp.resolve_noise_multiplier(sample_rate, total_steps)
    optimizer = torch.optim.SGD(
        work.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    with warnings.catch_warnings():
        engine, gsm, dp_optimizer, dp_loader = make_private(work, optimizer, loader, z, dp, (round_idx, client_id))
        loss_sum, seen = 0.0, 0
        try:
            batches = scheduled_batches(dp_loader, dp_optimizer, config, round_idx, steps, total_rounds)
            for step, (images, masks) in batches:
                images, masks = images.to(dev), masks.to(dev)
                dp_optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(gsm(images), masks)  # batch mean of per-sample losses (0 if empty)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"client {client_id}: non-finite loss at round {round_idx} step {step}")
                loss.backward()
                dp_optimizer.step()
                loss_sum += float(loss.detach()) * images.shape[0]
                seen += images.shape[0]
        finally:
            gsm.to_standard_module()  # removes opacus' hooks and per-sample gradient attributes from the copy

    recorded = sum(s for _, _, s in engine.accountant.history)
    if recorded != steps:  # every step, empty batches included, must have been noised and accounted
        raise RuntimeError(f"opacus accounted {recorded} noisy steps, expected {steps}")
    local = trainable_state(work)
    delta = {k: local[k] - global_state[k] for k in global_state}
    history = _merge([*history, (z, sample_rate, steps)])
    return DPSGDResult(
        delta=delta,
        loss=loss_sum / seen if seen else math.nan,
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=z,
        epsilon=sample_level_epsilon(history, dp.delta, dp.accountant),
        dp_delta=dp.delta,
        history=history,
    )
