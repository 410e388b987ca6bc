"""Inverting Gradients (Geiping, Bauermeister, Dröge & Moeller, NeurIPS 2020) on privfl updates.

The attack reconstructs a client's training images from the update it shared. It optimises a dummy
batch ``x'`` (and, optionally, its masks) so that the update the dummy batch would produce matches
the observed one in *direction*:

    minimise  1 − cos(Δ(x'), Δ_obs)  +  tv · TV(x')     subject to  x' ∈ [0, 1]^(B×3×H×W)

with the cosine taken over all attacked parameters joined into one vector, ``TV`` the anisotropic
total variation (mean absolute difference of neighbouring pixels), Adam (lr 0.1) on the *sign* of
the gradient, the box constraint enforced by clamping after every step, the learning rate divided
by 10 at 3/8, 5/8 and 7/8 of the iterations, and several random restarts of which the one with
the lowest final loss is kept.

Two modes say what the update is:

* ``mode="gradient"`` — the gradient of the training loss at the model's current weights
  (``Δ(x') = ∇_θ L(θ; x', y')``). A one-step SGD delta is ``−η·gradient``: attack it in
  ``fedavg`` mode with ``local_steps=1`` (or negate it), since the cosine sees the sign.
* ``mode="fedavg"`` — a weight delta ``local − global`` after ``local_steps`` SGD steps with
  learning rate ``local_lr`` (optionally momentum and weight decay, as privfl's
  :class:`~privfl.fl.client.Client` trains), every step on the whole dummy batch. The attack
  differentiates through all local steps (``torch.func.functional_call``). This is what a privfl
  client sends: :meth:`Client.fit` returns ``local − global``, and the model given to the attack
  must hold the *global* weights the client started from.

Threat model
------------
The attacker is an honest-but-curious server (or anyone who reads a client's payload). It knows the
model architecture and the exact weights the update was computed at, the update itself (possibly
defended: noised, clipped, partially shared — it is attacked as it is), the batch size and image
size, the loss and, in ``fedavg`` mode, the local recipe (steps, learning rate, momentum, weight
decay). With ``masks="known"`` (the default, the worst case for the defender) it also knows the
segmentation masks and only recovers the images; with ``masks="joint"`` it optimises soft mask
logits along with the images. For classifiers the labels are given or recovered iDLG-style from
the classifier head (:func:`recover_labels`).

Simplifications: every stochastic layer (dropout, drop path) is off — in the attacker's favour.
BatchNorm uses its running statistics (``batchnorm="eval"``, the default), so each image's forward
pass does not depend on the rest of the batch, and the image's colour is not normalised away as it
is by batch statistics (with one image, train-mode BatchNorm removes per-channel shifts after the
first convolution). This is exact for a client that computed its update in eval mode and a
simplification otherwise. A client that trained in train mode normalised with batch statistics;
``batchnorm="train"`` makes the attacker do the same (the dummy batch's statistics; the model's
running buffers are never modified) and then reproduces privfl's :class:`~privfl.fl.client.Client`
delta exactly for models without stochastic layers. Running statistics only help the attacker when
they fit the data (a trained global model's): a freshly initialised model's (mean 0, variance 1)
make the update far less informative about the image. Use :func:`observe_update` to produce a
ground-truth update under exactly the attacker's assumptions.

What to expect (CPU, one 64×64 SyntheticHistology patch, masks known, 300 iterations; see
``benchmarks/RESULTS.md``): a UNet with a 48-channel first level recovers the tissue layout and
colours (about 20–21 dB PSNR); the default ``unet`` (16 channels at full resolution) and
``dhunet-tiny`` give far less — few full-resolution channels mean few equations per pixel.

Models: anything that maps ``(B, 3, H, W)`` in [0, 1] to logits — privfl's ``unet``, ``unet-tiny``,
``dhunet`` and ``dhunet-tiny``. The top-level module runs in training mode, so DHU-Net returns
``(logits, deep outputs)`` and its default loss (:class:`~privfl.models.losses.DHUNetLoss`, the one
privfl's FL loop trains it with) is used; ``loss="final"`` scores only the final logits with
``0.5·CE + 0.5·soft Dice`` (then the deep-supervision heads get no gradient in the dummy update,
so the observed update must have been made the same way). The attack runs on the model's device.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from torch import Tensor, nn
from torch.func import functional_call

from privfl.models.losses import CEDiceLoss, default_loss, soft_segmentation_loss
from privfl.progress import progress_bar
from privfl.seeding import derive_seed
from privfl.updates import InvalidUpdateError, Update

__all__ = [
    "InvertingGradients",
    "InversionResult",
    "LocalRecipe",
    "observe_update",
    "recover_labels",
    "total_variation",
]

Mode = Literal["gradient", "fedavg"]
MaskMode = Literal["known", "joint"]
Task = Literal["segmentation", "classification"]
BatchNormMode = Literal["eval", "train"]
LossSpec = Literal["default", "final"] | nn.Module

MODES = ("gradient", "fedavg")
MASK_MODES = ("known", "joint")
TASKS = ("segmentation", "classification")
DECAY_POINTS = (3 / 8, 5 / 8, 7 / 8)


# --------------------------------------------------------------------------------------------
# small pieces
# --------------------------------------------------------------------------------------------


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation of an image batch ``(B, C, H, W)``: the mean absolute difference
    of vertically plus horizontally neighbouring pixels (Geiping et al.'s image prior)."""
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    return dx + dy


