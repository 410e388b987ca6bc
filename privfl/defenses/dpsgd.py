"""Sample-level DP-SGD for a client's local training, through opacus (Abadi et al. 2016).

Threat model and unit of privacy
--------------------------------
What is protected is **one training sample of one client** — one image (tile) with its mask — in
that client's local dataset. Two neighbouring datasets differ in one sample being present or absent
(add/remove adjacency, as privfl's accountants assume). The adversary is anyone who sees what the
client's local training produces — the weight delta it sends (the server, other clients, an
eavesdropper), over every round it takes part in — and may know the global model, the code, the
hyper-parameters and every other sample. Against them the client's updates over all its rounds are
(ε, δ)-DP with the ε and δ that :attr:`DPSGDResult.epsilon_report` reports (given the client's whole
``accountant_state``).

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
Each local step Poisson-samples the client's data with rate ``q`` (every sample independently,
:class:`PoissonBatchSampler`), clips each sample's gradient to L2 norm ``C = max_grad_norm`` (over
all parameters joined), sums, adds ``N(0, (z·C)²)`` per coordinate (``z = noise_multiplier``,
dimensionless) and divides by the expected batch size. Batches vary in size and may be empty; every
step, empty or not, adds noise and is accounted.

``q`` is ``1 / ceil(n / B)`` (what opacus' ``DPDataLoader`` would use), which equals ``B / n`` when
``B`` divides ``n`` and is slightly smaller otherwise; the accounting uses the rate actually sampled
with. The gradient is divided by the expected batch size ``int(n·q)`` (a scale, not a privacy matter).

Accounting
----------
Privacy is accounted by privfl's one accountant, :class:`~privfl.defenses.accounting.PrivacyAccountant`,
as for every other mechanism in privfl. One round of one client is the event
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)`` (:func:`dpsgd_event`);
each client has its own accountant (``DPSGD.make_accountant``), whose JSON-able ``state_dict()`` is
passed from round to round (``accountant_state``). ε at ``DPSGD.delta`` is the tightest valid bound
among ``DPSGD.accountants`` (RDP, PRV, PLD by default), and ``target_epsilon`` is calibrated with
:func:`~privfl.defenses.accounting.calibrate` to that same bound. Each round also records its
floating-point δ floor — ``steps × Σ_tensors dp.noise.tail_floor("gaussian", numel)``, the chance of
noise values the finite-precision sampler can never produce — which the accountant adds to the δ it
reports (:attr:`~privfl.defenses.accounting.EpsilonReport.delta`).

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
Both random parts of DP-SGD come from ``DPSGD.noise``, a :class:`~privfl.defenses.rng.NoiseSource`:
the Gaussian noise (replacing opacus' ``torch.normal`` draw in its optimizer's ``add_noise``) and
the Poisson sampling (``noise.bernoulli``, in place of opacus' ``UniformWithReplacementSampler`` on a
torch generator). By default that is :class:`~privfl.defenses.rng.SecureNoise`: ChaCha20 keyed from
``os.urandom`` for both, so neither the noise nor which samples a step drew can be predicted or
replayed from earlier outputs (torch's Mersenne Twister is used for neither). With
:class:`~privfl.defenses.rng.SeededNoise` (experiments), noise is keyed by (round, client, step,
parameter) and sampling by ``("dpsgd-sampling", round, client, step)``: runs replay exactly per
(seed, round, client), and both are **predictable to anyone who knows the seed**. Dropout and
augmentation use torch's global RNG, seeded per (seed, round, client). Floating-point attacks on the
noise (Mironov 2012) are not mitigated; the truncated tails of the finite-precision sampler are
accounted as the δ floor above.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, cast

import dp_accounting
import torch
from opacus import PrivacyEngine
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from privfl.data.augment import Augment, AugmentedDataset
from privfl.defenses.accounting import ACCOUNTANTS, EpsilonReport, PrivacyAccountant, calibrate
from privfl.defenses.calibration import check_sample_rate
from privfl.defenses.rng import NoiseSource, default_noise
from privfl.models.dp_compat import check_private_compatible, make_private_compatible
from privfl.models.losses import per_sample_loss
from privfl.models.training import (
    ClientConfig,
    LocalTrainer,
    load_state,
    scheduled_batches,
    trainable_state,
)
from privfl.seeding import derive_seed
from privfl.updates import Update

__all__ = [
    "DPSGD",
    "DPSGDResult",
    "DPSGDTrainer",
    "PoissonBatchSampler",
    "dpsgd_event",
    "fit_dp_sgd",
    "poisson_loader",
    "round_delta_floor",
]

_IGNORED_WARNINGS = (
    # opacus' own generator is unused: privfl draws noise and batches (module docstring)
    "Secure RNG turned off",
    "Full backward hook is firing",  # torch, when the input batch does not require grad (it never does)
)


def _check_rate_steps(sample_rate: float, steps: int) -> None:
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The dp-accounting event of ``steps`` DP-SGD steps with noise multiplier ``z`` and Poisson
    sampling rate ``q``: ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)``."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            float(sample_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
        ),
        int(steps),
    )


@dataclass
class DPSGD:
    """Sample-level DP-SGD settings for :func:`fit_dp_sgd` (and :func:`privfl.sharing.dp_training.train_dp`).

    Give exactly one of ``noise_multiplier`` (``z``: noise std / clip norm, dimensionless) and
    ``target_epsilon`` (then ``z`` is calibrated with :func:`privfl.defenses.accounting.calibrate` so
    that the client's whole planned run — ``total_rounds × steps per round`` steps at its sample rate —
    stays at or below ``target_epsilon`` at ``delta``, by the ε that is reported).

    ``max_grad_norm`` is the per-sample L2 clip ``C`` in gradient units, over all parameters joined.
    ``noise_multiplier=0`` (clipping only, ε = ∞) is accepted for experiments.
    ``accountants``: which of :data:`~privfl.defenses.accounting.ACCOUNTANTS` (``"rdp"``, ``"prv"``,
    ``"pld"``) the client's :class:`~privfl.defenses.accounting.PrivacyAccountant` consults; ε is the
    tightest valid bound among them (a single name is accepted too).
    ``noise``: where the Gaussian noise and the Poisson sampling come from (default :class:`SecureNoise`;
    pass :class:`SeededNoise` for reproducible experiments — see the module docstring).
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountants: tuple[str, ...] = ACCOUNTANTS
    noise: NoiseSource = field(default_factory=default_noise)

    def __post_init__(self) -> None:
        if not (
            isinstance(self.max_grad_norm, (int, float))
            and math.isfinite(self.max_grad_norm)
            and self.max_grad_norm > 0
        ):
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
        probe = PrivacyAccountant(delta=self.delta, accountants=self.accountants)  # validates both
        self.delta, self.accountants = probe.delta, probe.accountants

    def make_accountant(self, state: Mapping[str, Any] | None = None) -> PrivacyAccountant:
        """A :class:`~privfl.defenses.accounting.PrivacyAccountant` at ``delta`` over ``accountants``,
        holding the events of ``state`` (a ``state_dict()`` of earlier rounds; ``None``: none)."""
        acct = PrivacyAccountant(delta=self.delta, accountants=self.accountants)
        if state is not None:
            acct.load_state_dict(dict(state))
        return acct

    def resolve_noise_multiplier(self, sample_rate: float, steps: int) -> float:
        """``z`` for a run of ``steps`` Poisson-sampled steps at rate ``sample_rate`` in all: the given
        ``noise_multiplier``, or the smallest ``z`` (within calibrate's tolerance) whose reported ε
        over those steps is at most ``target_epsilon``. ``ValueError`` if none reaches it.

        The calibration is to the tightest bound among ``accountants``: the ε that is reported.
        Results are cached (:func:`~privfl.defenses.accounting.calibrate` is), as this is called for
        every client and round.
        """
        _check_rate_steps(sample_rate, steps)
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        assert self.target_epsilon is not None
        return float(
            calibrate(
                float(self.target_epsilon),
                float(self.delta),
                int(steps),
                float(sample_rate),
                accountant=tuple(self.accountants),
            )
        )


