"""Segmentation models and the ``build_model`` registry."""

from privfl.models.dhunet import DHUNet, DHUNetConfig
from privfl.models.losses import CEDiceLoss, DHUNetLoss, default_loss
from privfl.models.registry import build_model, list_models, register_model
from privfl.models.unet import UNet

__all__ = [
    "CEDiceLoss",
    "DHUNet",
    "DHUNetConfig",
    "DHUNetLoss",
    "UNet",
    "default_loss",
    "build_model",
    "list_models",
    "register_model",
]
