"""Device and precision through Lightning Fabric: CUDA + bf16 autocast when present, CPU fp32 otherwise."""

from __future__ import annotations

from typing import Any, cast

import torch
from lightning.fabric import Fabric


def default_precision(accelerator: str = "auto") -> str:
    """``"bf16-mixed"`` when training will run on CUDA, else ``"32-true"``."""
    on_cuda = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    return "bf16-mixed" if on_cuda else "32-true"


def make_fabric(accelerator: str = "auto", precision: str | None = None) -> Fabric:
    """A single-device Fabric; ``precision=None`` picks :func:`default_precision`."""
    # Fabric validates the string itself; its Literal type of accepted values is private to lightning
    chosen = cast(Any, precision or default_precision(accelerator))
    return Fabric(accelerator=accelerator, devices=1, precision=chosen)


def prepare_model(model: torch.nn.Module, fabric: Fabric) -> torch.nn.Module:
    """Move a model to Fabric's device; channels_last on CUDA (faster convolutions under bf16)."""
    model = model.to(fabric.device)
    if fabric.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