@dataclass
class DPSGDResult:
    """What :func:`fit_dp_sgd` returns for one client and round.

    ``delta``: local − global weights, keyed like ``trainable_state`` of the compatible model.
    ``loss``: mean per-sample training loss over the samples drawn this round (NaN if every batch was
    empty); computed without noise, so not covered by the DP guarantee.
    ``steps``, ``sample_rate``, ``noise_multiplier``: this round's privacy event (:attr:`event`).
    ``accountant_state``: the client's ``PrivacyAccountant.state_dict()`` after this round (its earlier
    rounds + this one; JSON-able) — pass it back as ``accountant_state`` next round.
    ``epsilon_report``: ε of that state (the tightest valid bound, every accountant's figure);
    ``epsilon`` its ε and ``dp_delta`` the δ it holds at (``DPSGD.delta`` + the floating-point δ
    floor of the recorded rounds, ``delta_floor`` this round's share of it).
    """

    delta: Update
    loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float | None = None
    dp_delta: float | None = None
    accountant_state: dict[str, Any] = field(default_factory=dict)
    epsilon_report: EpsilonReport | None = None
    delta_floor: float = 0.0

    @property
    def event(self) -> dp_accounting.DpEvent:
        """This round's dp-accounting event (:func:`dpsgd_event` of ``(z, q, steps)``)."""
        return dpsgd_event(self.noise_multiplier, self.sample_rate, self.steps)


