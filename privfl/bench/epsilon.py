"""Privacy calculator: epsilon per accountant, noise calibration to a target epsilon, single-release noise
scale.

Three modes (sampling rates are Poisson sampling probabilities):

* ``--noise-multiplier Z --sample-rate Q --steps T [--delta D]``: ε after T releases, per accountant
  (RDP, PRV, PLD), the tightest marked. Client-level DP-FedAvg: Z = noise std / C, Q = sampled/total clients,
  T = rounds. Sample-level DP-SGD: Z, Q = batch/n, T = steps.
* ``--target-epsilon E --sample-rate Q --steps T [--delta D] [--accountant rdp]``: the smallest noise
  multiplier that reaches ε <= E, and its ε per accountant. By default it calibrates to the tightest
  of the reported accountants, so the reported ε is <= E and within 1% of it.
* ``--mechanism gaussian|laplace --epsilon E [--delta D] [--sensitivity S]
  [--calibration analytic|classical]``: the noise scale of one release (Gaussian σ, Laplace b), in the units
  of the sensitivity.

``--json`` prints one JSON object with the same figures on stdout (tables go to stderr).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from rich.console import JustifyMethod
from rich.table import Table

from privfl.bench.common import console_for, print_json
from privfl.defenses.accounting import ACCOUNTANTS, PrivacyAccountant, calibrate
from privfl.defenses.calibration import (
    analytic_gaussian_sigma,
    balle_wang_delta,
    classical_gaussian_sigma,
    laplace_scale,
)

DEFAULT_DELTA = 1e-5


def _accountant_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in ACCOUNTANTS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(ACCOUNTANTS)}, got {text!r}"
        )
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    acc = p.add_argument_group("accounting over many releases")
    acc.add_argument(
        "--noise-multiplier",
        "-z",
        type=float,
        default=None,
        help="noise std / L2 sensitivity (clip norm) of each release",
    )
    acc.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="calibrate: find the smallest noise multiplier reaching this epsilon",
    )
    acc.add_argument(
        "--sample-rate",
        "-q",
        type=float,
        default=None,
        help="Poisson sampling probability per release (default 1: no sampling)",
    )
    acc.add_argument("--steps", "-T", type=int, default=None, help="number of releases (rounds or SGD steps)")
    acc.add_argument(
        "--accountants",
        type=_accountant_list,
        default=None,
        help=f"comma-separated accountants to report (default {','.join(ACCOUNTANTS)})",
    )
    acc.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default=None,
        help="accountant that --target-epsilon calibrates with (default: the tightest of "
        "--accountants, the one reported)",
    )
    one = p.add_argument_group("one release")
    one.add_argument("--mechanism", choices=("gaussian", "laplace"), default=None)
    one.add_argument("--epsilon", type=float, default=None, help="epsilon of the single release")
    one.add_argument(
        "--sensitivity",
        type=float,
        default=None,
        help="L2 (Gaussian) or L1 (Laplace) sensitivity (default 1)",
    )
    one.add_argument(
        "--calibration",
        choices=("analytic", "classical"),
        default=None,
        help="Gaussian calibration (default analytic; classical only for epsilon < 1)",
    )
    p.add_argument("--delta", type=float, default=None, help=f"target delta (default {DEFAULT_DELTA:g})")
    p.set_defaults(_parser=p)


def _given(args: argparse.Namespace, *names: str) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) is not None]


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The mode ("accounting", "calibrate" or "mechanism"); argparse error on a bad combination."""
    if args.mechanism is not None:
        extra = _given(
            args, "noise_multiplier", "target_epsilon", "sample_rate", "steps", "accountants", "accountant"
        )
        if extra:
            parser.error(
                f"--mechanism computes one release's noise scale; {', '.join(extra)} belong to "
                "accounting over many releases"
            )
        if args.epsilon is None:
            parser.error("--mechanism needs --epsilon")
        if args.mechanism == "laplace":
            extra = _given(args, "delta", "calibration")
            if extra:
                parser.error(f"the Laplace mechanism is pure epsilon-DP; it takes no {', '.join(extra)}")
        return "mechanism"
    extra = _given(args, "epsilon", "sensitivity", "calibration")
    if extra:
        parser.error(f"{', '.join(extra)} need --mechanism gaussian|laplace")
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        parser.error(
            "give exactly one of --noise-multiplier (epsilon from noise) and --target-epsilon "
            "(noise from epsilon), or --mechanism for one release"
        )
    if args.steps is None:
        parser.error("accounting needs --steps (number of releases)")
    if args.noise_multiplier is not None and args.accountant is not None:
        parser.error("--accountant chooses the calibration accountant; it needs --target-epsilon")
    return "calibrate" if args.target_epsilon is not None else "accounting"


