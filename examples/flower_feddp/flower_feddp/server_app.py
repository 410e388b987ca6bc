"""ServerApp: the privfl defense's server side (sampling, weights, aggregation, the accountant)."""

from __future__ import annotations

import json
import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flower_feddp.task import CRYPTO, make_defense, make_model, run_config, server_ckks
from privfl.fl.client import trainable_state
from privfl.integrations.flower import PrivflStrategy
from privfl.integrations.flower.codec import state_to_record

app = ServerApp()
log = logging.getLogger("privfl.flower")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context)
    model = make_model(int(cfg["image-size"]), int(cfg["seed"]))
    ckks = cfg["crypto"] == "ckks"
    if ckks and not cfg["keys-dir"]:
        raise ValueError("crypto = 'ckks' needs keys-dir: where the clients keep the keys")
    if cfg["crypto"] not in CRYPTO:
        raise ValueError(f"crypto must be one of {CRYPTO}, got {cfg['crypto']!r}")
    # the server's defense: the clients' stages before CKKS (it keeps the accountant); CKKS: the public
    # context only. Secure aggregation: the server's side of the protocol (no client secret)
    defense = make_defense(
        float(cfg["sigma"]), float(cfg["clip"]), bool(cfg["partial"]), secagg=cfg["crypto"] == "secagg"
    )
    # PrivflStrategy wraps a Flower strategy, FedAvg by default: inner=FedAdam(fraction_evaluate=0.0) would
    # apply Adam to the defended mean (not under CKKS, where the server has no model)
    strategy = PrivflStrategy(
        defense,
        min_clients=int(cfg["min-clients"]),
        seed=int(cfg["seed"]),
        model=model,
        ckks=server_ckks(str(cfg["keys-dir"])) if ckks else None,
    )
    strategy.start(grid, state_to_record(trainable_state(model)), num_rounds=int(cfg["num-server-rounds"]))
    eps = strategy.accountant.epsilon()
    summary = {
        "rounds": len(strategy.history),
        "epsilon": eps.epsilon,
        "delta": eps.delta,
        "accountant": eps.accountant,
        "train_loss": [h["train_loss"] for h in strategy.history],
        "rejected": [h["rejected"] for h in strategy.history],
    }
    log.warning("privfl summary: %s", json.dumps(summary))
    if ckks:
        print(
            f"privfl: the server holds {len(strategy.encrypted_aggregates)} encrypted aggregates and no model"
        )
    if cfg["crypto"] == "secagg":
        report = defense.stages[-1].last_report
        print(
            f"privfl: secure aggregation, last round's sum over clients {list(report.survivors)}, "
            f"{sum(report.wire_bytes.values())} bytes on the wire"
        )
    print(
        f"privfl: {summary['rounds']} rounds, ε = {eps.epsilon:.3f} at δ = {eps.delta:g} ({eps.accountant})"
    )
