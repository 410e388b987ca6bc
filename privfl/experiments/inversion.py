"""The fixed case of the Inverting Gradients benchmark (``python -m privfl.bench inversion``).

:func:`fixed_case` builds it: one SyntheticHistology patch and its mask, and a model whose
BatchNorm running statistics are estimated on other synthetic patches (:func:`calibrate_batchnorm`),
as a trained global model's are. :func:`dp_protect` is the defended update the benchmark attacks
besides the undefended one. The attack itself is :class:`~privfl.attacks.inversion.InvertingGradients`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from privfl.data.synthetic import SyntheticHistology
from privfl.defenses import ClipUpdate, Compose, GaussianMechanism
from privfl.defenses.base import RoundContext
from privfl.defenses.rng import SeededNoise
from privfl.models import build_model
from privfl.updates import Update, global_l2_norm

__all__ = ["calibrate_batchnorm", "dp_protect", "fixed_case"]


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to the (cumulative) average over ``images``, in
    place, as a trained global model's are; weights are untouched. Training flags are restored."""
    flags = [(m, m.training) for m in model.modules()]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        model.train()
        with torch.no_grad():
            for chunk in images.split(8):
                model(chunk)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for module, flag in flags:
            module.training = flag


def fixed_case(
    model_name: str = "unet",
    *,
    size: int = 64,
    seed: int = 0,
    widths: tuple[int, ...] | None = None,
    calibrate: int = 16,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model in eval mode, image (1, 3, size, size), mask (1, size, size))`` of the benchmark case."""
    kwargs: dict[str, Any] = {}
    if widths is not None:
        kwargs["widths"] = tuple(widths)
    if model_name.startswith("dhunet"):
        kwargs["img_size"] = size
    torch.manual_seed(seed)
    model = build_model(model_name, **kwargs)
    if calibrate > 0:
        other = SyntheticHistology(calibrate, size=size, seed=seed + 1)
        calibrate_batchnorm(model, torch.stack([other[i][0] for i in range(calibrate)]))
    model.eval().to(device)
    image, mask = SyntheticHistology(1, size=size, seed=seed)[0]
    return model, image[None].to(device), mask[None].to(device)


def dp_protect(update: Update, noise_multiplier: float, clip: float | None = None, seed: int = 0) -> Update:
    """The update after ``Compose(ClipUpdate(C), GaussianMechanism(z, sensitivity=C, local))`` as one
    client's ``protect`` (``C`` = the update's own L2 norm when ``clip`` is None; seeded noise)."""
    c = clip if clip is not None else global_l2_norm(update)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not cryptographically secure")
        defense = Compose(
            ClipUpdate(c),
            GaussianMechanism(
                noise_multiplier=noise_multiplier, sensitivity=c, placement="local", noise=SeededNoise(seed)
            ),
        )
    ctx = RoundContext(round=0, num_clients=1, sampled=(0,), weights=(1.0,), client_id=0, seed=seed)
    return defense.protect(update, ctx)