# ----------------------------------------------------------------------------------------------
# Poisson sampling from the noise source


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling for DP-SGD, drawn from a :class:`~privfl.defenses.rng.NoiseSource`.

    Every batch includes each of the ``num_samples`` indices independently with probability
    ``sample_rate``, from ``noise.bernoulli(num_samples, sample_rate, key=(*key, step))`` — ChaCha20
    for :class:`~privfl.defenses.rng.SecureNoise`, a keyed torch generator for
    :class:`~privfl.defenses.rng.SeededNoise` — so batches vary in size and may be empty. ``step``
    counts the batches drawn by this sampler over all passes. One pass (``len``) is
    ``batches_per_pass`` batches, ``1 / sample_rate`` when that is an integer (then opacus, which
    derives ``q = 1 / len(loader)``, sees the rate actually sampled with).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        noise: NoiseSource,
        *,
        key: tuple = (),
        batches_per_pass: int | None = None,
    ) -> None:
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        q = check_sample_rate(sample_rate)
        if q == 0:
            raise ValueError("sample_rate must be > 0")
        per_pass = max(1, round(1 / q)) if batches_per_pass is None else int(batches_per_pass)
        if per_pass < 1:
            raise ValueError(f"batches_per_pass must be >= 1, got {batches_per_pass!r}")
        self.num_samples, self.sample_rate, self.noise, self.key = int(num_samples), q, noise, tuple(key)
        self.batches_per_pass = per_pass
        self.drawn = 0
        """Batches drawn so far (the ``step`` of the next one's key)."""

    def __len__(self) -> int:
        return self.batches_per_pass

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.batches_per_pass):
            step, self.drawn = self.drawn, self.drawn + 1
            mask = self.noise.bernoulli(self.num_samples, self.sample_rate, key=(*self.key, step))
            yield torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()


def poisson_loader(dataset: Dataset, batch_size: int, noise: NoiseSource, *, key: tuple = ()) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with :class:`PoissonBatchSampler` batches at rate
    ``q = 1 / ceil(n / batch_size)`` (``ceil(n / batch_size)`` batches per pass, as opacus'
    ``DPDataLoader.from_data_loader`` of ``DataLoader(dataset, batch_size)``), drawn from ``noise``
    under ``key``; empty batches come out as zero-length tensors (opacus' collate wrapper)."""
    n = len(cast(Sized, dataset))
    if n == 0:
        raise ValueError("no training samples")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    per_pass = math.ceil(n / int(batch_size))
    sampler = PoissonBatchSampler(n, 1 / per_pass, noise, key=key, batches_per_pass=per_pass)
    first = dataset[0]  # shapes and dtypes of an empty batch drawn before any non-empty one (as opacus)
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first],
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


# ----------------------------------------------------------------------------------------------
# opacus with privfl's noise and sampling


def _check_state_keys(model: nn.Module, global_state: Update) -> None:
    expected = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    given = set(global_state)
    if given == expected:
        return
    unexpected, missing = sorted(given - expected), sorted(expected - given)
    hint = ""
    if any(k.endswith(("running_mean", "running_var")) for k in unexpected):
        hint = (
            " The global state has BatchNorm statistics: build the FL global model itself with "
            "make_private_compatible(...) so that server and clients share the DP-compatible keys."
        )
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
            sample = noise.gaussian(
                summed.shape, std, key=("dpsgd", *key, step, i), dtype=summed.dtype, device=summed.device
            )
            p.grad = (summed + sample).view_as(p)
            _mark_as_processed(summed)

    optimizer.add_noise = add_noise


