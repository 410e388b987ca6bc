"""Shared helpers for benchmark subcommands: output folders, machine description, JSON and CSV
output, table cells, and the end of a comparison subcommand (tables, CSV, figures, report)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from privfl.defenses.rng import SeededNoise


def default_out(job: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / job / stamp


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float))


def console_for(args: Any) -> Console:
    """Rich console for a subcommand: stderr when ``--json`` so stdout carries only the JSON object."""
    stderr = bool(getattr(args, "json", False))
    console = Console(stderr=stderr)
    # logs and pipes get wide tables instead of rich's 80-column default
    return console if console.is_terminal else Console(stderr=stderr, width=140)


def print_json(data: Any) -> None:
    """Print one JSON object on stdout (the ``--json`` output of every subcommand)."""
    print(json.dumps(data, default=float))


def finish(args: Any, console: Any, out: Path, record: dict[str, Any]) -> int:
    """Write a subcommand's ``record`` to ``out``, say where, and print it on stdout with ``--json``."""
    write_json(out, record)
    console.print(f"results in {out}")
    if getattr(args, "json", False):
        print_json(record)
    return 0


def args_record(args: Any) -> dict[str, str]:
    """Every command-line value as a string: the ``args`` of a results record."""
    return {k: str(v) for k, v in vars(args).items()}


def json_out(args: Any, job: str) -> Path:
    """``--out``, by default ``results/<job>/<timestamp>.json``."""
    return args.out or Path(f"{default_out(job)}.json")


def finish_measurement(args: Any, console: Any, out: Path, result: Any) -> int:
    """:func:`finish` with the record of a measurement: its :func:`args_record`, the :func:`machine` and
    ``result``."""
    return finish(args, console, out, {"args": args_record(args), "machine": machine(), "result": result})


def load_text(load: Sequence[float]) -> str:
    """The 1-minute load averages ``(before, after)`` a measurement, for its summary line."""
    return f"1-min load average before / after: {load[0]:.2f} / {load[1]:.2f}"


def add_run_arguments(p: Any, job: str, noise: str) -> None:
    """``--seeded-noise`` (reproducible ``noise``: what the noise is for), ``--threads``, ``--no-progress``
    and ``--out`` (default ``results/<job>/<timestamp>``)."""
    p.add_argument(
        "--seeded-noise",
        action="store_true",
        help=f"reproducible {noise} noise (NOT secure; for experiments) instead of the OS-keyed ChaCha20 "
        "source",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=None, help=f"output folder; default results/{job}/<timestamp>")


def noise_source(args: Any, seed: int) -> SeededNoise | None:
    """``SeededNoise(seed)`` with ``--seeded-noise``, else ``None`` (the secure default source)."""
    return SeededNoise(seed) if args.seeded_noise else None


def noise_label(args: Any) -> str:
    """The ``noise`` of a results record: which source ``--seeded-noise`` chose."""
    return "seeded (NOT secure)" if args.seeded_noise else "secure"


def start_embedding_run(args: Any) -> tuple[Console, bool, Any]:
    """``(console, ok, extractor)`` of a subcommand on embeddings: the console, ``--threads`` applied,
    and :func:`timm_extractor`'s ``(ok, extractor)``."""
    console = console_for(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ok, extractor = timm_extractor(args, console)
    return console, ok, extractor


def add_timm_arguments(p: Any, purpose: str) -> None:
    """``--timm-model`` / ``--checkpoint``: a timm feature extractor from local weights (``purpose``: what it
    is for)."""
    p.add_argument(
        "--timm-model", default=None, help=f"{purpose} from this timm model instead of privfl's encoder"
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="local weights of --timm-model (nothing is downloaded)"
    )


def timm_extractor(args: Any, console: Any) -> tuple[bool, Any]:
    """``(ok, extractor)`` from ``--timm-model`` / ``--checkpoint``: ``(True, None)`` without them,
    ``(False, None)`` after saying why when only one is given (weights come only from a local file)."""
    if (args.timm_model is None) != (args.checkpoint is None):
        console.print("[red]--timm-model and --checkpoint go together (weights come only from a local file)")
        return False, None
    if args.timm_model is None:
        return True, None
    # here, not at the top: timm takes seconds to import, and only dpcvae and dsl need it
    from privfl.sharing.embeddings import timm_encoder

    return True, timm_encoder(args.timm_model, args.checkpoint)


def fmt_cell(value: Any, spec: str = ".3f") -> str:
    """A table cell: ``"—"`` for a missing or NaN value, numbers with ``spec``, anything else as ``str``."""
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return (
        format(value, spec) if isinstance(value, (float, int)) and not isinstance(value, bool) else str(value)
    )


def eps_text(eps: float | None) -> str:
    """An ε for a table or a label: ``"none"`` without DP, else 3 significant digits."""
    return "none" if eps is None else f"{eps:.3g}"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """``rows`` restricted to ``columns``, one line each; ``None`` as an empty cell."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return path


def write_outputs(
    args: Any,
    console: Any,
    out: Path,
    record: dict[str, Any],
    *,
    show: Sequence[Any],
    tables: Mapping[str, tuple[Sequence[Mapping[str, Any]], Sequence[str]]],
    figures: Mapping[str, Callable[[Path], Any]],
    report: Callable[[Path], Any],
) -> int:
    """The end of a comparison subcommand: print ``show`` (tables, lines), write each CSV of
    ``tables`` (file name → ``(rows, columns)``), draw each figure of ``figures`` (file name →
    ``draw(path)``), write ``report.md`` with ``report(path)``, then :func:`finish` with ``record``
    in ``results.json``."""
    for item in show:
        console.print(item)
    for name, (rows, columns) in tables.items():
        write_csv(out / name, rows, columns)
    for name, draw in figures.items():
        draw(out / name)
    report(out / "report.md")
    return finish(args, console, out / "results.json", record)
