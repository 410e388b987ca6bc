"""Shared pieces of the training sweeps (``attack-vs-dp``, ``fedavg-vs-feddp``, ``noise-ablation``):
the federation's data, its model, and one federated training run summarised as a JSON-able record.

Data: ``synthetic`` is :class:`~privfl.data.synthetic.SyntheticHistology` with one stain profile per
client (non-IID stain shift, ``by_site`` partition) and a pooled test split drawn from the same
sites; a PATH is a :class:`~privfl.data.folder.SegmentationFolder` root (DHUnet layout, list
``--list``, splits ``train`` / ``test``) split across clients by ``dirichlet`` (α = 0.5) class
proportions. Both are checked before any training starts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sized
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from privfl.data import SyntheticHistology, partition
from privfl.data.errors import DataError
from privfl.data.folder import SegmentationFolder
from privfl.defenses.base import Defense
from privfl.fl import ClientConfig, run_federated
from privfl.models import build_model

NUM_CLASSES = SyntheticHistology.num_classes


RECIPE_FIELDS = ("local_epochs", "batch_size", "lr", "momentum")
"""The fields of a preset's :class:`~privfl.fl.client.ClientConfig` that its record lists and the
command line overrides (``--local-epochs``, ``--batch-size``, ``--lr``)."""


@dataclass(frozen=True, kw_only=True)
class TrainingPreset:
    """The federation and the local training recipe every sweep preset has; sweeps subclass it with
    their own fields.

    Attributes:
        clients, samples_per_client, size, rounds: the federation and its length.
        config: the clients' local training recipe (SGD with momentum; ``ClientConfig``'s weight
            decay 1e-4 and poly lr decay 0.9).
        device: the Lightning Fabric accelerator.
    """

    clients: int
    samples_per_client: int
    size: int
    rounds: int
    config: ClientConfig
    device: str = "auto"

    #: fields (or recipe fields) that must be integers >= 1 (subclasses extend it)
    positive_ints: ClassVar[tuple[str, ...]] = (
        "clients",
        "samples_per_client",
        "size",
        "rounds",
        "local_epochs",
        "batch_size",
    )

    def record(self) -> dict[str, Any]:
        """Every field, flat and JSON-able: ``config`` gives its :data:`RECIPE_FIELDS` in its place."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "config":
                out.update({k: getattr(self.config, k) for k in RECIPE_FIELDS})
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def with_overrides(self, overrides: dict[str, Any]):
        r"""A copy with the non-``None`` ``overrides`` that name a field of :meth:`record` applied
        (recipe fields to ``config``), checked first by :meth:`check_values`."""
        values = self.record()
        values.update({k: v for k, v in overrides.items() if k in values and v is not None})
        self.check_values(values)
        recipe = {k: values.pop(k) for k in RECIPE_FIELDS}
        return replace(self, **values, config=replace(self.config, **recipe))

    def load_federation(
        self, data: str, *, seed: int, list_name: str, test_samples: int | None = None
    ) -> Federation:
        """The federation of ``data`` at this preset's sizes (:func:`load_federation`)."""
        return load_federation(
            data,
            num_clients=self.clients,
            samples_per_client=self.samples_per_client,
            image_size=self.size,
            seed=seed,
            list_name=list_name,
            test_samples=test_samples,
        )

    @classmethod
    def check_values(cls, values: Mapping[str, Any]) -> None:
        """``ValueError`` naming the flag of a value of a :meth:`record` that is out of range."""
        for key in cls.positive_ints:
            if values[key] < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {values[key]}")
        lr, momentum = values["lr"], values["momentum"]
        if not (math.isfinite(lr) and lr > 0 and 0 <= momentum < 1):
            raise ValueError(f"need --lr > 0 and momentum in [0, 1); got {lr}, {momentum}")


@dataclass(frozen=True)
class Federation:
    """The clients' training sets, the pooled test split and where they came from."""

    clients: list[Dataset]
    test: Dataset
    source: str
    image_size: int

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def describe(self) -> str:
        """One line: the source, the clients and their sizes, the test size, the image size."""
        # map-style datasets have __len__; torch's Dataset type does not declare it
        sizes = ", ".join(str(len(cast(Sized, c))) for c in self.clients)
        return (
            f"{self.source}: {self.num_clients} clients ({sizes} samples), "
            f"test {len(cast(Sized, self.test))}, {self.image_size}px"
        )