def round_delta_floor(noise: NoiseSource, params: Iterable[torch.Tensor], steps: int) -> float:
    """The floating-point δ floor of ``steps`` DP-SGD steps noising ``params`` (one Gaussian draw per
    tensor and step): ``steps × Σ_tensors noise.tail_floor("gaussian", numel)``."""
    return int(steps) * sum(noise.tail_floor("gaussian", p.numel()) for p in params)


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    z: float,
    dp: DPSGD,
    noise_key: tuple,
) -> tuple:
    """opacus' ``make_private`` with privfl's settings: per-sample clip ``dp.max_grad_norm``, noise
    multiplier ``z``, the noise drawn from ``dp.noise`` under ``noise_key``, and Poisson sampling by
    ``loader``'s own :class:`PoissonBatchSampler` (from :func:`poisson_loader`; opacus is asked not
    to replace it, and grad accumulation across batches is forbidden as with its own Poisson
    loader). The gradient is divided by the expected batch size ``int(n·q)``. opacus' known warnings
    are silenced: call it inside ``warnings.catch_warnings()``. Returns ``(engine, grad-sample
    module, DP optimizer, data loader)``; the engine's accountant counts the noised steps (a check,
    not the privacy accounting)."""
    sampler = loader.batch_sampler
    if not isinstance(sampler, PoissonBatchSampler):
        raise TypeError("make_private needs a loader from poisson_loader (a PoissonBatchSampler)")
    for msg in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)
    engine = PrivacyEngine(accountant="rdp")
    gsm, dp_optimizer, dp_loader = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=z,
        max_grad_norm=dp.max_grad_norm,
        loss_reduction="mean",
        poisson_sampling=False,
        grad_sample_mode="hooks",
    )
    gsm.forbid_grad_accumulation()  # what opacus does for its own Poisson loader
    dp_optimizer.expected_batch_size = int(sampler.num_samples * sampler.sample_rate)
    _draw_noise_from(dp_optimizer, dp.noise, noise_key)
    return engine, gsm, dp_optimizer, dp_loader


def noised_steps(engine: PrivacyEngine) -> int:
    """Steps opacus' engine saw noised (its accountant's history)."""
    return sum(int(s) for _, _, s in engine.accountant.history)


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
    accountant_state: Mapping[str, Any] | None = None,
) -> DPSGDResult:
    """One client's local training for one round with sample-level DP-SGD (see the module docstring).

    ``model`` must already be DP-compatible (``make_private_compatible``; ``ValueError`` otherwise);
    it is not modified — a deep copy is loaded with ``global_state``, wrapped by opacus' ``PrivacyEngine``
    (SGD with ``config``'s lr, momentum and weight decay; Poisson sampling at ``q = 1/ceil(n/B)`` from
    ``dp.noise`` (:class:`PoissonBatchSampler`); per-sample clip ``dp.max_grad_norm``; noise multiplier
    from ``dp.resolve_noise_multiplier(q, total_rounds · steps)``) and trained for
    ``config.steps_per_round(len(dataset))`` steps with the poly learning rate of
    :class:`~privfl.fl.client.Client`. Batches vary in size and may be empty; every step, empty or
    not, adds noise and is accounted. ``config.grad_clip`` is ignored (per-sample clipping replaces it).

    ``loss_fn`` is turned into its per-sample variant (:func:`~privfl.models.losses.per_sample_loss`,
    ``TypeError`` for an unknown loss); ``augment`` is applied per sample as in ``Client.fit``.
    ``accountant_state`` is the ``state_dict()`` of the client's accountant after its earlier rounds
    (``result.accountant_state`` of its last round; ``None`` for its first). With a seeded
    ``dp.noise`` the result is deterministic per (seed, round, client). ``device`` defaults to the
    model's. Raises :class:`~privfl.defenses.accounting.DeltaFloorError` before training when the
    floating-point δ floor would exceed what ``dp.delta`` allows.
    """
    n = len(cast(Sized, dataset))
    if n == 0:
        raise ValueError(f"client {client_id} has no training samples")
    if total_rounds < 1 or not 0 <= round_idx < total_rounds:
        raise ValueError(
            f"need 0 <= round_idx < total_rounds, got round_idx={round_idx}, total_rounds={total_rounds}"
        )
    loss_fn = per_sample_loss(loss_fn)
    acct = dp.make_accountant(accountant_state)  # validates the state before any training

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
    data = dataset if augment is None else AugmentedDataset(dataset, augment)
    loader = poisson_loader(data, config.batch_size, dp.noise, key=("dpsgd-sampling", round_idx, client_id))
    sample_rate = loader.batch_sampler.sample_rate  # type: ignore[union-attr]
    steps = config.steps_per_round(n)
    total_steps = max(total_rounds * steps, 1)
    z = dp.resolve_noise_multiplier(sample_rate, total_steps)
    optimizer = torch.optim.SGD(
        work.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    with warnings.catch_warnings():
        engine, gsm, dp_optimizer, dp_loader = make_private(
            work, optimizer, loader, z, dp, (round_idx, client_id)
        )
        event = dpsgd_event(z, sample_rate, steps)
        floor = round_delta_floor(dp.noise, dp_optimizer.params, steps)
        acct.check_budget(event, delta_floor=floor)  # DeltaFloorError before, not after, training
        loss_sum, seen = 0.0, 0
        try:
            batches = scheduled_batches(dp_loader, dp_optimizer, config, round_idx, steps, total_rounds)
            for step, (images, masks) in batches:
                images, masks = images.to(dev), masks.to(dev)
                dp_optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(gsm(images), masks)  # batch mean of per-sample losses (0 if empty)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"client {client_id}: non-finite loss at round {round_idx} step {step}"
                    )
                loss.backward()
                dp_optimizer.step()
                loss_sum += float(loss.detach()) * images.shape[0]
                seen += images.shape[0]
        finally:
            gsm.to_standard_module()  # removes opacus' hooks and per-sample gradient attributes from the copy

    recorded = noised_steps(engine)
    if recorded != steps:  # every step, empty batches included, must have been noised and accounted
        raise RuntimeError(f"opacus accounted {recorded} noisy steps, expected {steps}")
    local = trainable_state(work)
    delta = {k: local[k] - global_state[k] for k in global_state}
    acct.record(event, delta_floor=floor)
    report = acct.epsilon()
    return DPSGDResult(
        delta=delta,
        loss=loss_sum / seen if seen else math.nan,
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=z,
        epsilon=report.epsilon,
        dp_delta=report.delta,
        accountant_state=acct.state_dict(),
        epsilon_report=report,
        delta_floor=floor,
    )


