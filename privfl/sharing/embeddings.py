"""Frozen feature extractors that map image patches to embeddings, and `extract` over a dataset.

Di Salvo et al. (MICCAI 2025; docs/dpcvae.md) share synthetic *embeddings*, not images: each client maps
its images to vectors with a frozen, pre-trained feature extractor and trains its generator on
``(embedding, label)`` pairs. Two extractors are provided; neither downloads anything:

- `dhunet_encoder`: global-average-pooled deepest features of both encoder branches of a privfl
  DHU-Net (Swin + ConvNeXt). By default a randomly initialised ``dhunet-tiny``, i.e. random conv
  features; pass a trained (e.g. federated) DHU-Net for better ones.
- `timm_encoder`: any timm backbone with weights from a **local** checkpoint file.

Extraction itself is no privacy mechanism: embeddings of real images are personal data as much
as the images are.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privfl.models.registry import build_model
from privfl.progress import progress_bar
from privfl.seeding import torch_seeded

__all__ = ["DHUNetEncoder", "dhunet_encoder", "extract", "timm_encoder"]


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


class DHUNetEncoder(nn.Module):
    """Frozen DHU-Net encoder: ``(B, 3, S, S)`` images -> ``(B, embedding_dim)`` embeddings.

    The embedding is the concatenation ``[GAP(swin stage 4), GAP(convnext stage 4)]`` of the
    global-average-pooled deepest (1/32 resolution, ``8·C`` channels) feature maps of the global
    (Swin) and local (ConvNeXt) branches, so ``embedding_dim = 16·C`` (256 for ``dhunet-tiny``,
    1536 for the paper's ``dhunet``). Inputs must be ``img_size x img_size``, the size the DHU-Net
    was built for.

    The branches are deep copies of the given model's (its parameters are not frozen or shared).
    All parameters have ``requires_grad=False`` and the module stays in eval mode: ``train()`` is
    a no-op, so stochastic depth never fires and the features are deterministic. Build it with
    `dhunet_encoder`.
    """

    embedding_dim: int
    img_size: int

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner = getattr(model, "_module", model)  # an opacus GradSampleModule wraps the model
        branches = [getattr(inner, name, None) for name in ("global_branch", "local_branch")]
        if not all(isinstance(b, nn.Module) for b in branches):
            raise TypeError(
                "expected a privfl DHU-Net (with global_branch and local_branch encoders), got "
                f"{type(model).__name__}"
            )
        self.global_branch = copy.deepcopy(cast(nn.Module, branches[0]))
        self.local_branch = copy.deepcopy(cast(nn.Module, branches[1]))
        self.img_size = int(getattr(inner, "img_size", 0))
        if self.img_size < 32:
            raise TypeError(f"{type(inner).__name__} has no DHU-Net img_size; expected a privfl DHU-Net")
        _freeze(self)
        dims = getattr(getattr(inner, "config", None), "dims", None)
        if dims is not None:
            self.embedding_dim = 2 * int(dims[-1])
        else:
            with torch.no_grad():
                self.embedding_dim = int(
                    self._features(torch.zeros(1, 3, self.img_size, self.img_size)).shape[1]
                )

    def _deepest(self, branch: nn.Module, x: torch.Tensor) -> torch.Tensor:
        fi = getattr(branch, "forward_intermediates", None)
        if fi is None:
            raise TypeError(
                f"encoder branch {type(branch).__name__} has no forward_intermediates (not a timm model)"
            )
        feats = cast(list[torch.Tensor], fi(x, indices=1, intermediates_only=True))
        return feats[-1]  # NCHW, 1/32 resolution

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        g = self._deepest(self.global_branch, x).mean(dim=(2, 3))
        loc = self._deepest(self.local_branch, x).mean(dim=(2, 3))
        return torch.cat([g, loc], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, embedding_dim)`` of images ``(B, 3, img_size, img_size)``."""
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"this encoder takes (B, 3, {self.img_size}, {self.img_size}) images, got {tuple(x.shape)}; "
                f"build it with size=<your patch size> (a multiple of 32)"
            )
        return self._features(x)

    def train(self, mode: bool = True) -> DHUNetEncoder:
        """No-op that keeps the encoder in eval mode (it is frozen); returns ``self``."""
        return super().train(False)


