"""Griffe extension: render the Sphinx roles in privfl's docstrings as API cross-references.

privfl's docstrings are Google style with Sphinx cross-reference roles (``:class:`Compose```,
``:func:`~privfl.updates.flatten```). Markdown has no roles, so this extension rewrites each one,
before mkdocstrings renders it, into an *optional* autoref: a link to the object's entry in the
API reference when that entry exists, plain code text otherwise (optional references never warn).
``~`` shows only the last component of the path, as in Sphinx; ``title <target>`` is honoured.
"""

from __future__ import annotations

import html
import re
from typing import Any

from griffe import Alias, Extension, Module, Object

_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|exc|obj|const):`([^`]+)`")


def _target(obj: Object, name: str) -> str:
    """Best-effort full path of ``name`` as seen from ``obj``'s scope."""
    name = name.lstrip(".")
    if name.startswith("privfl."):
        path = name
    else:
        head, _, rest = name.partition(".")
        try:
            path = obj.resolve(head) if not isinstance(obj, Alias) else name
        except Exception:  # unknown in this scope: keep the name as written
            return name
        path = f"{path}.{rest}" if rest else path
    try:  # follow re-exports (privfl.defenses.ClipUpdate -> privfl.defenses.dp.ClipUpdate)
        member = obj.modules_collection[path]
        return member.final_target.path if isinstance(member, Alias) else member.path
    except Exception:
        return path


def _replace(obj: Object, text: str) -> str:
    def repl(m: re.Match) -> str:
        role, content = m.groups()
        title_target = re.fullmatch(r"(.*?)\s*<([^>]+)>", content)
        if title_target:
            title, name = title_target.groups()
        else:
            name = content
            shown = name.lstrip("~").lstrip(".")
            title = shown.rsplit(".", 1)[-1] if name.startswith("~") else shown
            if role in ("func", "meth") and not title.endswith(")"):
                title += "()"
        ident = _target(obj, name.lstrip("~"))
        return (
            f'<autoref identifier="{html.escape(ident)}" optional><code>{html.escape(title)}</code></autoref>'
        )

    return _ROLE.sub(repl, text)


class SphinxRoles(Extension):
    """Rewrite Sphinx roles in every docstring of the loaded package."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: Object, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _replace(obj, obj.docstring.value)
        for member in obj.members.values():
            if not isinstance(member, Alias):
                self._walk(member, seen)
