"""Federated averaging: server, client and the round loop."""

from __future__ import annotations

from privfl.fl.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from privfl.fl.client import Client, ClientConfig, load_state, trainable_state
from privfl.fl.device import default_precision, make_fabric
from privfl.fl.evaluate import evaluate
from privfl.fl.loop import FederatedResult, run_federated
from privfl.fl.server import Server

__all__ = [
    "CheckpointMismatchError",
    "Client",
    "ClientConfig",
    "FederatedResult",
    "Server",
    "default_precision",
    "evaluate",
    "load_checkpoint",
    "load_state",
    "make_fabric",
    "run_federated",
    "save_checkpoint",
    "trainable_state",
]
