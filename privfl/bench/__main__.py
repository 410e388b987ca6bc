"""``python -m privfl.bench <subcommand>``: benchmarks, the privacy calculator and the demo job.

Every subcommand takes ``--json`` to print one JSON object with its figures instead of tables.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with ``add_arguments(parser)`` and ``run(args) -> int``, one-line help)
SUBCOMMANDS = {
    "demo": (
        "privfl.bench.attack_vs_dp",
        "the main job (attack-vs-dp, cpu-quick) on the embedded synthetic data",
    ),
    "attack-vs-dp": (
        "privfl.bench.attack_vs_dp",
        "privacy, utility and attack success of each defense side by side",
    ),
    "fedavg": ("privfl.bench.fedavg", "FedAvg on the synthetic data: Dice per round"),
    "feddp": ("privfl.bench.feddp", "FedDP's Eq. 11 noise with the (epsilon, delta) an accountant proves"),
    "epsilon": (
        "privfl.bench.epsilon",
        "privacy calculator: epsilon per accountant, calibration, noise scale",
    ),
    "noise": ("privfl.bench.noise", "secure vs seeded DP noise throughput"),
    "he": ("privfl.bench.he", "CKKS aggregation: time, bytes and error vs the per-layer TenSEAL recipe"),
    "secagg": (
        "privfl.bench.secagg",
        "secure aggregation: masking time, bytes, dropouts vs RandomState masks",
    ),
    "inversion": ("privfl.bench.inversion", "Inverting Gradients: iterations/s and PSNR on a fixed case"),
    "membership": (
        "privfl.bench.membership",
        "LiRA and LOSS attacks on an overfitted model, undefended vs DP-SGD",
    ),
    "fedavg-vs-feddp": (
        "privfl.bench.fedavg_vs_feddp",
        "FedDP Table I: centralized / FL / FedDP per model, with proven ε",
    ),
    "noise-ablation": (
        "privfl.bench.noise_ablation",
        "FedDP Table II: Dice over clip C × noise σ, proven ε vs C/σ",
    ),
    "train-throughput": ("privfl.bench.throughput", "training throughput and peak memory per model"),
    "dpcvae": (
        "privfl.bench.dpcvae",
        "DP-CVAE on embeddings vs FedAvg/FedProx/FedLambda/DP-CGAN: utility, ε, attacks",
    ),
    "dsl": (
        "privfl.bench.dsl",
        "Distributed Synthetic Learning vs FedAvg/FedAvg-GAN: Dice, Dist-FID, MIA, gradient leaks",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m privfl.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (path, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the subcommand that runs
            module = importlib.import_module(path)
            module.add_arguments(p)
            if not any(a.dest == "json" for a in p._actions):
                p.add_argument("--json", action="store_true", help="print one JSON object with the figures")
    args = parser.parse_args(argv)
    assert module is not None
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
