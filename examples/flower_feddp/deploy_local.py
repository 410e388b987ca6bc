"""Deployment mode on one machine: a SuperLink and three SuperNodes on 127.0.0.1, then ``flwr run``.

``python examples/flower_feddp/deploy_local.py [--rounds N]`` starts the processes (plain gRPC on
loopback: ``--insecure`` is for this demo only, see docs/flower.md), submits the app, streams its
log, and shuts everything down, also on Ctrl-C or failure. Exit status 0 when the run finished.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
NUM_NODES = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (the SuperLink's SuperExec, the SuperNodes' ClientApp processes),
    then SIGKILL what is left after 20 s."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600, help="seconds before the run is abandoned")
    ap.add_argument(
        "--crypto",
        choices=("none", "ckks", "secagg"),
        default="none",
        help="CKKS-encrypt what clients send, or secure-aggregate it",
    )
    args = ap.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="privfl-flwr-"))
    run_config = f"num-server-rounds={args.rounds}"
    if args.crypto == "ckks":  # keys made before the run and handed to the clients (out of band)
        sys.path.insert(0, str(HERE))
        from flower_feddp.task import make_keys

        make_keys(str(home / "keys"))
        run_config += f" crypto='ckks' keys-dir='{home / 'keys'}'"
    elif args.crypto == "secagg":  # nothing to set up: keys are fresh every round
        run_config += " crypto='secagg'"
    link = _free_port()  # Flower >= 1.41 serves the Fleet, Control and Runtime APIs on one HTTP port
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    # FLWR_HOME keeps Flower's state in a temporary folder; privfl is already installed in this
    # environment, so Flower must not build a fresh one from PyPI (privfl is not published there)
    # Flower's processes start helpers (flower-superexec, flwr-clientapp) by name: this environment's
    # bin/ must come first on PATH even when the venv is not activated
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    logs = home / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        out = (logs / f"{name}.log").open("w")
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    ok = False
    try:
        start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--database",
                ":flwr-in-memory:",
                "--host",
                "127.0.0.1",
                "--port",
                str(link),
            ],
        )
        _wait_for(link, 60)
        for i in range(NUM_NODES):
            start(
                f"supernode-{i}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--node-config",
                    f"partition-id={i} num-partitions={NUM_NODES}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(_free_port()),
                ],
            )
        time.sleep(3)
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(HERE), "loopback", "--stream", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        print(run.stdout[-6000:])
        ok = run.returncode == 0 and "privfl:" in run.stdout
        if not ok:
            print(run.stderr[-4000:], file=sys.stderr)
        return 0 if ok else 1
    finally:
        _stop(procs)
        if not ok:  # the processes' logs say why
            for f in sorted(logs.iterdir()):
                print(f"--- {f.name}\n{f.read_text()[-3000:]}", file=sys.stderr)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