def _final_logits_loss(output, target: Tensor) -> Tensor:
    logits = output[0] if isinstance(output, (tuple, list)) else output
    return CEDiceLoss()(logits, target)


def _classification_loss(output, target: Tensor) -> Tensor:
    logits = output[0] if isinstance(output, (tuple, list)) else output
    return F.cross_entropy(logits, target)


def recover_labels(head_grad: Tensor, batch_size: int = 1, *, is_delta: bool = False) -> Tensor:
    """iDLG label recovery (Zhao et al. 2020) from a classifier head's gradient.

    ``head_grad`` is the gradient of the cross-entropy loss with respect to the last layer's bias
    ``(C,)`` or weight ``(C, D)``. With softmax + CE, the bias gradient of one sample is
    ``p − onehot(y)``: negative only at the true label; the weight gradient is that times the
    (non-negative, post-ReLU) features, so the true label's row sums to a negative number.
    ``is_delta=True`` for a weight delta (``−lr × gradient`` and friends): the sign is flipped first.

    For ``batch_size == 1`` this is exact. For larger batches it is the usual heuristic
    (Wainakh et al. 2022): every class with a negative score is taken once, most negative first;
    remaining slots repeat the most negative class. Returns ``(batch_size,)`` int64 labels.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = head_grad.detach().float()
    if g.ndim == 2:
        score = g.sum(dim=1)
    elif g.ndim == 1:
        score = g
    else:
        raise ValueError(
            f"head_grad must be a bias (C,) or weight (C, D) gradient, got shape {tuple(g.shape)}"
        )
    if is_delta:
        score = -score
    order = torch.argsort(score)
    negative = [int(c) for c in order if score[c] < 0]
    labels = negative[:batch_size] or [int(order[0])]
    labels += [labels[0]] * (batch_size - len(labels))
    return torch.tensor(labels, dtype=torch.long)


def _head_names(model: nn.Module) -> tuple[str | None, str | None]:
    """Parameter names (weight, bias) of the last ``nn.Linear`` of ``model``."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        return None, None
    prefix = f"{last}." if last else ""
    bias = f"{prefix}bias" if getattr(model.get_submodule(last), "bias", None) is not None else None
    return f"{prefix}weight", bias


