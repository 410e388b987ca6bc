"""Block-parallel loops on a few threads, for work that releases the GIL (ChaCha20 keystreams from
``cryptography``, numpy ufuncs): the secure noise source and secure-aggregation masks use it."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


def default_threads(threads: int | None) -> int:
    """``threads``, or torch's thread count when ``None`` (at least 1)."""
    return max(1, int(threads) if threads is not None else torch.get_num_threads())


def run_blocks(
    n_blocks: int,
    work: Callable[[int, Any], None],
    make_scratch: Callable[[], Any],
    threads: int | None = None,
) -> None:
    """Call ``work(i, scratch)`` for every block ``i < n_blocks`` on up to ``threads`` threads (the
    caller's thread is one of them); each thread gets its own ``make_scratch()`` and takes the next
    block when it finishes one. The first exception stops the other threads and is re-raised."""
    if n_blocks <= 0:
        return
    todo = itertools.count()  # next() is atomic under the GIL: a lock-free work queue
    failed: list[BaseException] = []

    def worker() -> None:
        scratch = make_scratch()
        try:
            while not failed and (i := next(todo)) < n_blocks:
                work(i, scratch)
        except BaseException as err:  # re-raised by the caller below
            failed.append(err)

    workers = min(default_threads(threads), n_blocks)
    if workers <= 1:
        worker()
    else:
        with ThreadPoolExecutor(workers - 1, thread_name_prefix="privfl") as pool:
            helpers = [pool.submit(worker) for _ in range(workers - 1)]
            worker()
            for h in helpers:
                h.result()
    if failed:
        raise failed[0]
