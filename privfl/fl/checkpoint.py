"""Round checkpoints written atomically, so a crash never leaves a half-written round behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from privfl.errors import PrivflError

CHECKPOINT_NAME = "last.pt"
HISTORY_NAME = "history.json"


class CheckpointMismatchError(PrivflError, ValueError):
    """A checkpoint was written by a run with a different configuration."""


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/last.pt`` (and its history as JSON) via a temporary file + rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    if "history" in state:
        hist_tmp = directory / (HISTORY_NAME + ".tmp")
        hist_tmp.write_text(json.dumps(state["history"], indent=1))
        os.replace(hist_tmp, directory / HISTORY_NAME)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The last complete round's state, or ``None`` when there is none yet."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: never code