class DPSGDTrainer(LocalTrainer):
    """Sample-level DP-SGD as ``run_federated``'s local trainer (a
    :class:`~privfl.models.training.LocalTrainer`): every client trains with :func:`fit_dp_sgd` under
    ``dp`` and keeps its own :class:`~privfl.defenses.accounting.PrivacyAccountant`, whose state is
    checkpointed (``state_dict``, keyed by client id) and reported per round (:meth:`privacy_record`).

    :meth:`prepare` converts a model opacus cannot handle with
    :func:`~privfl.models.dp_compat.make_private_compatible` (BatchNorm → GroupNorm, …).
    """

    name = "dp_sgd"

    def __init__(self, dp: DPSGD):
        self.dp = dp
        self.states: dict[int, dict[str, Any]] = {}
        """Each client's ``PrivacyAccountant.state_dict()`` so far."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model``, converted for opacus when it needs it (:func:`make_private_compatible`)."""
        return make_private_compatible(model) if check_private_compatible(model.train()) else model

    def fit(
        self,
        model: nn.Module,
        train_data: Dataset,
        global_state: Update,
        config: ClientConfig,
        *,
        loss_fn: nn.Module,
        augment: Augment | None,
        round_idx: int,
        total_rounds: int,
        seed: int,
        client_id: int,
        fabric: Any,
    ) -> tuple[Update, float]:
        """One client's round of :func:`fit_dp_sgd` on the Fabric's device; its accountant state is
        kept for the next round."""
        res = fit_dp_sgd(
            model,
            train_data,
            global_state,
            config,
            self.dp,
            loss_fn=loss_fn,
            augment=augment,
            round_idx=round_idx,
            total_rounds=total_rounds,
            seed=seed,
            client_id=client_id,
            device=fabric.device,
            accountant_state=self.states.get(client_id),
        )
        self.states[client_id] = res.accountant_state
        return res.delta, res.loss

    def state_dict(self) -> dict[str, Any]:
        """Every client's accountant state, keyed by client id (as a string: JSON)."""
        return {str(c): state for c, state in self.states.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.states = {int(c): st for c, st in state.items()}

    def privacy_record(self) -> dict[str, Any]:
        """Sample-level (ε, δ) of the clients so far: the largest client ε (and the δ it holds at,
        the largest over clients), its accountant, and every client's ε."""
        reports = {str(c): self.dp.make_accountant(st).epsilon() for c, st in sorted(self.states.items())}
        worst = max(reports.values(), key=lambda r: r.epsilon, default=None)
        return {
            "epsilon": worst.epsilon if worst else 0.0,
            "delta": max((r.delta for r in reports.values()), default=self.dp.delta),
            "accountant": worst.accountant if worst else None,
            "per_client": {c: r.epsilon for c, r in reports.items()},
        }
