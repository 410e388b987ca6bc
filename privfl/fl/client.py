"""FedAvg client: local SGD on its own data, returning a weight delta.

The recipe (:class:`ClientConfig`, :func:`scheduled_batches`, :func:`trainable_state`,
:func:`load_state`) lives in :mod:`privfl.models.training` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privfl.data.augment import Augment, AugmentedDataset
from privfl.models.losses import CEDiceLoss
from privfl.models.training import (
    ClientConfig,
    LocalTrainer,
    clamp_running_variances,
    load_state,
    scheduled_batches,
    trainable_state,
)
from privfl.seeding import derive_seed, torch_generator
from privfl.updates import Update

if TYPE_CHECKING:  # Lightning loads only when a Fabric is made (privfl.fl.device): seconds per process
    from lightning.fabric import Fabric

__all__ = [
    "Augment",
    "Client",
    "ClientConfig",
    "SGDTrainer",
    "clamp_running_variances",
    "load_state",
    "scheduled_batches",
    "trainable_state",
]


class SGDTrainer(LocalTrainer):
    """Plain local SGD (a :class:`~privfl.models.training.LocalTrainer`): momentum SGD with the poly
    schedule of :class:`ClientConfig`, on the Fabric's device and precision. Trains any model as it
    is, keeps no state between rounds and claims no privacy (the base class's defaults); all
    randomness (shuffling, augmentation, dropout) is seeded from (seed, round, client)."""

    name = "sgd"

    def fit(
        self,
        model: nn.Module,
        train_data: Dataset,
        global_state: Update,
        config: ClientConfig,
        *,
        loss_fn: nn.Module,
        augment: Augment | None,
        round_idx: int,
        total_rounds: int,
        seed: int,
        client_id: int,
        fabric: Fabric,
    ) -> tuple[Update, float]:
        """Train from ``global_state`` and return ``(delta = local − global, mean train loss)``."""
        cfg = config
        load_state(model, global_state)
        model.train()
        torch.manual_seed(derive_seed(seed, round_idx, client_id, "dropout+augment"))
        gen = torch_generator(seed, round_idx, client_id, "data")
        data = train_data if augment is None else AugmentedDataset(train_data, augment)
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=False)
        steps = cfg.steps_per_round(len(cast(Sized, train_data)))
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        losses: list[float] = []
        for step, (images, masks) in scheduled_batches(loader, opt, cfg, round_idx, steps, total_rounds):
            images, masks = fabric.to_device((images, masks))
            if fabric.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with fabric.autocast():
                out = model(images)
            loss = loss_fn(out, masks)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"client {client_id}: non-finite loss at round {round_idx} step {step}"
                )
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
        local = trainable_state(model)
        delta = {k: local[k] - global_state[k] for k in global_state}
        return delta, sum(losses) / len(losses)


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
        self,
        model: nn.Module,
        global_state: Update,
        round_idx: int,
        total_rounds: int,
        fabric: Fabric,
        seed: int,
        trainer: LocalTrainer | None = None,
    ) -> tuple[Update, float]:
        """One round of local training from ``global_state`` on this client's data and recipe, by
        ``trainer`` (default: plain local SGD, :class:`SGDTrainer`): ``(delta, mean train loss)``."""
        return (trainer or SGDTrainer()).fit(
            model,
            self.train_data,
            global_state,
            self.config,
            loss_fn=self.loss_fn,
            augment=self.augment,
            round_idx=round_idx,
            total_rounds=total_rounds,
            seed=seed,
            client_id=self.client_id,
            fabric=fabric,
        )
