"""Segmentation losses: cross-entropy plus soft Dice.

Every loss here has a **per-sample** variant (``per_sample=True``, or :func:`per_sample_loss` /
``loss.per_sample_version()``) for sample-level DP-SGD. The default soft Dice sums intersections
and areas over the whole batch before dividing, so one image's loss term depends on every other
image in the batch; per-sample gradient clipping then bounds nothing meaningful (a sample can move
the gradients attributed to the others). The per-sample variants compute each image's loss from
that image alone and return their mean over the batch, ``(1/B) Σ_i ℓ_i`` — exactly the
``loss_reduction="mean"`` form that opacus' per-sample gradients assume. An empty batch (Poisson
sampling can draw one) gives a zero loss that is still connected to the graph.

:class:`CEDiceLoss` and :class:`DHUNetLoss` also have a **soft-target** form (``loss.soft``, or
:func:`soft_segmentation_loss`): the same loss against a target of class probabilities
``(B, C, H, W)`` instead of class indices, equal to the loss itself on one-hot targets. Gradient
inversion uses it to optimise mask logits jointly with the images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _batch_mean(per_image: torch.Tensor) -> torch.Tensor:
    """Mean over the batch axis, 0 (not NaN) for an empty batch."""
    return per_image.sum() / max(per_image.shape[0], 1)


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5, per_sample: bool = False
) -> torch.Tensor:
    """1 − mean soft Dice over all classes (background included, as in the DHUnet reference).

    ``logits``: (B, C, H, W); ``target``: (B, H, W) integer class map.

    ``per_sample=False`` (the DHUnet reference): intersections and areas are summed over the batch
    and the pixels, then one Dice per class is taken — every image's loss is coupled to the others.
    ``per_sample=True``: one Dice per image and class (sums over H and W only); the loss is the mean
    over the batch of the per-image ``1 − mean_c Dice``, so each image's term depends on that image
    alone (needed for per-sample clipping in DP-SGD). Both agree for a batch of one.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (2, 3) if per_sample else (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.pow(2).sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)  # (B, C) per sample, else (C,)
    if per_sample:
        return _batch_mean(1 - dice.mean(dim=1))
    return 1 - dice.mean()


