"""Segmentation metrics with the DHUnet evaluation conventions.

Scores are computed **per image and per foreground class** ``c = 1 .. C-1`` (class 0, background,
is excluded), from the per-image pixel counts ``TP_c``, ``FP_c``, ``FN_c`` (prediction vs. truth):

===========================  ==========================  ================================
prediction / truth for c     Dice, Jaccard                pixel accuracy
===========================  ==========================  ================================
both empty                   1                            NaN (skipped)
prediction empty, truth not  0                            0
prediction present, truth    NaN (skipped)                NaN (skipped)
empty
both present                 2TP/(2TP+FP+FN),             TP/(TP+FN)
                             TP/(TP+FP+FN)
===========================  ==========================  ================================

*Pixel accuracy* of class ``c`` is the fraction of that class's true pixels that are predicted
as ``c``, ``TP_c / (TP_c + FN_c)`` (i.e. per-class recall / sensitivity), following the DHUnet
reference repository; it is undefined (NaN, skipped) for an image in which ``c`` is absent from
the truth. It is *not* the overall fraction of correctly labelled pixels.

Aggregation: for each class, the mean over images ignoring NaN (the per-class score, NaN if every
image was skipped); then the mean over the classes whose per-class score is not NaN (NaN if none).

Why not torchmetrics: ``torchmetrics.segmentation.DiceScore`` / ``MeanIoU`` (1.9) use a single
``zero_division`` rule, so with per-sample aggregation a class absent from both prediction and truth
gives NaN (or 0), not 1, and a class predicted but absent from the truth scores 0 instead of being
skipped. The DHUnet conventions therefore need the small vectorised implementation below (one
``bincount`` per batch for the per-image confusion matrices; works on any device).

All computations on counts are exact (int64); scores are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "SegmentationResult",
    "SegmentationMeter",
    "segmentation_scores",
    "summarize",
]

_SCORES = ("dice", "jaccard", "accuracy")


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ValueError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    return num_classes


def _check_labels(name: str, t: torch.Tensor, num_classes: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [B, H, W], got {tuple(t.shape)}")
    t = t.long()
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} has label values in [{lo}, {hi}], outside [0, {num_classes}) for "
                f"num_classes={num_classes}"
            )
    return t


def _confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image confusion matrices ``[B, C, C]`` (rows: truth, columns: prediction), int64."""
    b = target.shape[0]
    c = num_classes
    img = torch.arange(b, device=target.device).view(b, 1, 1)
    idx = (img * c + target) * c + pred
    counts = torch.bincount(idx.reshape(-1), minlength=b * c * c)
    return counts.view(b, c, c)


def segmentation_scores(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """Per-image, per-class Dice, Jaccard and pixel accuracy (DHUnet conventions, see module doc).

    Args:
        pred: predicted class indices, integer tensor ``[B, H, W]``.
        target: true class indices, integer tensor ``[B, H, W]`` (same shape).
        num_classes: ``C`` (including background 0); labels must lie in ``[0, C)``.

    Returns:
        A dict of CPU tensors of shape ``[B, C-1]`` (column ``j`` is class ``j + 1``):
        ``"dice"``, ``"jaccard"``, ``"accuracy"`` (float64, NaN where skipped) and the int64
        counts ``"tp"``, ``"fp"``, ``"fn"``.

    Raises:
        ValueError: ``num_classes < 2``, non-integer or non-3-D inputs, shape mismatch, or label
            values outside ``[0, num_classes)``.
    """
    num_classes = _check_num_classes(num_classes)
    if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor) and pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    target = _check_labels("target", target, num_classes)
    pred = _check_labels("pred", pred, num_classes).to(target.device)

    conf = _confusion(pred, target, num_classes)
    diag = torch.diagonal(conf, dim1=1, dim2=2)  # [B, C]
    tp = diag[:, 1:]
    fn = conf.sum(dim=2)[:, 1:] - tp  # truth c, predicted otherwise
    fp = conf.sum(dim=1)[:, 1:] - tp  # predicted c, truth otherwise
    tp, fp, fn = tp.cpu(), fp.cpu(), fn.cpu()

    truth = (tp + fn) > 0
    predicted = (tp + fp) > 0
    tpf, fpf, fnf = tp.double(), fp.double(), fn.double()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)

    # Denominators are > 0 wherever the value is used (truth present => tp+fn > 0).
    dice = 2 * tpf / (2 * tpf + fpf + fnf).clamp_min(1)
    jaccard = tpf / (tpf + fpf + fnf).clamp_min(1)
    both_empty = ~truth & ~predicted
    skipped = ~truth & predicted
    dice = torch.where(both_empty, one, torch.where(skipped, nan, dice))
    jaccard = torch.where(both_empty, one, torch.where(skipped, nan, jaccard))
    accuracy = torch.where(truth, tpf / (tpf + fnf).clamp_min(1), nan)
    return {"dice": dice, "jaccard": jaccard, "accuracy": accuracy, "tp": tp, "fp": fp, "fn": fn}


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