def _finite(x: Any) -> Any:
    """JSON-safe figures: non-finite floats as strings ("inf")."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _accounting_record(
    z: float, q: float, steps: int, delta: float, names: tuple[str, ...]
) -> dict[str, Any]:
    acct = PrivacyAccountant(delta=delta, accountants=names)
    acct.record_gaussian(z, q, steps)
    report = acct.epsilon()
    return {
        "noise_multiplier": z,
        "sample_rate": q,
        "steps": steps,
        "delta": delta,
        "epsilon": report.epsilon,
        "accountant": report.accountant,
        "by_accountant": dict(report.by_accountant),
        "skipped": dict(report.skipped),
    }


def _accounting_table(rec: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("accountant", "left"),
        ("epsilon", "right"),
        ("", "left"),
    )
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for name, eps in rec["by_accountant"].items():
        mark = "← tightest" if name == rec["accountant"] else ""
        table.add_row(name, f"{eps:.6g}", mark)
    for name, reason in rec["skipped"].items():
        table.add_row(name, "—", f"skipped: {reason}")
    return table


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._parser
    mode = _validate(args, parser)
    console = console_for(args)
    delta = DEFAULT_DELTA if args.delta is None else args.delta
    try:
        if mode == "mechanism":
            sens = 1.0 if args.sensitivity is None else args.sensitivity
            if args.mechanism == "gaussian":
                how = args.calibration or "analytic"
                fn = analytic_gaussian_sigma if how == "analytic" else classical_gaussian_sigma
                sigma = fn(args.epsilon, delta, sens)
                rec: dict[str, Any] = {
                    "mode": mode,
                    "mechanism": "gaussian",
                    "epsilon": args.epsilon,
                    "delta": delta,
                    "sensitivity": sens,
                    "calibration": how,
                    "sigma": sigma,
                    "noise_multiplier": sigma / sens,
                    "exact_delta": balle_wang_delta(sigma, args.epsilon, sens),
                }
                rows = [
                    ("σ (noise std)", f"{sigma:.7g}"),
                    ("noise multiplier σ/Δ", f"{sigma / sens:.7g}"),
                    ("exact δ at this σ (Balle–Wang)", f"{rec['exact_delta']:.4g}"),
                ]
                title = f"Gaussian mechanism ({how}): ε = {args.epsilon:g}, δ = {delta:g}, Δ₂ = {sens:g}"
            else:
                b = laplace_scale(args.epsilon, sens)
                rec = {
                    "mode": mode,
                    "mechanism": "laplace",
                    "epsilon": args.epsilon,
                    "sensitivity": sens,
                    "scale": b,
                    "noise_multiplier": b / sens,
                }
                rows = [("b (Laplace scale)", f"{b:.7g}"), ("noise multiplier b/Δ₁", f"{b / sens:.7g}")]
                title = f"Laplace mechanism: ε = {args.epsilon:g}, Δ₁ = {sens:g}"
            table = Table(title=title)
            table.add_column("quantity")
            table.add_column("value", justify="right")
            for row in rows:
                table.add_row(*row)
        else:
            q = 1.0 if args.sample_rate is None else args.sample_rate
            names = args.accountants or ACCOUNTANTS
            if mode == "calibrate":
                with_ = args.accountant or ("tightest" if len(names) > 1 else names[0])
                z = calibrate(args.target_epsilon, delta, args.steps, q, args.accountant or tuple(names))
                rec = {
                    "mode": mode,
                    "target_epsilon": args.target_epsilon,
                    "calibrated_with": with_,
                    **_accounting_record(z, q, args.steps, delta, names),
                }
                title = (
                    f"noise multiplier z = {z:.6g} reaches ε ≤ {args.target_epsilon:g} ({with_}) after "
                    f"{args.steps} steps, q = {q:g}, δ = {delta:g}"
                )
            else:
                rec = {"mode": mode, **_accounting_record(args.noise_multiplier, q, args.steps, delta, names)}
                title = (
                    f"ε after {args.steps} steps: z = {args.noise_multiplier:g}, q = {q:g} "
                    f"(Poisson), δ = {delta:g}"
                )
            table = _accounting_table(rec, title)
    except ValueError as e:
        parser.error(str(e))
    console.print(table)
    if mode == "calibrate":
        console.print(f"noise multiplier: [bold]{rec['noise_multiplier']:.6g}[/bold]")
    if args.json:
        print_json(_finite(rec))
    return 0
