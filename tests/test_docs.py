"""The documentation's examples run.

Every ```python block of the pages below is executed, page by page, in order, in one namespace
per page (a page's later blocks may use what its earlier blocks defined). Shell commands are
written as ```bash blocks and are not run. The package docstring's example (``help(privfl)``)
runs too. The site itself is built with ``make docs`` (``mkdocs build --strict``).
"""

from __future__ import annotations

import os
import pydoc
import re
import textwrap
import warnings
from pathlib import Path

import pytest

import privfl

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [
    DOCS / "getting-started.md",
    DOCS / "concepts.md",
    DOCS / "privacy-claims.md",
    DOCS / "dsl.md",
    *sorted((DOCS / "tutorials").glob("*.md")),
]
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in _BLOCK.finditer(text)]


def _run(blocks: list[str], name: str) -> None:
    namespace: dict = {"__name__": f"docs_{name}"}
    cwd = os.getcwd()
    os.chdir(ROOT)  # the examples use paths relative to the repository root, as a reader would
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # examples may use seeded (not secure) noise on purpose
            for i, block in enumerate(blocks):
                code = compile(block, f"<{name} block {i + 1}>", "exec")
                exec(code, namespace)
    finally:
        os.chdir(cwd)


def test_the_pages_exist_and_have_examples():
    for page in PAGES:
        assert page.is_file(), page
    assert len(PAGES) >= 6
    for page in PAGES:
        if page.name != "attack-vs-dp-report.md":
            assert python_blocks(page.read_text(encoding="utf-8")), f"{page.name} has no python example"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_examples_run(page: Path):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("no python examples on this page")
    _run(blocks, page.stem)


def test_help_privfl_gives_an_overview():
    text = pydoc.render_doc(privfl, renderer=pydoc.plaintext)
    for name in (
        "privfl.updates",
        "privfl.defenses",
        "privfl.fl",
        "privfl.attacks",
        "privfl.audit",
        "privfl.data",
        "privfl.models",
        "privfl.metrics",
        "privfl.integrations.flower",
        "privfl.bench",
        "GaussianMechanism",
        "SecureAggregation",
        "CKKSAggregation",
        "run_federated",
        "make docs",
    ):
        assert name in text, name
    assert privfl.__version__ in text
    # the docstring's example (the indented block after "::") runs
    lines = privfl.__doc__.split("::\n", 1)[1].splitlines()
    end = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("    "))
    _run([textwrap.dedent("\n".join(lines[:end]))], "privfl_docstring")
