"""FedDP as written: Eq. 11 noise with the (epsilon, delta) an accountant proves, next to Eq. 14's C/sigma.

FedDP clips each client's update to C and adds N(0, sigma^2 C^2 I) (Eq. 11): sigma is a noise
multiplier, the noise std is sigma*C. It then states epsilon = C/sigma (Eq. 14), which is no DP
guarantee. This subcommand runs the paper's mechanism (``FedDPNoise``, local placement by default:
each client noises its own upload, the paper's text; ``--placement central``: Eq. 11's single noise
term on the sum) through privfl's accountant for the paper's setting (sigma 0.5, C 0.05, 5 clients,
all sampled, 150 rounds, delta 1e-5), prints the tightest proven epsilon with the floating-point
delta floor for an update of ``--params`` values (default: DHU-Net's), and the noise multiplier a
proven epsilon of C/sigma would need (calibrated to the tightest accountant). ``--train`` also runs
the federated training with the mechanism on the synthetic data and reports utility.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from privfl.bench.common import console_for, finish, json_out, machine
from privfl.defenses import FedDPNoise, RoundContext
from privfl.defenses.accounting import calibrate
from privfl.defenses.calibration import gaussian_epsilon
from privfl.defenses.rng import SeededNoise

DHUNET_PARAMS = 55_414_330
"""Floating-point values in DHU-Net's state (``build_model("dhunet")``): the update the paper noises."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sigma", type=float, default=0.5, help="noise multiplier of Eq. 11 (noise std = sigma*C)"
    )
    p.add_argument("--clip", type=float, default=0.05, help="L2 clip norm C of Eq. 11")
    p.add_argument(
        "--placement",
        choices=("local", "central"),
        default="local",
        help="local: each client noises its upload (the paper's text); central: one noise term on "
        "the sum (Eq. 11)",
    )
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument(
        "--params",
        type=int,
        default=DHUNET_PARAMS,
        help="values per update, for the floating-point delta floor (default: DHU-Net's)",
    )
    p.add_argument("--train", action="store_true", help="also train with the mechanism and report Dice")
    p.add_argument("--model", default="unet-tiny", help="model for --train")
    p.add_argument("--train-rounds", type=int, default=None, help="rounds for --train (default --rounds)")
    p.add_argument("--samples-per-client", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)


def account(
    sigma: float,
    clip: float,
    clients: int,
    rounds: int,
    delta: float,
    *,
    placement: str = "local",
    params: int = DHUNET_PARAMS,
) -> dict[str, Any]:
    """Record ``rounds`` rounds of FedDPNoise (all clients sampled, updates of ``params`` values) and
    report the tightest proven ε, every accountant's, and the noise a proven ε = C/σ would need."""
    mech = FedDPNoise(sigma, clip, placement=placement, accounting_delta=delta)  # type: ignore[arg-type]
    ctx = RoundContext(0, clients, tuple(range(clients)), tuple([1 / clients] * clients))
    for _ in range(rounds):
        mech.record_release(ctx, params)
    report = mech.accountant.epsilon(delta)
    one = FedDPNoise(sigma, clip, placement=placement, accounting_delta=delta)  # type: ignore[arg-type]
    one.record_release(ctx, params)
    needed = calibrate(mech.paper_epsilon, delta, rounds, 1.0)  # the tightest accountant, as reported
    return {
        "sigma": sigma,
        "clip": clip,
        "placement": placement,
        "noise_std": mech.noise_std(ctx.for_client(0)),
        "noise_multiplier": mech.noise_multiplier,
        "clients": clients,
        "rounds": rounds,
        "delta": delta,
        "params": params,
        "paper_epsilon": mech.paper_epsilon,
        "epsilon": report.epsilon,
        "accountant": report.accountant,
        "by_accountant": report.by_accountant,
        "delta_total": report.delta,
        "delta_floor": report.delta_floor,
        "epsilon_one_round": one.accountant.epsilon(delta).epsilon,
        # every client in every round: T Gaussian releases compose exactly into one with z / sqrt(T)
        "exact_epsilon": gaussian_epsilon(mech.noise_multiplier / rounds**0.5, delta),
        "noise_multiplier_for_paper_epsilon": needed,
        "noise_std_for_paper_epsilon": needed * clip,
        "calibrated_with": "tightest",
    }


