"""``python -m privfl.bench <subcommand>``: benchmarks and the demo job."""

from __future__ import annotations

import argparse
import sys

from privfl.bench import fedavg, throughput

SUBCOMMANDS = {
    "fedavg": fedavg,
    "demo": fedavg,
    "train-throughput": throughput,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m privfl.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.strip().splitlines()[0]))
    args = parser.parse_args(argv)
    return SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
