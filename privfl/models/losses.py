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