def load_federation(
    data: str,
    *,
    num_clients: int,
    samples_per_client: int,
    image_size: int,
    seed: int = 0,
    test_samples: int | None = None,
    list_name: str = "default",
) -> Federation:
    """The federation of ``data`` = ``"synthetic"`` or a SegmentationFolder root (see the module docstring).

    Raises:
        ValueError: ``num_clients`` < 1, ``samples_per_client`` < 1, an image size the data cannot give.
        DataError: ``data`` is neither ``synthetic`` nor an existing dataset root with its list files.
    """
    if num_clients < 1 or samples_per_client < 1:
        raise ValueError(
            f"need >= 1 client and >= 1 sample per client, got {num_clients}, {samples_per_client}"
        )
    if data == "synthetic":
        n = num_clients * samples_per_client
        synth_train = SyntheticHistology(n, size=image_size, seed=seed, sites=num_clients)
        synth_test = SyntheticHistology(
            test_samples or max(16, n // 4), size=image_size, seed=seed + 10_000, sites=num_clients
        )
        clients = partition(synth_train, "by_site", num_clients, seed=seed)
        return Federation(
            list(clients), synth_test, f"SyntheticHistology (stain shift per client, seed {seed})", image_size
        )
    root = Path(data)
    if not root.is_dir():
        raise DataError(
            f"--data must be 'synthetic' or a SegmentationFolder root; {data!r} is not a directory"
        )
    train = SegmentationFolder(root, list_name, "train", num_classes=NUM_CLASSES, size=image_size)
    test = SegmentationFolder(root, list_name, "test", num_classes=NUM_CLASSES, size=image_size)
    if len(train) < num_clients:
        raise DataError(f"{root} lists {len(train)} training samples, fewer than {num_clients} clients")
    clients = partition(train, "dirichlet", num_clients, seed=seed)
    return Federation(list(clients), test, f"SegmentationFolder {root} ({list_name})", image_size)


def make_model(name: str, image_size: int, seed: int) -> nn.Module:
    """``build_model(name)`` under ``torch.manual_seed(seed)`` (DHU-Net built for ``image_size``)."""
    kwargs: dict[str, Any] = {"num_classes": NUM_CLASSES}
    if name.startswith("dhunet"):
        kwargs["img_size"] = image_size
    torch.manual_seed(seed)
    return build_model(name, **kwargs)


@dataclass
class TrainingRun:
    """One federated training run: the trained model and its JSON-able summary."""

    model: nn.Module
    history: list[dict[str, Any]]
    seconds: float

    @property
    def final_test(self) -> dict[str, float]:
        """The test metrics of the last round."""
        return self.history[-1]["test"]

    @property
    def epsilon(self) -> float | None:
        """The ε the defense's accountant proved over the run (``None``: no DP)."""
        privacy = self.history[-1].get("privacy")
        return None if privacy is None else float(privacy["epsilon"])

    def summary(self) -> dict[str, Any]:
        """The run as a JSON-able record: final test metrics, train loss, ε (δ, accountant), rounds,
        seconds and the Dice of every round."""
        test = self.final_test
        privacy = self.history[-1].get("privacy")
        return {
            "dice": test["dice"],
            "jaccard": test["jaccard"],
            "accuracy": test["accuracy"],
            "train_loss": self.history[-1]["train_loss"],
            "epsilon": None if privacy is None else privacy["epsilon"],
            "delta": None if privacy is None else privacy["delta"],
            "accountant": None if privacy is None else privacy["accountant"],
            "rounds": len(self.history),
            "train_seconds": self.seconds,
            "dice_per_round": [rec["test"]["dice"] for rec in self.history],
        }


def train(
    federation: Federation,
    model: nn.Module,
    defense: Defense | None,
    *,
    rounds: int,
    config: ClientConfig,
    seed: int,
    device: str = "auto",
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> TrainingRun:
    """FedAvg over ``federation`` with ``defense`` for ``rounds`` rounds (metrics on the test split).

    Clients train on all their samples (no per-client validation split), so a membership attack
    knows exactly which samples were trained on."""
    t0 = time.perf_counter()
    result = run_federated(
        model,
        federation.clients,
        federation.test,
        rounds,
        num_classes=NUM_CLASSES,
        config=config,
        defense=defense,
        seed=seed,
        accelerator=device,
        progress=progress,
        val_fraction=0.0,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    return TrainingRun(result.model, result.history, time.perf_counter() - t0)


def finite_or_none(x: float | None) -> float | None:
    """JSON has no inf/NaN: map them to ``None``."""
    return None if x is None or not math.isfinite(x) else float(x)
