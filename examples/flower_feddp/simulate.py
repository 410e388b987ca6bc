"""Run the app on Flower's simulation engine in one command: ``python examples/flower_feddp/simulate.py``."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from flower_feddp.client_app import app as client_app  # noqa: E402
from flower_feddp.server_app import app as server_app  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

if __name__ == "__main__":
    import argparse
    import json
    import os
    import tempfile

    from flower_feddp.task import make_keys

    ap = argparse.ArgumentParser(description="the example on Flower's simulation engine")
    ap.add_argument(
        "--crypto",
        choices=("none", "ckks", "secagg"),
        default="none",
        help="CKKS-encrypt what clients send, or secure-aggregate it",
    )
    args = ap.parse_args()
    if args.crypto == "ckks":  # keys made before the run and handed to the clients (out of band)
        keys_dir = tempfile.mkdtemp(prefix="privfl-ckks-")
        make_keys(keys_dir)
        os.environ["PRIVFL_EXAMPLE_CONFIG"] = json.dumps({"crypto": "ckks", "keys-dir": keys_dir})
    elif args.crypto == "secagg":  # nothing to set up: keys are fresh every round
        os.environ["PRIVFL_EXAMPLE_CONFIG"] = json.dumps({"crypto": "secagg"})
    run_simulation(
        server_app,
        client_app,
        num_supernodes=3,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
