"""Segmentation models and the ``build_model`` registry."""

from privfl.models.registry import build_model, list_models, register_model
from privfl.models.unet import UNet

__all__ = ["UNet", "build_model", "list_models", "register_model"]