def train(args: argparse.Namespace, rounds: int, console) -> dict[str, Any]:
    from privfl.data import SyntheticHistology, partition
    from privfl.fl import ClientConfig, run_federated
    from privfl.models import build_model

    n = args.clients * args.samples_per_client
    data = SyntheticHistology(n, size=64, seed=args.seed, sites=args.clients)
    test = SyntheticHistology(32, size=64, seed=args.seed + 10_000, sites=args.clients)
    clients = partition(data, "by_site", args.clients, seed=args.seed)
    out: dict[str, Any] = {}
    for name, defense in (
        ("no defense", None),
        (
            "FedDPNoise",
            FedDPNoise(
                args.sigma,
                args.clip,
                placement=args.placement,
                noise=SeededNoise(args.seed),
                accounting_delta=args.delta,
            ),
        ),
    ):
        model = build_model(args.model, num_classes=SyntheticHistology.num_classes)
        t0 = time.perf_counter()
        result = run_federated(
            model,
            clients,
            test,
            rounds,
            num_classes=SyntheticHistology.num_classes,
            config=ClientConfig(batch_size=8, lr=0.05),
            defense=defense,
            seed=args.seed,
            progress=not args.json,
        )
        last = result.history[-1]
        out[name] = {
            "dice": last["test"]["dice"],
            "curve": result.curve(),
            "privacy": last["privacy"],
            "noise": defense.noise.name if defense else None,
            "seconds": time.perf_counter() - t0,
        }
        console.print(f"{name}: test Dice {last['test']['dice']:.3f} after {rounds} rounds")
    return out


def run(args: argparse.Namespace) -> int:
    console = console_for(args)
    result = account(
        args.sigma,
        args.clip,
        args.clients,
        args.rounds,
        args.delta,
        placement=args.placement,
        params=args.params,
    )
    table = Table(
        title=f"FedDP Eq. 11 ({args.placement}): sigma {args.sigma}, C {args.clip}, {args.clients} clients, "
        f"{args.rounds} rounds"
    )
    table.add_column("")
    table.add_column("epsilon", justify="right")
    table.add_row("FedDP's claim, Eq. 14 (C/sigma) — not a DP guarantee", f"{result['paper_epsilon']:.4g}")
    for name, eps in result["by_accountant"].items():
        mark = "  ← tightest" if name == result["accountant"] else ""
        table.add_row(f"proven by {name} at delta={args.delta:g}{mark}", f"{eps:.4g}")
    table.add_row("exact (T releases = one with z/√T)", f"{result['exact_epsilon']:.4g}")
    table.add_row("one round alone (tightest)", f"{result['epsilon_one_round']:.4g}")
    console.print(table)
    console.print(
        f"noise multiplier z = sigma = {result['noise_multiplier']:.4g}, noise std sigma*C = "
        f"{result['noise_std']:.4g}. The epsilon holds at delta = {result['delta_total']:.6g}: "
        f"{args.delta:g} + the floating-point floor {result['delta_floor']:.2g} of {args.params:,}-value "
        f"updates. Assumes: every client in every round (no sampling amplification), "
        f"{'each client noising its own upload' if args.placement == 'local' else 'a trusted server'}."
    )
    console.print(
        f"For a proven epsilon of {result['paper_epsilon']:.4g} over {args.rounds} rounds (tightest "
        f"accountant), z must be {result['noise_multiplier_for_paper_epsilon']:.4g} "
        f"(noise std {result['noise_std_for_paper_epsilon']:.4g})."
    )
    record: dict[str, Any] = {"machine": machine(), "accounting": result}
    if args.train:
        record["training"] = train(args, args.train_rounds or args.rounds, console)
    return finish(args, console, json_out(args, "feddp"), record)
