"""Segmentation losses: cross-entropy plus soft Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 − mean soft Dice over all classes (background included, as in the DHUnet reference).

    ``logits``: (B, C, H, W); ``target``: (B, H, W) integer class map.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.pow(2).sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice.mean()


class CEDiceLoss(nn.Module):
    """``ce_weight · CE + dice_weight · soft Dice`` on one logit map (defaults 0.5 / 0.5)."""

    def __init__(self, ce_weight: float = 0.5, dice_weight: float = 0.5):
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target)
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(logits, target)


class DHUNetLoss(nn.Module):
    """DHU-Net's deep-supervised loss: each output scored with ``0.5·CE + 0.5·soft Dice``, combined as
    ``0.5·final + 0.3·(1/4-resolution head) + 0.2·mean(1/8 and 1/16 heads)``.

    Accepts the training-mode output ``(logits, (deep_1/4, deep_1/8, deep_1/16))`` or a plain logit
    map (then only the per-output loss is returned). Weights sum to 1, so the loss is on the same
    scale as :class:`CEDiceLoss`.
    """

    def __init__(self, weights: tuple[float, float, float] = (0.5, 0.3, 0.2)):
        super().__init__()
        self.weights = weights
        self.per_output = CEDiceLoss(0.5, 0.5)

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return self.per_output(output, target)
        logits, deep = output
        w_final, w_first, w_rest = self.weights
        loss = w_final * self.per_output(logits, target)
        if deep:
            loss = loss + w_first * self.per_output(deep[0], target)
            rest = deep[1:]
            if rest:
                loss = loss + w_rest * sum(self.per_output(d, target) for d in rest) / len(rest)
        return loss


def default_loss(model: nn.Module) -> nn.Module:
    """The loss a model trains with by default: its own ``default_loss()`` if it defines one, else CE + Dice."""
    factory = getattr(model, "default_loss", None)
    return factory() if callable(factory) else CEDiceLoss()
