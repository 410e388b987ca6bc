"""ClientApp: local training, then the privfl defense's client side (personalize, protect)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_feddp.task import ckks_keys, client_data, make_defense, make_fit, run_config
from privfl.integrations.flower import PrivflClient

app = ClientApp()


def _client(context: Context) -> PrivflClient:
    cfg, node = run_config(context), context.node_config
    cid, n = int(node["partition-id"]), int(node["num-partitions"])
    size, seed = int(cfg["image-size"]), int(cfg["seed"])
    data = client_data(cid, n, int(cfg["samples-per-client"]), size, seed)
    fit = make_fit(
        cid, data, int(cfg["num-server-rounds"]), size, seed, float(cfg["lr"]), int(cfg["batch-size"])
    )
    keys = ckks_keys(str(cfg["keys-dir"])) if cfg["crypto"] == "ckks" else None
    secagg = cfg["crypto"] == "secagg"
    return PrivflClient(
        lambda: make_defense(float(cfg["sigma"]), float(cfg["clip"]), bool(cfg["partial"]), keys, secagg),
        fit,
        client_id=cid,
        num_examples=len(data),
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _client(context).query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _client(context).train(msg, context)
