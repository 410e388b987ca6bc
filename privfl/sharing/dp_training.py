"""Sample-level DP-SGD for small models on tensors (embeddings), through opacus.

:func:`train_dp` trains any opacus-compatible ``nn.Module`` (Linear layers and the like, no
BatchNorm) on a client's ``(x, y)`` tensors with DP-SGD (Abadi et al. 2016), with the same pieces
as :func:`privfl.defenses.dpsgd.fit_dp_sgd`: opacus' ``PrivacyEngine`` for per-sample gradients and
clipping; privfl's :class:`~privfl.defenses.rng.NoiseSource` (``dp.noise``) for the Gaussian noise
in place of opacus' own draw and for the Poisson sampling
(:func:`~privfl.defenses.dpsgd.poisson_loader`); :meth:`DPSGD.resolve_noise_multiplier
<privfl.defenses.dpsgd.DPSGD.resolve_noise_multiplier>` for the noise multiplier; and the model's
:class:`~privfl.defenses.accounting.PrivacyAccountant` (``dp.make_accountant``) for ε. It is what the
DP-CVAE (:mod:`privfl.sharing.dpcvae`) and the DP-CGAN (:mod:`privfl.sharing.dpcgan`) train with.

Unit of privacy and what is covered
-----------------------------------
One row of ``x`` (with its label ``y``): one embedding, i.e. one image of one client, under
add/remove adjacency. Everything computed from the model's parameters after training (its weights,
anything sampled from it, any model trained on those samples) is post-processing and covered by the
(ε, δ) of :attr:`DPTrainResult.epsilon_report` — for the model's whole training, given the whole
``accountant_state``. Not covered: :attr:`DPTrainResult.loss` (computed on the private data without
noise), and the dataset size ``n`` (public, as everywhere in opacus: it sets ``q`` and the number of
steps). Rows of one patient or slide are correlated; a patient with ``k`` rows has only group
privacy (about ``k·ε``).

Mechanism and accounting
------------------------
An *epoch* is ``1/q`` steps. Each step Poisson-samples every row independently with rate
``q = 1 / ceil(n / batch_size)`` (``batch_size / n`` when ``batch_size`` divides ``n``, slightly
less otherwise), clips each sample's gradient — over all trained parameters joined — to L2 norm
``dp.max_grad_norm``, sums, adds ``N(0, (z·C)²)`` per coordinate and divides by the expected batch
size ``int(n·q)``. Empty batches still add noise and are accounted. The call records one event
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), epochs/q)``
(:func:`~privfl.defenses.dpsgd.dpsgd_event`), with its floating-point δ floor, in the accountant
restored from ``accountant_state``, and returns the new state; ε is the tightest valid bound among
``dp.accountants``.

The noise multiplier ``z`` is ``dp.resolve_noise_multiplier(q, total_epochs/q)``: with
``DPSGD(target_epsilon=...)`` it is calibrated for the **whole planned run** (``total_epochs``,
e.g. ``rounds × local_epochs`` of a federated run), so that ε after the last call is at most the
target (within calibrate's tolerance) and each earlier call reports the smaller ε spent so far.

Randomness
----------
The DP noise and the Poisson sampling come from ``dp.noise``: with the default
:class:`~privfl.defenses.rng.SecureNoise` both are ChaCha20 keyed from ``os.urandom``. With
:class:`~privfl.defenses.rng.SeededNoise` (experiments, **not private**: noise and batches are
predictable from the seed) the sampling is keyed by ``("train_dp-sampling", seed, step)`` and the
noise by ``("train_dp", seed, step, parameter)``, so a run replays exactly. Any other randomness of
the loss (a VAE's reparameterisation, a GAN's fake samples) uses torch's global RNG, which
:func:`train_dp` seeds from ``seed`` inside ``torch.random.fork_rng``: the caller's RNG state is
left untouched.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from privfl.defenses.accounting import EpsilonReport
from privfl.defenses.dpsgd import (
    DPSGD,
    dpsgd_event,
    make_private,
    noised_steps,
    poisson_loader,
    round_delta_floor,
)
from privfl.seeding import derive_seed

__all__ = ["OPTIMIZERS", "DPTrainResult", "train_dp"]

OPTIMIZERS = ("sgd", "adam")
"""Optimizers :func:`train_dp` accepts (plain SGD without momentum, or Adam with torch defaults)."""

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class DPTrainResult:
    """What :func:`train_dp` returns.

    Attributes:
        loss: mean per-sample loss over the samples drawn in this call (NaN if every batch was
            empty). Computed on the private data without noise: **not** covered by the DP guarantee.
        accountant_state: the ``state_dict()`` of the model's
            :class:`~privfl.defenses.accounting.PrivacyAccountant` after this call (the
            ``accountant_state`` passed in plus this call's event); JSON-able, pass it back next call.
        epsilon: ε of ``accountant_state`` (the tightest valid bound among ``dp.accountants``).
        delta: the δ ``epsilon`` holds at (``dp.delta`` plus the floating-point δ floor).
        epsilon_report: the full :class:`~privfl.defenses.accounting.EpsilonReport`.
        noise_multiplier: ``z`` of this call (noise std / clip norm).
        steps: noisy steps of this call (``epochs / sample_rate``).
        sample_rate: Poisson sampling rate ``q`` of this call.
    """

    loss: float
    accountant_state: dict[str, Any] = field(default_factory=dict)
    epsilon: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    steps: int = 0
    sample_rate: float = 0.0
    epsilon_report: EpsilonReport | None = None

    @property
    def event(self) -> dp_accounting.DpEvent:
        """This call's dp-accounting event (:func:`~privfl.defenses.dpsgd.dpsgd_event` of
        ``(z, q, steps)``)."""
        return dpsgd_event(self.noise_multiplier, self.sample_rate, self.steps)


def _check_inputs(
    x: Tensor, y: Tensor, epochs: int, total_epochs: int, lr: float, batch_size: int, optimizer: str
) -> None:
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"need x of shape (n, ...) and y of shape (n,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError("no training samples")
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if int(total_epochs) != total_epochs or total_epochs < epochs:
        raise ValueError(f"total_epochs must be an integer >= epochs ({epochs}), got {total_epochs!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def train_dp(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    dp: DPSGD,
    total_epochs: int | None = None,
    params: Iterable[nn.Parameter] | None = None,
    seed: int = 0,
    accountant_state: Mapping[str, Any] | None = None,
    optimizer: str = "sgd",
    between_steps: Callable[[], None] | None = None,
) -> DPTrainResult:
    """Train ``model`` **in place** for ``epochs`` epochs of DP-SGD on ``(x, y)`` (module docstring).

    Args:
        model: an opacus-compatible module (no BatchNorm). opacus' hooks are attached for the call
            and removed afterwards; the module comes back a plain ``nn.Module`` in train mode.
        x: the client's data, ``(n, ...)``; moved to the model's device batch by batch.
        y: its labels, ``(n,)`` (any dtype), passed to ``loss_fn`` with ``x``.
        loss_fn: ``loss_fn(model, xb, yb)`` → per-sample losses of shape ``(B,)`` (``B`` may be 0).
            Each loss may depend only on its own sample (and on data-independent randomness);
            a batch-coupled loss would defeat per-sample clipping.
        epochs: epochs of this call (``ceil(n / batch_size)`` Poisson steps each).
        lr: learning rate.
        batch_size: expected batch size ``B``; ``q = 1 / ceil(n / B)``.
        dp: clip norm, noise multiplier or target ε, δ, accountant and noise source.
        total_epochs: epochs of the whole planned run, for calibrating ``z`` against
            ``dp.target_epsilon`` (default ``epochs``: this call is the whole run).
        params: the parameters to train (default all of ``model``'s); the others are frozen for
            the call. Clipping is over these parameters joined.
        seed: keys sampling and noise when ``dp.noise`` is a seeded source, and seeds the loss' own
            randomness (torch's RNG, forked) always. Use a different seed per call.
        accountant_state: the model's accountant after its earlier calls
            (``result.accountant_state`` of the previous call; ``None`` for the first).
        optimizer: ``"sgd"`` (no momentum) or ``"adam"``.
        between_steps: called after every DP-SGD step with opacus' hooks disabled (the DP-CGAN's
            generator step: it may run ``model`` forward and backward, but must not touch
            ``model``'s ``.grad``, e.g. use ``torch.autograd.grad`` on its own parameters).

    Returns:
        A :class:`DPTrainResult` with this call's event and ε over the whole history.

    Raises :class:`~privfl.defenses.accounting.DeltaFloorError` before training when the
    floating-point δ floor would exceed what ``dp.delta`` allows.
    """
    total = epochs if total_epochs is None else total_epochs
    _check_inputs(x, y, epochs, total, lr, batch_size, optimizer)
    acct = dp.make_accountant(accountant_state)  # validates the state before any training
    trained = list(model.parameters()) if params is None else list(params)
    if not trained:
        raise ValueError("no parameters to train")
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for p in trained):
        raise ValueError("params must be parameters of model")
    chosen = {id(p) for p in trained}
    frozen = [p for p in model.parameters() if id(p) not in chosen and p.requires_grad]
    dev = next(iter(trained)).device

    data = TensorDataset(x.detach().cpu(), y.detach().cpu())
    loader = poisson_loader(data, batch_size, dp.noise, key=("train_dp-sampling", seed))
    per_epoch = len(loader)
    sample_rate = loader.batch_sampler.sample_rate  # type: ignore[union-attr]  # = 1 / per_epoch
    steps = epochs * per_epoch
    z = dp.resolve_noise_multiplier(sample_rate, total * per_epoch)
    base = torch.optim.SGD(trained, lr=lr) if optimizer == "sgd" else torch.optim.Adam(trained, lr=lr)

    fork_devices = (
        [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    )
    loss_sum, seen = 0.0, 0
    for p in frozen:
        p.requires_grad_(False)
    model.train()
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(derive_seed(seed, "train_dp-torch"))
            engine, gsm, dp_optimizer, dp_loader = make_private(
                model, base, loader, z, dp, ("train_dp", seed)
            )
            event = dpsgd_event(z, sample_rate, steps)
            floor = round_delta_floor(dp.noise, dp_optimizer.params, steps)
            try:
                acct.check_budget(event, delta_floor=floor)  # DeltaFloorError before, not after, training
                for _ in range(epochs):
                    for xb, yb in dp_loader:
                        xb, yb = xb.to(dev), yb.to(dev)
                        dp_optimizer.zero_grad(set_to_none=True)
                        losses = loss_fn(model, xb, yb)
                        if losses.shape != (xb.shape[0],):
                            raise ValueError(
                                f"loss_fn must return per-sample losses of shape ({xb.shape[0]},), "
                                f"got {tuple(losses.shape)}"
                            )
                        # opacus' "mean" reduction: the batch mean (an empty batch contributes nothing)
                        loss = losses.mean() if xb.shape[0] else losses.sum()
                        if not torch.isfinite(loss):
                            raise FloatingPointError("non-finite loss in train_dp")
                        loss.backward()
                        dp_optimizer.step()
                        if between_steps is not None:
                            gsm.disable_hooks()
                            try:
                                between_steps()
                            finally:
                                gsm.enable_hooks()
                        loss_sum += float(losses.detach().sum())
                        seen += int(xb.shape[0])
            finally:
                gsm.to_standard_module()  # removes opacus' hooks and per-sample gradients from model
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in trained:
            p.grad = None

    recorded = noised_steps(engine)
    if recorded != steps:  # every step, empty batches included, must have been noised and accounted
        raise RuntimeError(f"opacus accounted {recorded} noisy steps, expected {steps}")
    acct.record(event, delta_floor=floor)
    report = acct.epsilon()
    return DPTrainResult(
        loss=loss_sum / seen if seen else math.nan,
        accountant_state=acct.state_dict(),
        epsilon=report.epsilon,
        delta=report.delta,
        noise_multiplier=z,
        steps=steps,
        sample_rate=sample_rate,
        epsilon_report=report,
    )
