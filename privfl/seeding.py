"""Deterministic seeds derived from (experiment seed, round, client, purpose).

Every source of randomness in a round is seeded from these, never from global state carried
between rounds, so a run resumed from a checkpoint replays exactly. A leaf module: every layer of
privfl may import it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (strings are hashed with CRC32, stable across runs).

    The number of parts is mixed in first: ``SeedSequence`` ignores trailing zero words, which
    would otherwise make ``(5,)`` and ``(5, 0)`` the same seed."""
    words = [len(parts)] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    hi, lo = (int(x) for x in np.random.SeedSequence(words).generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)  # Python ints: numpy would promote uint64 @ int to float64


def torch_generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@contextmanager
def torch_seeded(
    seed: int, *, cuda: bool = False, device: torch.device | str | None = None
) -> Iterator[None]:
    """Run a block with torch's global RNG seeded with ``seed`` (dropout, random init, batch draws),
    restoring the caller's RNG state afterwards, so that the block neither depends on nor disturbs
    what ran before it. ``cuda=True`` also forks (and seeds) the current CUDA device's generator;
    ``device`` a CUDA device forks that device's generator instead (it need not be the current one)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    else:
        devices = [torch.cuda.current_device()] if cuda and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def seeded(*parts: int | str, cuda: bool = False) -> AbstractContextManager[None]:
    """:func:`torch_seeded` with the seed ``derive_seed(*parts)``."""
    return torch_seeded(derive_seed(*parts), cuda=cuda)