@dataclass(frozen=True)
class SegmentationResult:
    """Aggregated segmentation scores.

    Attributes:
        dice, jaccard, accuracy: means over the foreground classes 1..C-1 whose per-class score is
            defined (NaN if none is).
        per_class: ``{"dice": [...], "jaccard": [...], "accuracy": [...]}``; entry ``j`` of each list
            is class ``j + 1`` (nan-mean over images; NaN when every image was skipped).
        num_images: how many images went into the scores.
    """

    dice: float
    jaccard: float
    accuracy: float
    per_class: dict[str, list[float]] = field(default_factory=dict)
    num_images: int = 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable dict (NaN becomes ``None``, so strict JSON encoders accept it)."""
        return {
            "dice": _nan_to_none(self.dice),
            "jaccard": _nan_to_none(self.jaccard),
            "accuracy": _nan_to_none(self.accuracy),
            "per_class": {k: [_nan_to_none(v) for v in vs] for k, vs in self.per_class.items()},
            "num_images": self.num_images,
        }


def _result(sums: torch.Tensor, counts: torch.Tensor, num_images: int) -> SegmentationResult:
    """Build a result from per-score, per-class sums and counts of non-NaN values ``[3, C-1]``."""
    per = torch.where(counts > 0, sums / counts.clamp_min(1), torch.tensor(math.nan, dtype=torch.float64))
    means: list[float] = []
    for row in per:
        defined = row[~torch.isnan(row)]
        means.append(float(defined.mean()) if defined.numel() else math.nan)
    return SegmentationResult(
        dice=means[0],
        jaccard=means[1],
        accuracy=means[2],
        per_class={name: per[i].tolist() for i, name in enumerate(_SCORES)},
        num_images=num_images,
    )


def _sums_counts(scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack([scores[name] for name in _SCORES])  # [3, B, C-1]
    valid = ~torch.isnan(stacked)
    return torch.where(valid, stacked, 0.0).sum(dim=1), valid.sum(dim=1).double()


def summarize(scores: dict[str, torch.Tensor]) -> SegmentationResult:
    """Aggregate the output of :func:`segmentation_scores` (nan-mean over images, then over classes)."""
    sums, counts = _sums_counts(scores)
    return _result(sums, counts, int(scores["dice"].shape[0]))


class SegmentationMeter:
    """Streaming version of :func:`segmentation_scores` + :func:`summarize`.

    Keeps, per score and class, the sum and count of defined per-image values (float64), so memory
    is O(C) and ``compute()`` after several ``update`` calls equals the one-shot computation over
    the concatenated batches (up to float64 summation order).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        k = self.num_classes - 1
        self._sums = torch.zeros(len(_SCORES), k, dtype=torch.float64)
        self._counts = torch.zeros(len(_SCORES), k, dtype=torch.float64)
        self._num_images = 0

    def update(self, pred_or_logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred_or_logits: class indices ``[B, H, W]`` (integer) or scores/logits ``[B, C, H, W]``
                (any dtype; the prediction is the argmax over dim 1, ``C`` must equal num_classes).
            target: true class indices ``[B, H, W]``.
        """
        if not isinstance(pred_or_logits, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise ValueError("pred_or_logits and target must be torch.Tensor")
        if pred_or_logits.dim() == 4:
            if pred_or_logits.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {pred_or_logits.shape[1]} channels but num_classes={self.num_classes}"
                )
            pred = pred_or_logits.argmax(dim=1)
        elif pred_or_logits.dim() == 3:
            pred = pred_or_logits
        else:
            raise ValueError(
                f"pred_or_logits must be [B, H, W] class indices or [B, C, H, W] logits, "
                f"got shape {tuple(pred_or_logits.shape)}"
            )
        scores = segmentation_scores(pred.detach(), target.detach(), self.num_classes)
        sums, counts = _sums_counts(scores)
        self._sums += sums
        self._counts += counts
        self._num_images += int(target.shape[0])

    def compute(self) -> SegmentationResult:
        """Scores over every image seen since the last ``reset`` (NaN everywhere if none)."""
        return _result(self._sums, self._counts, self._num_images)
