"""FedAvg client: local SGD on its own data, returning a weight delta."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privfl.seeding import derive_seed, torch_generator
from privfl.models.losses import CEDiceLoss
from privfl.updates import Update

if TYPE_CHECKING:  # Lightning loads only when a Fabric is made (privfl.fl.device): seconds per process
    from lightning.fabric import Fabric

Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Per-sample joint augmentation ``(image 3×H×W, mask H×W) -> (image, mask)`` drawing from torch's
global RNG, which the client seeds per (seed, round, client)."""


class _Augmented(Dataset):
    def __init__(self, data: Dataset, augment: Augment):
        self.data, self.augment = data, augment

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return self.augment(*self.data[i])


@dataclass
class ClientConfig:
    """Local training recipe (defaults follow DHUnet: SGD momentum 0.9, wd 1e-4, poly lr power 0.9).

    ``local_steps`` (mini-batches per round) overrides ``local_epochs`` when set. The poly schedule
    runs over the whole federation: ``lr · (1 − t / T) ** poly_power`` with ``t`` the global step
    (round · steps per round + local step) and ``T`` = rounds · steps per round.
    """

    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.local_epochs < 1 or (self.local_steps is not None and self.local_steps < 1):
            raise ValueError("batch_size, local_epochs and local_steps must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def steps_per_round(self, num_samples: int) -> int:
        """Local optimizer steps in one round for a client with ``num_samples`` training samples."""
        if self.local_steps is not None:
            return self.local_steps
        return self.local_epochs * -(-num_samples // self.batch_size)


def trainable_state(model: nn.Module) -> Update:
    """The entries of ``state_dict`` that an update carries: floating parameters and buffers
    (BatchNorm running statistics included; integer counters such as ``num_batches_tracked`` are not)."""
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def load_state(model: nn.Module, state: Update) -> None:
    """Copy ``state`` into the model's matching entries, in place (dtype and device of the model kept)."""
    own = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def clamp_running_variances(model: nn.Module, state: Update) -> Update:
    """``state`` with every BatchNorm ``running_var`` of ``model`` clamped at 0, in place.

    A noised aggregate (DP) can push a running variance below zero, and a negative variance turns
    every evaluation into NaN. The noise has already been released, so clamping is post-processing:
    it changes no privacy guarantee."""
    for name, module in model.named_modules():
        key = f"{name}.running_var" if name else "running_var"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and key in state:
            state[key].clamp_(min=0.0)
    return state


def scheduled_batches(loader: Iterable, optimizer: torch.optim.Optimizer, config: ClientConfig, round_idx: int,
                      steps: int, total_rounds: int) -> Iterator[tuple[int, Any]]:
    """Yield ``(step, batch)`` for exactly ``steps`` optimizer steps, passing over ``loader`` as often
    as needed, with the poly learning rate ``lr · (1 − t/T)^power`` set on ``optimizer`` before each
    step (``t = round_idx · steps + step`` counts steps over the run, ``T = total_rounds · steps``)."""
    total_steps = max(total_rounds * steps, 1)
    step = 0
    while step < steps:
        passed = False
        for batch in loader:
            passed = True
            if step >= steps:
                return
            t = round_idx * steps + step
            for group in optimizer.param_groups:
                group["lr"] = config.lr * (1 - t / total_steps) ** config.poly_power
            yield step, batch
            step += 1
        if not passed:
            raise ValueError("scheduled_batches: the loader yielded no batch")


class Client:
    """One FL participant. Holds its data and recipe, never the global model between rounds."""

    def __init__(
        self,
        client_id: int,
        train_data: Dataset,
        config: ClientConfig,
        loss_fn: nn.Module | None = None,
        augment: Augment | None = None,
    ):
        # map-style datasets have __len__; torch's Dataset type does not declare it
        if len(cast(Sized, train_data)) == 0:
            raise ValueError(f"client {client_id} has no training samples")
        self.client_id = client_id
        self.train_data = train_data
        self.config = config
        self.loss_fn = loss_fn or CEDiceLoss()  # run_federated passes the model's default_loss
        self.augment = augment

    @property
    def num_samples(self) -> int:
        return len(cast(Sized, self.train_data))

    def fit(
        self, model: nn.Module, global_state: Update, round_idx: int, total_rounds: int, fabric: Fabric, seed: int
    ) -> tuple[Update, float]:
        """Train from ``global_state`` and return ``(delta = local − global, mean train loss)``.

        All randomness (shuffling, augmentation, dropout) is seeded from (seed, round, client).
        """
        cfg = self.config
        load_state(model, global_state)
        model.train()
        torch.manual_seed(derive_seed(seed, round_idx, self.client_id, "dropout+augment"))
        gen = torch_generator(seed, round_idx, self.client_id, "data")
        data = self.train_data if self.augment is None else _Augmented(self.train_data, self.augment)
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=False)
        steps = cfg.steps_per_round(self.num_samples)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        losses: list[float] = []
        for step, (images, masks) in scheduled_batches(loader, opt, cfg, round_idx, steps, total_rounds):
            images, masks = fabric.to_device((images, masks))
            if fabric.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with fabric.autocast():
                out = model(images)
            loss = self.loss_fn(out, masks)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {self.client_id}: non-finite loss at round {round_idx} step {step}")
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
        local = trainable_state(model)
        delta = {k: local[k] - global_state[k] for k in global_state}
        return delta, sum(losses) / len(losses)
