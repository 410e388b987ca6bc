"""Federated averaging: server, client and the round loop.

The names below are imported on first use, so that ``privfl.fl.seeding`` (which every noise
source needs) does not pull in Lightning and torchmetrics — seconds at every process start of a
Flower ClientApp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privfl.fl.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
    from privfl.fl.client import Client, ClientConfig, load_state, trainable_state
    from privfl.fl.device import default_precision, make_fabric
    from privfl.fl.evaluate import evaluate
    from privfl.fl.loop import FederatedResult, run_federated
    from privfl.fl.server import Server

_WHERE = {
    "CheckpointMismatchError": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "Client": "client", "ClientConfig": "client", "load_state": "client", "trainable_state": "client",
    "default_precision": "device", "make_fabric": "device", "evaluate": "evaluate",
    "FederatedResult": "loop", "run_federated": "loop", "Server": "server",
}

__all__ = [
    "CheckpointMismatchError", "Client", "ClientConfig", "FederatedResult", "Server", "default_precision",
    "evaluate", "load_checkpoint", "load_state", "make_fabric", "run_federated", "save_checkpoint",
    "trainable_state",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'privfl.fl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"privfl.fl.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