def _soft_ce_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    ce_weight: float,
    dice_weight: float,
    per_sample: bool,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``ce_weight · CE + dice_weight · soft Dice`` against a *soft* target ``(B, C, H, W)`` of class
    probabilities; equal to :class:`CEDiceLoss` when the target is one-hot."""
    logits = logits.float()
    logp = logits.log_softmax(dim=1)
    ce_map = -(target * logp).sum(dim=1)  # (B, H, W)
    ce = ce_map.flatten(1).mean(dim=1).mean() if per_sample else ce_map.mean()
    probs = logp.exp()
    dims = (2, 3) if per_sample else (0, 2, 3)
    inter = (probs * target).sum(dims)
    denom = probs.pow(2).sum(dims) + target.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    dice_loss = (1 - dice.mean(dim=1)).mean() if per_sample else 1 - dice.mean()
    return ce_weight * ce + dice_weight * dice_loss


class CEDiceLoss(nn.Module):
    """``ce_weight · CE + dice_weight · soft Dice`` on one logit map (defaults 0.5 / 0.5).

    ``per_sample=True``: Dice per image (see :func:`soft_dice_loss`) and CE as the batch mean of
    per-image pixel means, so the loss is ``(1/B) Σ_i ℓ_i`` with ``ℓ_i`` a function of image ``i``
    alone (what DP-SGD's per-sample clipping needs). ``per_sample=False`` is the DHUnet recipe.
    """

    def __init__(self, ce_weight: float = 0.5, dice_weight: float = 0.5, per_sample: bool = False):
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.per_sample = per_sample

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.per_sample:
            ce = _batch_mean(F.cross_entropy(logits.float(), target, reduction="none").flatten(1).mean(dim=1))
        else:
            ce = F.cross_entropy(logits.float(), target)
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(
            logits, target, per_sample=self.per_sample
        )

    def soft(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The same loss against a soft ``target`` ``(B, C, H, W)`` of class probabilities (equal to
        the loss on one-hot targets)."""
        return _soft_ce_dice(logits, target, self.ce_weight, self.dice_weight, self.per_sample)

    def per_sample_version(self) -> CEDiceLoss:
        """A copy with the same weights and ``per_sample=True``."""
        return CEDiceLoss(self.ce_weight, self.dice_weight, per_sample=True)

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, dice_weight={self.dice_weight}, per_sample={self.per_sample}"


class DHUNetLoss(nn.Module):
    """DHU-Net's deep-supervised loss: each output scored with ``0.5·CE + 0.5·soft Dice``, combined as
    ``0.5·final + 0.3·(1/4-resolution head) + 0.2·mean(1/8 and 1/16 heads)``.

    Accepts the training-mode output ``(logits, (deep_1/4, deep_1/8, deep_1/16))`` or a plain logit
    map (then only the per-output loss is returned). Weights sum to 1, so the loss is on the same
    scale as :class:`CEDiceLoss`. ``per_sample=True`` scores every output with the per-sample
    :class:`CEDiceLoss`; a weighted sum of batch means of per-image terms is again one.
    """

    def __init__(self, weights: tuple[float, float, float] = (0.5, 0.3, 0.2), per_sample: bool = False):
        super().__init__()
        self.weights = weights
        self.per_sample = per_sample
        self.per_output = CEDiceLoss(0.5, 0.5, per_sample=per_sample)

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        return self._combine(output, target, self.per_output)

    def soft(self, output, target: torch.Tensor) -> torch.Tensor:
        """The same loss against a soft ``target`` ``(B, C, H, W)`` of class probabilities (equal to
        the loss on one-hot targets)."""
        return self._combine(output, target, self.per_output.soft)

    def _combine(
        self, output, target: torch.Tensor, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The deep-supervision weighting of ``score`` applied to each output."""
        if isinstance(output, torch.Tensor):
            return score(output, target)
        logits, deep = output
        w_final, w_first, w_rest = self.weights
        loss = w_final * score(logits, target)
        if deep:
            loss = loss + w_first * score(deep[0], target)
            rest = deep[1:]
            if rest:
                loss = loss + w_rest * sum(score(d, target) for d in rest) / len(rest)
        return loss

    def per_sample_version(self) -> DHUNetLoss:
        """A copy with the same weights and ``per_sample=True``."""
        return DHUNetLoss(self.weights, per_sample=True)


def per_sample_loss(loss_fn: nn.Module) -> nn.Module:
    """The per-sample variant of a privfl loss (see the module docstring): ``loss_fn`` itself when it
    already is one (``loss_fn.per_sample is True``), else ``loss_fn.per_sample_version()``.

    A loss of your own qualifies if it returns ``(1/B) Σ_i ℓ_i`` with ``ℓ_i`` depending on sample
    ``i`` only: give it ``per_sample = True`` (or a ``per_sample_version()`` method). Anything else
    raises ``TypeError`` — including ``nn.CrossEntropyLoss``, whose ``weight=`` normalisation couples
    the samples of a batch.
    """
    if getattr(loss_fn, "per_sample", False) is True:
        return loss_fn
    make = getattr(loss_fn, "per_sample_version", None)
    if callable(make):
        return make()
    raise TypeError(
        f"no per-sample variant known for {type(loss_fn).__name__}: DP-SGD needs a loss that is the batch "
        "mean of per-sample terms; use CEDiceLoss / DHUNetLoss, or give your loss `per_sample = True` (if it "
        "already is such a mean) or a `per_sample_version()` method"
    )


def soft_segmentation_loss(
    loss_fn: nn.Module | Callable[[object, torch.Tensor], torch.Tensor],
) -> Callable[[object, torch.Tensor], torch.Tensor]:
    """The soft-target version of a privfl segmentation loss, for jointly optimised masks.

    ``loss_fn`` must be a :class:`CEDiceLoss` or :class:`DHUNetLoss`; the returned function takes the
    model output (a :class:`CEDiceLoss` scores the final logits of a ``(logits, deep outputs)``
    tuple) and a target of class probabilities ``(B, C, H, W)``, and equals ``loss_fn`` on one-hot
    targets.

    Raises:
        TypeError: any other loss (it has no soft-target form).
    """
    if isinstance(loss_fn, DHUNetLoss):
        return loss_fn.soft
    if isinstance(loss_fn, CEDiceLoss):

        def ce_dice_soft(output, target: torch.Tensor) -> torch.Tensor:
            logits = output[0] if isinstance(output, (tuple, list)) else output
            return loss_fn.soft(logits, target)

        return ce_dice_soft
    raise TypeError(
        f"masks='joint' needs a loss with a soft-target form (CEDiceLoss or DHUNetLoss), "
        f"got {type(loss_fn).__name__}; use masks='known' with a custom loss"
    )


def default_loss(model: nn.Module) -> nn.Module:
    """The loss a model trains with by default: its own ``default_loss()`` if it defines one, else
    CE + Dice."""
    factory = getattr(model, "default_loss", None)
    return factory() if callable(factory) else CEDiceLoss()
