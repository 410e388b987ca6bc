"""The local training recipe every trainer shares, and the interface of a local trainer.

:class:`ClientConfig` (optimizer, schedule, steps), :func:`scheduled_batches` (the poly learning
rate over a run), :func:`trainable_state` / :func:`load_state` (what an update carries) and
:class:`LocalTrainer`, the object ``run_federated`` trains each client with: plain SGD
(:class:`privfl.fl.client.SGDTrainer`) or sample-level DP-SGD
(:class:`privfl.defenses.dpsgd.DPSGDTrainer`). They live in the models layer so that the DP-SGD
trainer (defenses) and the round loop (fl) share them without importing each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from privfl.data.augment import Augment
from privfl.updates import Update

if TYPE_CHECKING:  # Lightning loads only when a Fabric is made (privfl.fl.device): seconds per process
    from lightning.fabric import Fabric

__all__ = [
    "ClientConfig",
    "LocalTrainer",
    "clamp_running_variances",
    "load_state",
    "scheduled_batches",
    "trainable_state",
]


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
        if (
            self.batch_size < 1
            or self.local_epochs < 1
            or (self.local_steps is not None and self.local_steps < 1)
        ):
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
    return {
        k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if v.is_floating_point()
    }


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


def scheduled_batches(
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    config: ClientConfig,
    round_idx: int,
    steps: int,
    total_rounds: int,
) -> Iterator[tuple[int, Any]]:
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


class LocalTrainer(ABC):
    """How a client trains locally each round in ``run_federated``.

    ``name`` keys the trainer's state in checkpoints; ``prepare`` may convert the model once before
    training (DP-SGD makes it opacus-compatible); ``fit`` trains one client for one round from
    ``global_state`` and returns ``(delta = local − global, mean train loss)``; ``state_dict`` /
    ``load_state_dict`` carry what must survive a resume (DP-SGD: each client's accountant);
    ``privacy_record`` is the round record's ``sample_privacy`` (``None`` for plain SGD).

    The defaults are those of a stateless trainer that claims no privacy and trains any model
    (plain SGD); a subclass implements :meth:`fit` and overrides what differs.
    """

    name: str

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model to train, converted once before the first round if the trainer needs it
        (default: ``model`` unchanged)."""
        return model

    @abstractmethod
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
        """Train client ``client_id`` for round ``round_idx`` from ``global_state``:
        ``(delta = local − global, mean train loss)``. Randomness is seeded from (seed, round, client)."""

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume (JSON-able), checkpointed under :attr:`name` (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (default: nothing to restore)."""
        return None

    def privacy_record(self) -> dict[str, Any] | None:
        """The round record's ``sample_privacy`` so far; ``None`` (the default) when training claims
        no privacy."""
        return None
