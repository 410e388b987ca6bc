"""What both sides share: the model, each client's data, local training and the defense."""

from __future__ import annotations

import torch

from privfl.data import SyntheticHistology, partition
from privfl.defenses import Compose, FedDPNoise, PartialSharing
from privfl.defenses.base import Defense
from privfl.fl import ClientConfig
from privfl.fl.client import Client
from privfl.fl.device import make_fabric
from privfl.models import build_model
from privfl.models.losses import default_loss
from privfl.updates import Update

DEFAULTS = {"num-server-rounds": 2, "samples-per-client": 8, "image-size": 32, "batch-size": 4, "lr": 0.1,
            "sigma": 0.5, "clip": 0.05, "partial": True, "min-clients": 2, "seed": 0}
"""The run configuration (``[tool.flwr.app.config]`` in pyproject.toml overrides it under ``flwr run``)."""


def run_config(context) -> dict:
    return {**DEFAULTS, **dict(context.run_config)}


def make_model(size: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("dhunet-tiny", img_size=size)


def client_data(client_id: int, num_clients: int, samples_per_client: int, size: int, seed: int):
    """Client ``client_id``'s partition: one stain profile (hospital) per client."""
    data = SyntheticHistology(num_clients * samples_per_client, size=size, seed=seed, sites=num_clients)
    return partition(data, "by_site", num_clients, seed=seed)[client_id]


def make_defense(sigma: float, clip: float, partial: bool) -> Defense:
    """FedDP's Eq. 11 (clip to C, add N(0, σ²)), optionally with the decoder kept local.
    The noise comes from privfl's ChaCha20 source (secure); the accountant proves the ε."""
    feddp = FedDPNoise(sigma, clip)
    return Compose(PartialSharing(share=["global_branch.*", "local_branch.*"]), feddp) if partial else feddp


def make_fit(client_id: int, data, rounds: int, size: int, seed: int, lr: float, batch_size: int):
    """privfl's local SGD (the same as ``run_federated``'s clients) as the Flower client's fit."""
    config = ClientConfig(local_epochs=1, batch_size=batch_size, lr=lr)

    def fit(start: Update, ctx) -> tuple[Update, float]:
        model = make_model(size, seed)
        # DHU-Net's deep-supervised loss and its augmentation, as run_federated uses them
        client = Client(client_id, data, config, default_loss(model), model.default_augment())
        return client.fit(model, start, ctx.round, rounds, make_fabric("cpu"), seed)

    return fit