def dhunet_encoder(model: nn.Module | None = None, *, size: int = 32, seed: int = 0) -> DHUNetEncoder:
    """A frozen DHU-Net feature extractor (see `DHUNetEncoder`): images -> pooled deepest features.

    Args:
        model: a privfl DHU-Net (``build_model("dhunet")`` / ``"dhunet-tiny"``, plain or through
            :func:`~privfl.models.dp_compat.make_private_compatible`), e.g. one trained with
            :func:`privfl.fl.run_federated`. It is copied, not modified. ``size`` is then ignored:
            inputs must match the model's own ``img_size``.
        size: patch side in pixels (a multiple of 32) of the default model.
        seed: ``torch.manual_seed`` used to initialise the default model.

    Default (``model=None``): ``build_model("dhunet-tiny", img_size=size)`` initialised under
    ``torch.manual_seed(seed)`` (the global RNG is restored afterwards) — **random** features,
    nothing downloaded, 256-dimensional. Random convolutional features are a known, weak-ish
    baseline extractor; the trained weights of a (federated) DHU-Net give better embeddings, so
    pass the model when you have one.
    """
    if model is None:
        if size < 32 or size % 32:
            raise ValueError(f"size must be a positive multiple of 32, got {size}")
        with torch_seeded(seed):
            model = build_model("dhunet-tiny", img_size=size)
    return DHUNetEncoder(model)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors ships with timm
            raise ImportError(f"reading {path} needs the 'safetensors' package") from exc
        obj: Any = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(obj, Mapping):  # unwrap {"model": sd} / {"state_dict": sd} checkpoints
        inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def timm_encoder(name: str, checkpoint: str | os.PathLike, *, img_size: int | None = None) -> nn.Module:
    """A frozen timm backbone with weights from a local checkpoint: images -> ``(B, embedding_dim)``.

    ``timm.create_model(name, pretrained=False, num_classes=0)`` (classifier removed, timm's
    default global pooling kept), then the state dict of ``checkpoint`` is loaded. Nothing is ever
    downloaded.

    Args:
        name: a timm model name, e.g. ``"resnet50"`` or ``"vit_small_patch16_224"``.
        checkpoint: local ``.pth`` / ``.pt`` (read with ``torch.load(weights_only=True)``) or
            ``.safetensors`` file holding a timm-layout state dict, possibly wrapped in
            ``"model"`` / ``"state_dict"`` and with DDP ``module.`` prefixes. Classifier weights
            in it are ignored.
        img_size: input size for models that take one (ViT, Swin); ``None``: the model default.

    Returns the timm model in eval mode with ``requires_grad=False`` everywhere and an int
    attribute ``embedding_dim`` (timm's ``num_features``).

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: the checkpoint is not a state dict, misses weights of the model, or holds
            weights the model does not have (other than the classifier).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint file not found: {path} (timm_encoder never downloads weights; "
            f"save a state dict of {name!r} there first)"
        )
    kwargs: dict[str, Any] = {} if img_size is None else {"img_size": img_size}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    state = _load_state_dict(path)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{path} does not fit timm model {name!r}: {exc}") from exc
    unexpected = [k for k in unexpected if not any(k.startswith(f"{h}.") for h in heads)]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit timm model {name!r}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    _freeze(model)
    setattr(model, "embedding_dim", int(cast(int, model.num_features)))  # noqa: B010 (nn.Module typing)
    return model


def extract(
    dataset: Dataset,
    extractor: nn.Module,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every item of a ``(image, label)`` dataset with a frozen extractor.

    Args:
        dataset: items ``(image 3xHxW, label int)``, e.g. :class:`~privfl.data.PatchClassification`
            or :class:`~privfl.data.ImageFolderPatches` (a segmentation dataset must be wrapped).
        extractor: module mapping ``(B, 3, H, W)`` to ``(B, D)`` (larger outputs are flattened);
            it is moved to ``device`` and put in eval mode.
        batch_size: images per forward pass.
        device: where the forward passes run.
        progress: show a rich progress bar.

    Returns ``(embeddings, labels)``: float32 ``(N, D)`` and int64 ``(N,)``, both on the CPU, in
    dataset order. Runs under ``torch.no_grad()``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot extract embeddings of an empty dataset")
    extractor = extractor.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.no_grad(), progress_bar(progress, "embeddings", status=None) as bar:
        task = bar.add_task("embeddings", total=n)
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError("extract needs a dataset of (image, label) items")
            images, y = batch
            y = torch.as_tensor(y)
            if y.ndim != 1:
                raise TypeError(
                    f"labels must be one integer per image, got shape {tuple(y.shape)} per batch; "
                    f"wrap a segmentation dataset in privfl.data.PatchClassification"
                )
            out = extractor(images.to(device))
            feats.append(out.reshape(out.shape[0], -1).float().cpu())
            labels.append(y.long().cpu())
            bar.advance(task, len(y))
    return torch.cat(feats), torch.cat(labels)
