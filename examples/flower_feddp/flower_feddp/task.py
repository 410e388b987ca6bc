"""What both sides share: the model, each client's data, local training and the defense."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from privfl.data import SyntheticHistology, partition
from privfl.defenses import CKKSAggregation, Compose, FedDPNoise, PartialSharing
from privfl.defenses.base import Defense
from privfl.defenses.ckks import CKKSKeys, CKKSServer
from privfl.defenses.secagg import SecureAggregation
from privfl.updates import Update

DEFAULTS = {
    "num-server-rounds": 2,
    "samples-per-client": 8,
    "image-size": 32,
    "batch-size": 4,
    "lr": 0.1,
    "sigma": 0.5,
    "clip": 0.05,
    "partial": True,
    "crypto": "none",
    "keys-dir": "",
    "min-clients": 2,
    "seed": 0,
}
"""The run configuration (``[tool.flwr.app.config]`` in pyproject.toml overrides it under ``flwr run``)."""


def run_config(context) -> dict:
    """DEFAULTS, then ``PRIVFL_EXAMPLE_CONFIG`` (JSON; how simulate.py passes options to the
    simulation's workers), then Flower's run config."""
    extra = json.loads(os.environ.get("PRIVFL_EXAMPLE_CONFIG", "{}"))
    return {**DEFAULTS, **extra, **dict(context.run_config)}


def make_model(size: int, seed: int) -> torch.nn.Module:
    from privfl.models import build_model  # imported on use: timm takes seconds (see make_fit)

    torch.manual_seed(seed)
    return build_model("dhunet-tiny", img_size=size)


def client_data(client_id: int, num_clients: int, samples_per_client: int, size: int, seed: int):
    """Client ``client_id``'s partition: one stain profile (hospital) per client."""
    data = SyntheticHistology(num_clients * samples_per_client, size=size, seed=seed, sites=num_clients)
    return partition(data, "by_site", num_clients, seed=seed)[client_id]


CRYPTO = ("none", "ckks", "secagg")


def make_defense(
    sigma: float, clip: float, partial: bool, keys: CKKSKeys | None = None, secagg: bool = False
) -> Defense:
    """FedDP's Eq. 11 (clip to C, add N(0, σ²C²): σ is the noise multiplier), optionally with the
    decoder kept local and either
    (client side, with ``keys``) CKKS encryption of what is sent or (both sides, ``secagg``)
    Bonawitz secure aggregation among 2-of-n clients. The noise comes from privfl's ChaCha20 source
    (secure); the accountant proves the ε."""
    stages: list[Defense] = [PartialSharing(share=["global_branch.*", "local_branch.*"])] if partial else []
    stages.append(FedDPNoise(sigma, clip))
    # noised values exceed C: the crypto stage's range covers the noise too (6 stds of σ·C)
    bound = clip * (1 + 6 * sigma)
    if keys is not None:
        stages.append(CKKSAggregation(keys.preset, keys=keys, bound=bound))
    if secagg:
        stages.append(SecureAggregation(2, clip_range=bound))
    return Compose(*stages)


def make_keys(keys_dir: str) -> CKKSKeys:
    """Generate CKKS keys into ``keys_dir``: ``client.ctx`` holds the secret key and goes to the
    clients only; ``server.ctx`` is public. A setup step run by the clients' side, never the server."""
    d = Path(keys_dir)
    d.mkdir(parents=True, exist_ok=True)
    keys = CKKSKeys.generate("precise")
    (d / "client.ctx").write_bytes(keys.client_context)
    (d / "server.ctx").write_bytes(keys.server_context)
    return keys


def ckks_keys(keys_dir: str) -> CKKSKeys:
    """A client's CKKS keys from ``keys_dir`` (see :func:`make_keys`)."""
    d = Path(keys_dir)
    return CKKSKeys.from_contexts((d / "client.ctx").read_bytes(), (d / "server.ctx").read_bytes())


def server_ckks(keys_dir: str) -> CKKSServer:
    """The server's half: the public context only."""
    return CKKSServer((Path(keys_dir) / "server.ctx").read_bytes())


def make_fit(client_id: int, data, rounds: int, size: int, seed: int, lr: float, batch_size: int):
    """privfl's local SGD (the same as ``run_federated``'s clients) as the Flower client's fit."""
    # imported here: a ClientApp process that only answers a query (secure-aggregation steps) does
    # not need Lightning or timm, which take seconds to import
    from privfl.fl import ClientConfig
    from privfl.fl.client import Client
    from privfl.fl.device import make_fabric
    from privfl.models.losses import default_loss

    config = ClientConfig(local_epochs=1, batch_size=batch_size, lr=lr)

    def fit(start: Update, ctx) -> tuple[Update, float]:
        model = make_model(size, seed)
        # DHU-Net's deep-supervised loss and its augmentation, as run_federated uses them
        client = Client(client_id, data, config, default_loss(model), model.default_augment())
        return client.fit(model, start, ctx.round, rounds, make_fabric("cpu"), seed)

    return fit
