"""MkDocs hook: publish ``benchmarks/`` (outside ``docs/``) as the site's ``benchmarks/`` section.

``benchmarks/RESULTS.md`` is the single source of the benchmark figures. It becomes the page
``benchmarks/index.md``; every other file under ``benchmarks/`` (the attack-vs-dp report, plots,
JSON and CSV records) keeps its path below ``benchmarks/``, so the relative links in
``RESULTS.md`` resolve on the site exactly as they do on GitHub.

Links written for the repository layout (``docs/privacy.md`` linking to
``../benchmarks/RESULTS.md``, ``RESULTS.md`` linking to ``../docs/...``) are rewritten to the
site's layout before MkDocs validates them. Links to anything that is not part of the site are
left alone, so ``mkdocs build --strict`` still reports them.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
# file types published from benchmarks/ (what RESULTS.md and the reports link to or embed)
PUBLISHED = {".md", ".png", ".svg", ".json", ".csv"}
_LINK = re.compile(r"(!?\[[^\]\n]*\])\(([^)\s]+)((?:\s+\"[^\"]*\")?)\)")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})")


def _site_uri(path: Path) -> str:
    rel = path.relative_to(BENCHMARKS).as_posix()
    return "benchmarks/index.md" if rel == "RESULTS.md" else f"benchmarks/{rel}"


def on_files(files: Files, config) -> Files:
    for path in sorted(BENCHMARKS.rglob("*")):
        if path.is_file() and path.suffix.lower() in PUBLISHED:
            uri = _site_uri(path)
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def _rewrite(line: str, page_dir: str, page_src_dir: str, by_path: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        text, url, title = m.groups()
        if "://" in url or url.startswith(("#", "/", "mailto:")):
            return m.group(0)
        path, sep, fragment = url.partition("#")
        target = os.path.normpath(os.path.join(page_dir, path))
        uri = by_path.get(target)
        if uri is None:
            return m.group(0)
        new = posixpath.relpath(uri, page_src_dir or ".")
        return f"{text}({new}{sep}{fragment}{title})"

    # leave inline code spans alone
    parts = re.split(r"(`+[^`]*`+)", line)
    return "".join(p if p.startswith("`") else _LINK.sub(repl, p) for p in parts)


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    by_path = {os.path.normpath(f.abs_src_path): f.src_uri for f in files if f.abs_src_path}
    page_dir = os.path.dirname(os.path.normpath(page.file.abs_src_path))
    page_src_dir = posixpath.dirname(page.file.src_uri)
    out, fence = [], None
    for line in markdown.split("\n"):
        m = _FENCE.match(line)
        if m:
            marker = m.group(2)
            if fence is None:
                fence = marker
            elif marker.startswith(fence):
                fence = None
            out.append(line)
            continue
        out.append(line if fence else _rewrite(line, page_dir, page_src_dir, by_path))
    return "\n".join(out)


def on_serve(server, config, builder):
    server.watch(str(BENCHMARKS))
    return server
