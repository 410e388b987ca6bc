"""Evaluation of a segmentation model on a dataset (Dice, Jaccard, accuracy on classes 1..C−1)."""

from __future__ import annotations

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privfl.metrics import SegmentationMeter, SegmentationResult


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, num_classes: int, fabric: Fabric, batch_size: int = 16
) -> SegmentationResult:
    """Metrics of ``model`` (eval mode) on ``data`` following the DHUnet conventions."""
    model.eval()
    meter = SegmentationMeter(num_classes)
    for images, masks in DataLoader(data, batch_size=batch_size, shuffle=False):
        images = fabric.to_device(images)
        with fabric.autocast():
            logits = model(images)
        meter.update(logits.float().argmax(1).cpu(), masks)
    return meter.compute()
