"""privfl's layers (docs/architecture.md): every module imports only from its own layer or below.

Imports inside functions count too: a lazy import that dodges a cycle is an edge like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import privfl

ROOT = Path(privfl.__file__).parent

# bottom to top; a module may import from its own rank and below
LAYERS: tuple[tuple[str, ...], ...] = (
    ("privfl.errors", "privfl.seeding", "privfl.updates", "privfl.parallel", "privfl.progress"),
    ("privfl.data", "privfl.metrics"),
    ("privfl.models",),
    ("privfl.defenses",),
    ("privfl.fl",),
    ("privfl.audit",),
    ("privfl.sharing",),
    ("privfl.attacks",),
    ("privfl.experiments",),
    ("privfl.bench", "privfl.integrations"),
)


def rank(module: str) -> int | None:
    """The layer of ``module`` (``None`` for the package root and anything outside privfl)."""
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every privfl import in ``path``, at any depth (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found += [(node.lineno, mod)]
            found += [
                (node.lineno, f"{mod}.{a.name}")
                for a in node.names
                if rank(f"{mod}.{a.name}") is not None and mod == "privfl"
            ]
    return [(line, m) for line, m in found if m == "privfl" or m.startswith("privfl.")]


def upward_edges() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        here = module_name(path)
        r = rank(here)
        if r is None:
            continue
        for line, target in imports(path):
            t = rank(target)
            if t is not None and t > r:
                bad.append(
                    f"{path.relative_to(ROOT.parent)}:{line}: {here} (layer {r}) imports {target} (layer {t})"
                )
    return bad


def test_every_module_belongs_to_a_layer():
    unplaced = [
        module_name(p)
        for p in ROOT.rglob("*.py")
        if rank(module_name(p)) is None
        and p.parent != ROOT
        or (p.parent == ROOT and p.name != "__init__.py" and rank(module_name(p)) is None)
    ]
    assert unplaced == [], (
        f"modules without a layer (add them to LAYERS and docs/architecture.md): {unplaced}"
    )


def test_no_module_imports_from_a_higher_layer():
    bad = upward_edges()
    assert bad == [], "imports from a higher layer:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_edge(tmp_path, monkeypatch):
    """The walk is not vacuous: a lower module importing a higher one is reported."""
    fake = ROOT / "defenses" / "__layer_probe__.py"
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: iter([fake]))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "def f():\n    from privfl.fl import loop\n")
    assert upward_edges() == [
        "privfl/defenses/__layer_probe__.py:2: privfl.defenses.__layer_probe__ (layer 3) "
        "imports privfl.fl (layer 4)"
    ]


@pytest.mark.parametrize(
    "module, expected",
    [
        ("privfl.seeding", 0),
        ("privfl.defenses.dp", 3),
        ("privfl.fl.loop", 4),
        ("privfl.bench.noise", 9),
        ("privfl", None),
        ("torch", None),
    ],
)
def test_ranks(module, expected):
    assert rank(module) == expected