@contextlib.contextmanager
def _attack_mode(model: nn.Module, batchnorm: BatchNormMode) -> Iterator[None]:
    """Top-level module in training mode (its training output, e.g. DHU-Net's deep-supervision
    tuple), every submodule in eval mode (no dropout / drop path), BatchNorm in ``batchnorm`` mode.
    Restores every module's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        model.training = True
        if batchnorm == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass(frozen=True)
class LocalRecipe:
    """What the client's update is: the loss gradient (``mode="gradient"``) or the weight delta
    ``local − global`` after ``local_steps`` SGD steps with ``local_lr``, ``local_momentum`` and
    ``weight_decay`` (``mode="fedavg"``; every step on the whole batch)."""

    mode: Mode = "gradient"
    local_steps: int = 1
    local_lr: float = 0.01
    local_momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if not self.local_lr > 0:
            raise ValueError(f"local_lr must be > 0, got {self.local_lr}")
        if not 0 <= self.local_momentum < 1 or self.weight_decay < 0:
            raise ValueError("local_momentum must be in [0, 1) and weight_decay >= 0")


# --------------------------------------------------------------------------------------------
# the simulated client: update as a differentiable function of the data
# --------------------------------------------------------------------------------------------


class _Simulator:
    """The update a batch would produce (gradient, or delta after local SGD steps), differentiable
    with respect to the batch. Holds detached copies of the weights and buffers: the model is never
    modified."""

    def __init__(
        self,
        model: nn.Module,
        recipe: LocalRecipe,
        loss_fn: Callable[[object, Tensor], Tensor],
        batchnorm: BatchNormMode,
    ):
        self.model = model
        self.recipe = recipe
        self.loss_fn = loss_fn
        self.batchnorm = batchnorm
        self.params = {k: p.detach() for k, p in model.named_parameters()}
        self.trainable = {k for k, p in model.named_parameters() if p.requires_grad}
        # copies: train-mode BatchNorm updates running stats in place, never on the model's own buffers
        self.buffers = {k: b.detach().clone() for k, b in model.named_buffers()}

    def forward(self, params: Mapping[str, Tensor], x: Tensor):
        return functional_call(self.model, {**params, **self.buffers}, (x,), strict=False)

    def update(self, x: Tensor, target: Tensor, keys: Sequence[str], create_graph: bool) -> list[Tensor]:
        """The update entries for ``keys`` (a gradient in ``gradient`` mode, ``θ_E − θ_0`` in
        ``fedavg`` mode); differentiable w.r.t. ``x``/``target`` when ``create_graph``."""
        with _attack_mode(self.model, self.batchnorm):
            r = self.recipe
            if r.mode == "gradient":
                wanted = set(keys)
                trainable = {
                    k: p.detach().requires_grad_(True) for k, p in self.params.items() if k in wanted
                }
                params = {**self.params, **trainable}
                loss = self.loss_fn(self.forward(params, x), target)
                grads = torch.autograd.grad(
                    loss, [trainable[k] for k in keys], create_graph=create_graph, allow_unused=True
                )
                return [torch.zeros_like(trainable[k]) if g is None else g for k, g in zip(keys, grads)]
            theta = {k: p.detach().requires_grad_(k in self.trainable) for k, p in self.params.items()}
            start = dict(theta)
            names = [k for k in theta if k in self.trainable]
            velocity: dict[str, Tensor] = {}
            for step in range(r.local_steps):
                loss = self.loss_fn(self.forward(theta, x), target)
                grads = torch.autograd.grad(
                    loss, [theta[k] for k in names], create_graph=create_graph, allow_unused=True
                )
                new = dict(theta)
                for k, g in zip(names, grads):
                    if g is None:  # not in the graph: torch.optim.SGD skips it (no weight decay either)
                        continue
                    if not create_graph:
                        g = g.detach()
                    if r.weight_decay:
                        g = g + r.weight_decay * theta[k]
                    if r.local_momentum:
                        g = g if step == 0 else r.local_momentum * velocity[k] + g
                        velocity[k] = g
                    new[k] = theta[k] - r.local_lr * g
                    if not create_graph:
                        new[k] = new[k].detach().requires_grad_(True)
                theta = new
            return [theta[k] - start[k] for k in keys]


def _resolve_loss(
    model: nn.Module, loss: LossSpec, task: Task
) -> nn.Module | Callable[[object, Tensor], Tensor]:
    if isinstance(loss, nn.Module):
        return loss
    if loss not in ("default", "final"):
        raise ValueError(f"loss must be 'default', 'final' or an nn.Module, got {loss!r}")
    if task == "classification":
        return _classification_loss
    return default_loss(model) if loss == "default" else _final_logits_loss


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def observe_update(
    model: nn.Module,
    images: Tensor,
    masks: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    mode: Mode = "gradient",
    local_steps: int = 1,
    local_lr: float = 0.01,
    local_momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss: LossSpec = "default",
    batchnorm: BatchNormMode = "eval",
    task: Task = "segmentation",
) -> Update:
    """The ground-truth update of a client training on ``(images, masks)`` (or ``labels`` for a
    classifier), computed the way :class:`InvertingGradients` models it (see the module docstring).

    Returns ``{parameter name: tensor}`` (float32, on the CPU, every parameter of ``model``): the
    gradient at the model's weights (``mode="gradient"``) or ``local − global`` after
    ``local_steps`` SGD steps on the whole batch (``mode="fedavg"``). The model is not modified.
    """
    recipe = LocalRecipe(mode, local_steps, local_lr, local_momentum, weight_decay)
    _check_choice("task", task, TASKS)
    _check_choice("batchnorm", batchnorm, ("eval", "train"))
    target = labels if task == "classification" else masks
    if target is None:
        raise ValueError("observe_update needs the " + ("labels" if task == "classification" else "masks"))
    device = _device_of(model)
    sim = _Simulator(model, recipe, _resolve_loss(model, loss, task), batchnorm)
    keys = list(sim.params)
    values = sim.update(
        images.to(device, torch.float32), target.to(device, torch.long), keys, create_graph=False
    )
    return {k: v.detach().float().cpu().clone() for k, v in zip(keys, values)}


# --------------------------------------------------------------------------------------------
# the attack
# --------------------------------------------------------------------------------------------


@dataclass
class InversionResult:
    """What :meth:`InvertingGradients.reconstruct` returns (the best restart).

    Attributes:
        images: ``(B, 3, H, W)`` float32 in [0, 1], on the CPU.
        masks: ``(B, H, W)`` int64 (segmentation): the given masks (``known``) or the argmax of the
            optimised mask logits (``joint``); ``None`` for classification.
        labels: ``(B,)`` int64 labels used (classification), else ``None``.
        loss: the best restart's final objective (1 − cosine + tv · TV).
        history: the best restart's objective at every iteration.
        restart_losses: the final objective of every restart, in order.
        seconds: wall-clock time of the whole reconstruction (all restarts).
        iterations: iterations run in total (all restarts).
    """

    images: Tensor
    masks: Tensor | None
    loss: float
    history: list[float]
    seconds: float
    labels: Tensor | None = None
    restart_losses: list[float] = field(default_factory=list)
    iterations: int = 0

    @property
    def iterations_per_second(self) -> float:
        return self.iterations / self.seconds if self.seconds > 0 else float("nan")


class InvertingGradients:
    """Inverting Gradients (Geiping et al. 2020): reconstruct a client's batch from its update.

    Args:
        model: the model holding the weights the update was computed at (the *global* weights in
            ``fedavg`` mode). Not modified. The attack runs on its device.
        mode: ``"gradient"`` or ``"fedavg"`` (see the module docstring).
        local_steps: the client's local SGD steps (``fedavg`` mode only; every step uses the
            whole batch).
        local_lr: the client's local SGD learning rate (``fedavg`` mode only).
        local_momentum: the client's local SGD momentum (``fedavg`` mode only).
        weight_decay: the client's local SGD weight decay (``fedavg`` mode only).
        iterations: optimisation steps per restart.
        restarts: random initialisations; the lowest final objective wins.
        tv: weight of the total-variation prior. Geiping et al. use 1e-4 to 1e-2 on normalised
            natural images; on privfl's [0, 1] histology patches a strong prior, 1.0 (the default),
            gave the best reconstructions (benchmarks/RESULTS.md, "Inverting Gradients").
        lr: Adam's learning rate (on the sign of the gradient), ×0.1 at 3/8, 5/8, 7/8 of the run.
        masks: ``"known"`` (the attacker has the masks; the worst case) or ``"joint"`` (soft mask
            logits optimised with the images). Segmentation only.
        task: ``"segmentation"`` (masks) or ``"classification"`` (labels, recovered by iDLG when
            not given).
        loss: ``"default"`` (the model's training loss: DHUNetLoss for DHU-Net, else 0.5·CE +
            0.5·soft Dice; cross-entropy for classification), ``"final"`` (CE + Dice on the final
            logits only) or an ``nn.Module`` ``loss(output, target)``.
        batchnorm: ``"eval"`` (running statistics; default) or ``"train"`` (batch statistics).
        progress: show a rich progress bar (on stderr) with the current loss.
        seed: seeds the random initialisations (uniform in [0, 1]; restart ``r`` draws from
            ``derive_seed(seed, r, "inversion")``), so a reconstruction is reproducible on the CPU.

    Threat model: see the module docstring — the attacker knows the weights, the update, the batch
    size and image size, the local recipe and (``masks="known"``) the masks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: Mode = "gradient",
        local_steps: int = 1,
        local_lr: float = 0.01,
        local_momentum: float = 0.0,
        weight_decay: float = 0.0,
        iterations: int = 2000,
        restarts: int = 1,
        tv: float = 1.0,
        lr: float = 0.1,
        masks: MaskMode = "known",
        task: Task = "segmentation",
        loss: LossSpec = "default",
        batchnorm: BatchNormMode = "eval",
        progress: bool = True,
        seed: int = 0,
    ):
        self.recipe = LocalRecipe(mode, local_steps, local_lr, local_momentum, weight_decay)
        _check_choice("masks", masks, MASK_MODES)
        _check_choice("task", task, TASKS)
        _check_choice("batchnorm", batchnorm, ("eval", "train"))
        if iterations < 1 or restarts < 1:
            raise ValueError(f"iterations and restarts must be >= 1, got {iterations}, {restarts}")
        if tv < 0 or not lr > 0:
            raise ValueError(f"tv must be >= 0 and lr > 0, got tv={tv}, lr={lr}")
        if task == "classification" and masks == "joint":
            raise ValueError(
                "masks='joint' is for segmentation; classification labels come from iDLG or are given"
            )
        if not any(True for _ in model.parameters()):
            raise ValueError("the model has no parameters")
        self.model = model
        self.iterations = iterations
        self.restarts = restarts
        self.tv = tv
        self.lr = lr
        self.masks: MaskMode = masks
        self.task: Task = task
        self.loss_fn = _resolve_loss(model, loss, task)
        self.soft_loss: Callable[[object, Tensor], Tensor] | None = None
        if masks == "joint":  # "final" scores the final logits with CE + Dice: CEDiceLoss's soft form
            final = isinstance(loss, str) and loss == "final"
            self.soft_loss = soft_segmentation_loss(CEDiceLoss() if final else self.loss_fn)
        self.batchnorm: BatchNormMode = batchnorm
        self.progress = progress
        self.seed = seed

    # ---- validation -------------------------------------------------------------------------

    def attacked_keys(self, update: Mapping[str, Tensor]) -> list[str]:
        """The parameter names the attack matches (in model order), after checking ``update``.

        Raises :class:`~privfl.updates.InvalidUpdateError` (a ``ValueError``) for a key the model
        does not have, a shape that differs from the model's, a non-finite value, or an update with
        no parameter (or an all-zero one) to match. Floating buffers (BatchNorm running statistics,
        which privfl's client sends along) are accepted and ignored; a subset of the parameters (a
        partially shared update) is attacked on that subset.
        """
        if not isinstance(update, Mapping) or not update:
            raise InvalidUpdateError("the update must be a non-empty dict {parameter name: tensor}")
        params = dict(self.model.named_parameters())
        state = self.model.state_dict()
        unknown = [k for k in update if k not in state]
        if unknown:
            shown = ", ".join(repr(k) for k in unknown[:5]) + (" …" if len(unknown) > 5 else "")
            expected = ", ".join(repr(k) for k in list(params)[:3])
            raise InvalidUpdateError(
                f"{len(unknown)} update key(s) are not entries of this {type(self.model).__name__}: {shown}; "
                f"is the update from another model? its parameters are named like {expected}, …"
            )
        for k, v in update.items():
            if not isinstance(v, Tensor):
                raise InvalidUpdateError(f"update[{k!r}] is a {type(v).__name__}, not a tensor")
            if tuple(v.shape) != tuple(state[k].shape):
                raise InvalidUpdateError(
                    f"update[{k!r}] has shape {tuple(v.shape)}, the model's is {tuple(state[k].shape)}"
                )
        keys = [k for k in params if k in update]
        if not keys:
            raise InvalidUpdateError(
                "the update carries no parameter of the model (only buffers): nothing to match"
            )
        for k in keys:
            if not torch.isfinite(update[k]).all():
                raise InvalidUpdateError(f"update[{k!r}] has non-finite values")
        if all(not update[k].any() for k in keys):
            raise InvalidUpdateError(
                "the update is zero on every attacked parameter: its direction is undefined"
            )
        return keys

    def _probe(self, image_shape: Sequence[int]) -> int:
        """Check the model accepts ``image_shape``; return its number of output classes."""
        if len(image_shape) != 4 or any(int(s) < 1 for s in image_shape):
            raise ValueError(
                f"image_shape must be (B, C, H, W) with positive sizes, got {tuple(image_shape)}"
            )
        device = _device_of(self.model)
        sim = _Simulator(self.model, LocalRecipe(), self.loss_fn, self.batchnorm)
        x = torch.full(tuple(int(s) for s in image_shape), 0.5, device=device)
        try:
            with torch.no_grad(), _attack_mode(self.model, self.batchnorm):
                out = sim.forward(sim.params, x)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"the model does not accept images of shape {tuple(image_shape)}: {e}") from e
        logits = out[0] if isinstance(out, (tuple, list)) else out
        if self.task == "segmentation":
            if logits.ndim != 4 or tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
                raise ValueError(
                    f"segmentation needs (B, classes, H, W) logits; the model gives {tuple(logits.shape)}"
                )
        elif logits.ndim != 2:
            raise ValueError(
                f"classification needs (B, classes) logits; the model gives {tuple(logits.shape)}"
            )
        return int(logits.shape[1])

    def _check_targets(self, t: Tensor, shape: tuple[int, ...], num_classes: int, what: str) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{what} must be integer class indices, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{what} must have shape {shape} (batch size {shape[0]}), got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(
                f"{what} must be in 0..{num_classes - 1}, got values in {int(t.min())}..{int(t.max())}"
            )
        return t.long()

    # ---- the attack ---------------------------------------------------------------------------

    def reconstruct(
        self,
        update: Mapping[str, Tensor],
        image_shape: Sequence[int],
        masks: Tensor | None = None,
        *,
        labels: Tensor | None = None,
    ) -> InversionResult:
        """Reconstruct the batch behind ``update``.

        Args:
            update: ``{parameter name: tensor}`` — what the client sent (a gradient in ``gradient``
                mode, ``local − global`` in ``fedavg`` mode), defended or not, whole or partial.
            image_shape: ``(B, 3, H, W)`` of the batch (the attacker knows the batch size).
            masks: ``(B, H, W)`` class indices; required with ``masks="known"``, ignored (may be
                omitted) with ``masks="joint"``.
            labels: ``(B,)`` class indices for ``task="classification"``; recovered with
                :func:`recover_labels` from the last ``nn.Linear`` when omitted.
        """
        keys = self.attacked_keys(update)
        num_classes = self._probe(image_shape)
        shape = tuple(int(s) for s in image_shape)
        b, _, h, w = shape
        device = _device_of(self.model)

        fixed_target: Tensor | None = None
        out_labels: Tensor | None = None
        if self.task == "classification":
            if labels is None:
                labels = self._idlg(update, b)
            fixed_target = self._check_targets(labels, (b,), num_classes, "labels").to(device)
            out_labels = fixed_target.cpu()
        elif self.masks == "known":
            if masks is None:
                raise ValueError("masks='known' needs the masks: pass masks=(B, H, W), or use masks='joint'")
            fixed_target = self._check_targets(masks, (b, h, w), num_classes, "masks").to(device)

        observed = [update[k].detach().to(device, torch.float32) for k in keys]
        # sum() of tensors is a tensor: keys (checked by attacked_keys) is never empty
        obs_norm = torch.sqrt(cast(Tensor, sum((o * o).sum() for o in observed)))
        sim = _Simulator(
            self.model,
            self.recipe,
            self.soft_loss if self.soft_loss is not None else self.loss_fn,
            self.batchnorm,
        )

        def objective(x: Tensor, mask_logits: Tensor | None) -> Tensor:
            target = fixed_target if mask_logits is None else mask_logits.softmax(dim=1)
            assert target is not None  # fixed targets unless masks='joint', which has mask logits
            dummy = sim.update(x, target, keys, create_graph=True)
            dot = sum((d * o).sum() for d, o in zip(dummy, observed))
            norm = torch.sqrt(cast(Tensor, sum((d * d).sum() for d in dummy)))
            cos = dot / (norm * obs_norm).clamp_min(1e-30)
            return 1 - cos + self.tv * total_variation(x)

        start = time.perf_counter()
        best: tuple[float, Tensor, Tensor | None, list[float]] | None = None
        restart_losses: list[float] = []
        with self._progress_bar() as bar:
            for r in range(self.restarts):
                task_id = bar.add_task(
                    f"restart {r + 1}/{self.restarts}", total=self.iterations, loss=float("nan")
                )
                gen = torch.Generator().manual_seed(derive_seed(self.seed, r, "inversion"))
                x = torch.rand(shape, generator=gen).to(device).requires_grad_(True)
                mask_logits = None
                if self.masks == "joint" and self.task == "segmentation":
                    mask_logits = (
                        torch.randn((b, num_classes, h, w), generator=gen).to(device).requires_grad_(True)
                    )
                variables = [x] if mask_logits is None else [x, mask_logits]
                opt = torch.optim.Adam(variables, lr=self.lr)
                milestones = sorted({max(1, int(p * self.iterations)) for p in DECAY_POINTS})
                sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
                history: list[Tensor] = []
                every = max(1, self.iterations // 100)
                for i in range(self.iterations):
                    opt.zero_grad(set_to_none=True)
                    loss = objective(x, mask_logits)
                    grads = torch.autograd.grad(loss, variables)
                    for v, g in zip(variables, grads):
                        v.grad = g.sign()
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        x.clamp_(0, 1)
                    history.append(loss.detach())
                    if (i + 1) % every == 0 or i + 1 == self.iterations:
                        bar.update(task_id, completed=i + 1, loss=float(loss.detach()))
                    if not torch.isfinite(loss):
                        break
                final = float(objective(x, mask_logits).detach())  # the score of the final candidate
                if not math.isfinite(final):
                    final = math.inf
                restart_losses.append(final)
                bar.update(task_id, completed=self.iterations, loss=final)
                if best is None or final < best[0]:
                    best = (
                        final,
                        x.detach().clone(),
                        None if mask_logits is None else mask_logits.detach().clone(),
                        [float(v) for v in history],
                    )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        assert best is not None
        final, images, mask_logits, best_history = best
        if self.task == "classification":
            out_masks = None
        elif mask_logits is not None:
            out_masks = mask_logits.argmax(dim=1).cpu()
        else:
            assert fixed_target is not None
            out_masks = fixed_target.cpu()
        return InversionResult(
            images=images.cpu(),
            masks=out_masks,
            loss=final,
            history=best_history,
            seconds=seconds,
            labels=out_labels,
            restart_losses=restart_losses,
            iterations=self.iterations * self.restarts,
        )

    def _idlg(self, update: Mapping[str, Tensor], batch_size: int) -> Tensor:
        weight, bias = _head_names(self.model)
        for name in (bias, weight):
            if name is not None and name in update:
                return recover_labels(update[name], batch_size, is_delta=self.recipe.mode == "fedavg")
        raise ValueError(
            "labels were not given and the update has no classifier head (last nn.Linear) to recover "
            "them from; pass labels="
        )

    def _progress_bar(self) -> Progress:
        return progress_bar(
            self.progress,
            "inversion {task.description}",
            status="loss {task.fields[loss]:.4f}",
            console=Console(stderr=True),
        )
