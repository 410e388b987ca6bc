"""Shared fixtures. Plain helper functions live in ``tests/helpers.py``."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from privfl.bench.__main__ import main as bench_main


@pytest.fixture
def bench_json(capsys) -> Callable[..., dict]:
    """Run ``python -m privfl.bench <argv> --json`` in-process and return its one JSON object."""

    def run(*argv: str) -> dict:
        assert bench_main([*argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    return run
