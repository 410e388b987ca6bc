"""The public surface is documented: every public module, class, function and method has a
docstring, and every defense states its threat model (docs/concepts.md)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import privfl
from privfl.defenses.base import Defense


def _modules():
    for info in pkgutil.walk_packages(privfl.__path__, "privfl."):
        if info.name.startswith("privfl.bench"):  # command-line tools, documented by --help
            continue
        if info.name.startswith("privfl.integrations.flower"):
            pytest.importorskip("flwr")
        yield importlib.import_module(info.name)


def _documented(obj) -> bool:
    return bool((inspect.getdoc(obj) or "").strip())  # getdoc: an inherited docstring counts


def test_every_public_object_has_a_docstring():
    missing = []
    for mod in _modules():
        if not (mod.__doc__ or "").strip():
            missing.append(mod.__name__)
        names = getattr(mod, "__all__", [n for n in vars(mod) if not n.startswith("_")])
        for name in names:
            obj = getattr(mod, name, None)
            if getattr(obj, "__module__", None) != mod.__name__ or not (
                inspect.isclass(obj) or inspect.isfunction(obj)
            ):
                continue
            if not _documented(obj):
                missing.append(f"{mod.__name__}.{name}")
            if inspect.isclass(obj):
                missing += [
                    f"{mod.__name__}.{name}.{a}"
                    for a, f in vars(obj).items()
                    if not a.startswith("_") and inspect.isfunction(f) and not _documented(getattr(obj, a))
                ]
    assert not missing, f"{len(missing)} public objects without a docstring: {missing}"


def test_every_defense_states_its_threat_model():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    list(_modules())  # import them all, so every Defense subclass is registered
    silent = sorted(
        {
            f"{c.__module__}.{c.__name__}"
            for c in subclasses(Defense)
            if c.__module__.startswith("privfl.")
            and not c.__name__.startswith("_")
            and "threat model" not in (c.__doc__ or "").lower()
        }
    )
    assert not silent, f"defenses whose docstring has no threat model: {silent}"
