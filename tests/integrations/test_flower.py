"""privfl defenses inside Flower: codec, malformed payloads, and a simulation that matches run_federated."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import pytest
import torch

pytest.importorskip("flwr")
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from privfl.data import SyntheticHistology, partition  # noqa: E402
from privfl.defenses import ClipUpdate, Compose, FedDPNoise, GaussianMechanism, PartialSharing  # noqa: E402
from privfl.defenses.base import Defense, RoundContext  # noqa: E402
from privfl.defenses.rng import SeededNoise  # noqa: E402
from privfl.defenses.secagg import SecureAggregation  # noqa: E402
from privfl.fl import ClientConfig, run_federated  # noqa: E402
from privfl.fl.client import Client, trainable_state  # noqa: E402
from privfl.fl.device import make_fabric  # noqa: E402
from privfl.integrations.flower import MalformedPayloadError, PrivflClient, PrivflStrategy, RoundFailedError  # noqa: E402
from privfl.integrations.flower.codec import (  # noqa: E402
    content_to_payload,
    context_to_record,
    payload_to_content,
    record_to_context,
    record_to_state,
    state_to_record,
)
from privfl.models import build_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure", "ignore::DeprecationWarning")

N_CLIENTS, ROUNDS, SEED = 3, 2, 0
CFG = ClientConfig(local_steps=2, batch_size=4, lr=0.05)


def _federation():
    data = SyntheticHistology(N_CLIENTS * 6, size=32, seed=SEED, sites=N_CLIENTS)
    return partition(data, "by_site", N_CLIENTS, seed=SEED)


def _model():
    torch.manual_seed(SEED)
    return build_model("unet-tiny")


DEFENSES = {
    "feddp": lambda: FedDPNoise(0.01, 0.5, noise=SeededNoise(SEED)),
    "partial+central": lambda: Compose(
        PartialSharing(share=["down.*"]),
        ClipUpdate(0.5),
        GaussianMechanism(noise_multiplier=1.0, placement="central", noise=SeededNoise(SEED)),
    ),
    "secagg+distributed": lambda: Compose(
        ClipUpdate(0.5),
        GaussianMechanism(noise_multiplier=1.0, placement="distributed", noise=SeededNoise(SEED)),
        SecureAggregation(2, clip_range=2.0),
    ),
}


# ---------------------------------------------------------------------------------------------
# codec
# ---------------------------------------------------------------------------------------------


def test_codec_round_trips_states_bytes_and_contexts():
    state = trainable_state(_model())
    back = record_to_state(state_to_record(state))
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert content_to_payload(payload_to_content(b"\x01\x02")) == b"\x01\x02"
    ctx = RoundContext(
        round=3, num_clients=5, sampled=(0, 2), weights=(0.25, 0.75), client_id=2, seed=2**62 + 1
    )
    assert record_to_context(context_to_record(ctx)) == ctx


@pytest.mark.parametrize(
    "content, reason",
    [
        (RecordDict({}), "exactly one of"),
        (RecordDict({"privfl.bytes": ConfigRecord({"payload": b""})}), "non-empty bytes"),
        (
            RecordDict({"privfl.state": ArrayRecord({"nope": Array(torch.zeros(2).numpy())})}),
            "unknown entries",
        ),
    ],
)
def test_malformed_contents_are_named(content, reason):
    with pytest.raises(MalformedPayloadError, match=reason):
        content_to_payload(content, trainable_state(_model()))


def test_wrong_shapes_and_nan_are_refused():
    state = trainable_state(_model())
    k = next(iter(state))
    bad_shape = payload_to_content({k: torch.zeros(1)})
    with pytest.raises(MalformedPayloadError, match="has shape"):
        content_to_payload(bad_shape, state)
    nan = payload_to_content({k: torch.full_like(state[k], float("nan"))})
    with pytest.raises(MalformedPayloadError, match="non-finite"):
        content_to_payload(nan, state)


def test_layout_record_round_trips_and_bad_layouts_are_named():
    from privfl.integrations.flower.codec import LAYOUT, layout_to_record, record_to_layout
    from privfl.updates import flatten

    spec = flatten(trainable_state(_model()))[1]
    assert record_to_layout(RecordDict({LAYOUT: layout_to_record(spec)})) == spec
    for bad, reason in [
        ({}, "without its 'privfl.layout'"),
        ({"layout": "[1, 2]"}, "bad 'privfl.layout'"),
        (
            {"layout": '{"entries": [["w", [2], "int64"]], "vector_dtype": "float32", "numel": 2}'},
            "not a floating",
        ),
        (
            {"layout": '{"entries": [["w", [2], "float32"]], "vector_dtype": "float32", "numel": 3}'},
            "says 3 values",
        ),
    ]:
        with pytest.raises(MalformedPayloadError, match=reason):
            record_to_layout(RecordDict({LAYOUT: ConfigRecord(bad)}))


def test_client_secagg_queries_keep_the_protocol_state_on_the_node(monkeypatch):
    """Unit level: a node answers the key rounds from its context.state alone; a query out of turn
    or to a node whose defense has no SecureAggregation stage is refused."""
    from flwr.app import RecordDict as RD
    from flwr.supercore.task_identity import TaskIdentity

    from privfl.defenses.secagg import SecAggClient, SecAggConfig, SecAggServer
    from privfl.integrations.flower.codec import SECAGG

    for field in ("_run_id", "_node_id", "_task_id"):  # what a ClientApp process would have set
        monkeypatch.setattr(TaskIdentity, field, 1)

    def query(node, step, message):
        msg = Message(
            RD({SECAGG: ConfigRecord({"step": step, "message": message})}),
            dst_node_id=1,
            message_type="query",
        )
        reply = node.query(msg, contexts[node.client_id])
        return reply.content.config_records[SECAGG]["message"]

    nodes = [
        PrivflClient(lambda: SecureAggregation(2, clip_range=1.0), None, client_id=c, num_examples=4)
        for c in range(2)
    ]
    contexts = [Context(run_id=1, node_id=c, node_config={}, state=RD(), run_config={}) for c in range(2)]
    cfg = SecAggConfig.create([0, 1], [0.5, 0.5], 2, 1.0)
    server = SecAggServer(cfg)
    for n in nodes:
        server.receive_advertisement(query(n, "advertise", cfg.to_bytes()))
    keys = server.key_list().to_bytes()
    for n in nodes:
        server.receive_shares(query(n, "share_keys", keys))
    for c, d in server.share_deliveries().items():
        assert query(nodes[c], "receive_shares", d.to_bytes()) == b""
    saved = SecAggClient.from_state_bytes(contexts[0].state.config_records["privfl.secagg-client"]["state"])
    assert saved.phase == "ready" and saved.config == cfg
    fresh = Context(run_id=1, node_id=5, node_config={}, state=RD(), run_config={})
    contexts.append(fresh)
    late = PrivflClient(lambda: SecureAggregation(2, clip_range=1.0), None, client_id=2, num_examples=4)
    with pytest.raises(Exception, match="no secure-aggregation round in progress"):
        query(late, "unmask", b"")
    plain = PrivflClient(lambda: FedDPNoise(0.01, 0.5), None, client_id=2, num_examples=4)
    with pytest.raises(Exception, match="does not end with an interactive aggregator"):
        query(plain, "advertise", cfg.to_bytes())


# ---------------------------------------------------------------------------------------------
# simulation vs run_federated
# ---------------------------------------------------------------------------------------------


def _apps(
    defense_name: str,
    strategies: list,
    corrupt: int | None = None,
    min_clients: int = 2,
    fail_unmask: int | None = None,
    inner=None,
    expect_config: dict | None = None,
):
    """A ServerApp and ClientApp running ``DEFENSES[defense_name]``; the strategy lands in ``strategies``.
    Client ``corrupt`` (if given) sends a payload with a wrong shape (a plain update) or a flipped
    byte (a masked input); client ``fail_unmask`` crashes when asked to unmask. ``inner`` builds the
    Flower strategy to wrap; every client's fit checks that ``ctx.extra["config"]`` holds
    ``expect_config``."""
    clients_data = _federation()

    def fit_for(cid: int):
        def fit(start, ctx):
            if expect_config is not None:
                got = {k: ctx.extra["config"].get(k) for k in expect_config}
                assert got == expect_config, f"client {cid}'s fit got config {got}"
            model = _model()
            client = Client(cid, clients_data[cid], CFG, None, None)
            return client.fit(model, start, ctx.round, ROUNDS, make_fabric("cpu"), SEED)

        return fit

    client_app = ClientApp()

    def privfl_client(context: Context) -> PrivflClient:
        cid = int(context.node_config["partition-id"])
        return PrivflClient(
            DEFENSES[defense_name], fit_for(cid), client_id=cid, num_examples=len(clients_data[cid])
        )

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        secagg = msg.content.config_records.get("privfl.secagg")
        if (
            secagg is not None
            and secagg["step"] == "unmask"
            and int(context.node_config["partition-id"]) == fail_unmask
        ):
            raise ConnectionError("node went offline")
        return privfl_client(context).query(msg, context)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = privfl_client(context).train(msg, context)
        if corrupt is not None and int(context.node_config["partition-id"]) == corrupt:
            if "privfl.bytes" in reply.content.config_records:
                blob = bytearray(reply.content.config_records["privfl.bytes"]["payload"])
                blob[-100] ^= 1  # one bit of the masked vector: its signature no longer verifies
                reply.content.config_records["privfl.bytes"]["payload"] = bytes(blob)
            else:
                arrays = reply.content.array_records["privfl.state"]
                first = next(iter(arrays))
                arrays[first] = Array(torch.zeros(7).numpy())
        return reply

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        model = _model()
        strategy = PrivflStrategy(
            DEFENSES[defense_name](),
            min_clients=min_clients,
            seed=SEED,
            model=model,
            inner=inner() if inner is not None else None,
        )
        strategies.append(strategy)
        strategy.result = strategy.start(grid, state_to_record(trainable_state(model)), num_rounds=ROUNDS)

    return server_app, client_app


def _reference(defense: Defense):
    """The same federation trained by ``run_federated`` in-process: what a Flower run must match."""
    return run_federated(
        _model(),
        _federation(),
        None,
        ROUNDS,
        config=CFG,
        defense=defense,
        seed=SEED,
        val_fraction=0.0,
        augment=None,
        accelerator="cpu",
        progress=False,
    )


def _simulate(defense_name: str, **kw) -> PrivflStrategy:
    strategies: list = []
    server_app, client_app = _apps(defense_name, strategies, **kw)
    run_simulation(
        server_app,
        client_app,
        num_supernodes=N_CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    assert strategies, "the ServerApp did not run"
    return strategies[0]


@pytest.mark.slow
@pytest.mark.parametrize("defense_name", ["feddp", "partial+central"])  # secagg: with a dropout, below
def test_flower_simulation_matches_run_federated(defense_name):
    strategy = _simulate(defense_name)
    reference_defense = DEFENSES[defense_name]()
    reference = _reference(reference_defense)
    final = record_to_state(strategy.result.arrays)
    assert set(final) == set(reference.global_state)
    for k, v in reference.global_state.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the same accounting: ε after every round
    flower_eps = [h["privacy"]["epsilon"] for h in strategy.history]
    privfl_eps = [h["privacy"]["epsilon"] for h in reference.history]
    assert flower_eps == pytest.approx(privfl_eps, rel=1e-9) and flower_eps[-1] > 0
    assert all(h["rejected"] == {} and h["received"] == [0, 1, 2] for h in strategy.history)


@pytest.mark.slow
def test_privfl_strategy_wraps_fedprox_in_simulation():
    """FedProx inside PrivflStrategy: its config (proximal-mu, server-round) reaches every client's
    fit, the clients' FedDP noise and the server's accountant still apply, and FedProx's server side
    (FedAvg) gives the model run_federated gives."""
    from flwr.serverapp.strategy import FedProx

    strategy = _simulate(
        "feddp",
        inner=lambda: FedProx(proximal_mu=0.1, fraction_evaluate=0.0),
        expect_config={"proximal-mu": 0.1},
    )
    assert type(strategy.inner).__name__ == "FedProx" and strategy.strategy is strategy.inner
    assert all(h["rejected"] == {} and h["received"] == [0, 1, 2] for h in strategy.history)
    reference = _reference(DEFENSES["feddp"]())
    final = record_to_state(strategy.result.arrays)
    for k, v in reference.global_state.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6, msg=k)
    eps = [h["privacy"]["epsilon"] for h in strategy.history]
    assert (
        eps == pytest.approx([h["privacy"]["epsilon"] for h in reference.history], rel=1e-9) and eps[-1] > 0
    )


@pytest.mark.slow
def test_secure_aggregation_on_flower_survives_an_unmask_dropout_and_holds_no_client_secret():
    """Client 1 sends its masked input, then goes offline when asked to unmask: its self mask is
    rebuilt from the others' shares and its input still counts, so the model matches run_federated.
    The server's stage talks to the nodes only through Flower messages."""
    strategy = _simulate("secagg+distributed", fail_unmask=1)
    stage = strategy.defense.stages[-1]
    assert type(stage.transport).__name__ == "FlowerTransport" and stage._client is None
    assert stage.last_report.survivors == (0, 1, 2) and stage.last_report.dropped_before_unmask == (1,)
    reference = _reference(DEFENSES["secagg+distributed"]())
    final = record_to_state(strategy.result.arrays)
    for k, v in reference.global_state.items():  # the same integer sums: equal up to float rounding
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert [h["privacy"]["epsilon"] for h in strategy.history] == pytest.approx(
        [h["privacy"]["epsilon"] for h in reference.history], rel=1e-9
    )
    assert all("unmask" in h["rejected"][1] and h["received"] == [0, 1, 2] for h in strategy.history)


@pytest.mark.slow
def test_secure_aggregation_on_flower_rejects_a_tampered_masked_input(caplog):
    """A flipped bit in client 2's masked input fails its signature: the server drops it (its
    pairwise masks are removed through its reconstructed key), logs why, and the round completes
    with clients 0 and 1; the distributed noise is accounted for the two inputs in the mean."""
    caplog.set_level(logging.WARNING)
    strategy = _simulate("secagg+distributed", corrupt=2)
    for h in strategy.history:
        assert h["received"] == [0, 1] and "SecAggIntegrityError" in h["rejected"][2]
    assert strategy.defense.stages[-1].last_report.dropped_before_input == (2,)
    assert "client 2 dropped" in caplog.text

    def epsilon_with(survivors):  # the accountant of ROUNDS rounds whose mean carries these inputs' noise
        noise = DEFENSES["secagg+distributed"]().stages[1]
        for r in range(ROUNDS):
            noise.accountant.record(noise.event(replace(strategy._ctx, round=r, survivors=survivors)))
        return noise.accountant.epsilon().epsilon

    assert strategy.accountant.epsilon().epsilon == pytest.approx(epsilon_with((0, 1)), rel=1e-9)
    assert epsilon_with((0, 1)) > epsilon_with((0, 1, 2))


@pytest.mark.slow
def test_malformed_payload_is_rejected_and_the_round_completes(caplog):
    caplog.set_level(logging.WARNING, logger="privfl.flower")
    strategy = _simulate("feddp", corrupt=2)
    for h in strategy.history:
        assert h["received"] == [0, 1] and "has shape" in h["rejected"][2]
    assert "client 2 rejected" in caplog.text
    assert strategy.accountant.steps == ROUNDS


class _InProcessGrid:
    """Stands in for Flower's Grid: delivers each message to an in-process PrivflClient."""

    def __init__(self, clients: list[PrivflClient]):
        self.nodes = {
            100 + c.client_id: (
                c,
                Context(
                    run_id=1, node_id=100 + c.client_id, node_config={}, state=RecordDict(), run_config={}
                ),
            )
            for c in clients
        }

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            client, context = self.nodes[msg.metadata.dst_node_id]
            handler = client.train if msg.metadata.message_type == "train" else client.query
            replies.append(handler(msg, context))
        return replies


@pytest.mark.parametrize("inner_name", ["FedAdam", "FedProx"])
def test_privfl_strategy_wraps_an_inner_flower_strategy(monkeypatch, inner_name):
    """Unit level, no Flower runtime: the inner strategy's config reaches the clients' fit, the
    defense (clipping) is applied to the updates, and the inner strategy turns the defended mean into
    the next model — FedAdam as its server update, FedProx (FedAvg on the server) by applying it."""
    import numpy as np
    from flwr.serverapp.strategy import FedAdam, FedProx
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):  # what a Flower process would have set
        monkeypatch.setattr(TaskIdentity, field, 1)
    seen: list[dict] = []

    def fit_for(cid):
        def fit(start, ctx):
            seen.append(dict(ctx.extra["config"]))
            return {"w": torch.full((4,), 0.1 * (cid + 1))}, 0.5  # norms 0.2, 0.4, 0.6

        return fit

    sizes = [4, 6, 10]
    clients = [
        PrivflClient(lambda: ClipUpdate(0.3), fit_for(c), client_id=c, num_examples=sizes[c])
        for c in range(3)
    ]
    inner = (
        FedAdam(fraction_evaluate=0.0)
        if inner_name == "FedAdam"
        else FedProx(proximal_mu=0.1, fraction_evaluate=0.0)
    )
    strategy = PrivflStrategy(ClipUpdate(0.3), inner=inner, min_clients=2)
    result = strategy.start(_InProcessGrid(clients), state_to_record({"w": torch.zeros(4)}), num_rounds=1)

    assert len(seen) == 3 and all(c["server-round"] == 1 for c in seen)
    if inner_name == "FedProx":
        assert all(c["proximal-mu"] == 0.1 for c in seen)
    mean = (4 * 0.1 + 6 * 0.15 + 10 * 0.15) / 20  # clipped to norm 0.3: 0.1, 0.15, 0.15 per coordinate
    expected = mean
    if inner_name == "FedAdam":  # one step of Adam on the defended mean (Reddi et al.; Flower's constants)
        m, v = 0.1 * mean, 0.01 * mean**2
        expected = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2) * m / (np.sqrt(v) + 1e-3)
    final = record_to_state(result.arrays)["w"]
    assert final.dtype == torch.float32  # FedAdam computes in float64; the model keeps its dtype
    torch.testing.assert_close(final, torch.full((4,), expected), rtol=1e-6, atol=1e-7)
    assert strategy.history[0]["received"] == [0, 1, 2] and strategy.history[0][
        "train_loss"
    ] == pytest.approx(0.5)


def test_privfl_strategy_refuses_inner_strategies_that_cannot_work():
    from flwr.serverapp.strategy import FedAdam, FedProx

    with pytest.raises(TypeError, match="other than PrivflStrategy"):
        PrivflStrategy(FedDPNoise(0.01, 0.5), inner=PrivflStrategy(FedDPNoise(0.01, 0.5)))
    with pytest.raises(ValueError, match="fraction must be"):
        PrivflStrategy(FedDPNoise(0.01, 0.5), fraction=0.0)
    with pytest.raises(ValueError, match="not both"):
        PrivflStrategy(FedDPNoise(0.01, 0.5), inner=FedProx(), strategy=FedProx())
    assert (
        type(PrivflStrategy(FedDPNoise(0.01, 0.5), strategy=FedProx()).inner) is FedProx
    )  # Flower's name for it
    pytest.importorskip("tenseal")
    from privfl.defenses.ckks import CKKSKeys, CKKSServer

    server = CKKSServer(CKKSKeys.generate("compact").server_context)
    with pytest.raises(ValueError, match="FedAdam's server update cannot run"):
        PrivflStrategy(Compose(ClipUpdate(1.0)), ckks=server, inner=FedAdam())
    PrivflStrategy(
        Compose(ClipUpdate(1.0)), ckks=server, inner=FedProx(proximal_mu=0.1)
    )  # sampling and config only


def test_defenses_declare_how_their_aggregate_is_obtained():
    """The capability the Flower integration dispatches on; Compose forwards its last stage's."""
    pytest.importorskip("tenseal")
    from privfl.defenses import CKKSAggregation

    plain = Compose(ClipUpdate(0.5), FedDPNoise(0.01, 0.5))
    secagg = DEFENSES["secagg+distributed"]()
    ckks = Compose(ClipUpdate(1.0), CKKSAggregation("compact"))
    assert (plain.aggregation, secagg.aggregation, ckks.aggregation) == ("plain", "interactive", "encrypted")
    assert secagg.aggregating_stage is secagg.stages[-1] and plain.aggregating_stage is plain.stages[-1]
    with pytest.raises(NotImplementedError, match="aggregation is 'plain'"):
        plain.aggregating_stage.open_aggregate(b"")


def test_below_minimum_fails_cleanly():
    """Unit level: a round with fewer valid payloads than min_clients raises RoundFailedError."""
    strategy = PrivflStrategy(DEFENSES["feddp"](), min_clients=3, seed=SEED)
    model_state = trainable_state(_model())
    from privfl.fl.server import Server

    strategy._nodes, strategy._sizes = {0: 10, 1: 11, 2: 12}, {0: 6, 1: 6, 2: 6}
    strategy._server = Server(copy.deepcopy(model_state), strategy.defense, 3, 1.0, SEED)
    strategy.begin_round(1, state_to_record(model_state))
    with pytest.raises(RoundFailedError, match="0 valid payloads, min_clients = 3"):
        strategy.aggregate_train(1, [])


@pytest.mark.slow
@pytest.mark.deployment
def test_example_runs_in_deployment_mode_on_loopback():
    """SuperLink + 3 SuperNodes on 127.0.0.1, `flwr run`, 2 rounds with FedDP, partial sharing and
    secure aggregation, clean shutdown (about 3 minutes)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "flower_feddp" / "deploy_local.py"
    run = subprocess.run(
        [sys.executable, str(script), "--rounds", "2", "--crypto", "secagg"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "privfl: 2 rounds, ε = 15.456 at δ = 1e-05" in run.stdout  # the same ε as in simulation
    assert '"rejected": [{}, {}]' in run.stdout
    # each node kept its protocol state across messages (a fresh ClientApp process each time)
    assert "secure aggregation, last round's sum over clients [0, 1, 2]" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "crypto", ["ckks"]
)  # secagg: the deployment test; none: the same code without a stage
def test_example_runs_in_simulation(crypto):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "flower_feddp" / "simulate.py"
    run = subprocess.run(
        [sys.executable, str(script), "--crypto", crypto], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "privfl: 2 rounds, ε = 15.456 at δ = 1e-05" in run.stdout
    assert ("the server holds 2 encrypted aggregates and no model" in run.stdout) == (crypto == "ckks")


@pytest.mark.slow
def test_ckks_in_flower_keeps_the_key_on_the_clients_and_matches_run_federated():
    from privfl.defenses import CKKSAggregation
    from privfl.defenses.ckks import CKKSClient, CKKSKeys, CKKSServer
    from privfl.updates import apply, unflatten

    keys = CKKSKeys.generate("precise")

    def ckks_defense():
        return Compose(ClipUpdate(1.0), CKKSAggregation("precise", keys=keys))

    clients_data = _federation()

    def fit_for(cid: int):
        def fit(start, ctx):
            return Client(cid, clients_data[cid], CFG, None, None).fit(
                _model(), start, ctx.round, ROUNDS, make_fabric("cpu"), SEED
            )

        return fit

    client_app = ClientApp()

    def privfl_client(context: Context) -> PrivflClient:
        cid = int(context.node_config["partition-id"])
        return PrivflClient(ckks_defense, fit_for(cid), client_id=cid, num_examples=len(clients_data[cid]))

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return privfl_client(context).query(msg, context)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return privfl_client(context).train(msg, context)

    strategies: list = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # the server: only the public context, and the stages before CKKS
        strategy = PrivflStrategy(
            Compose(ClipUpdate(1.0)), min_clients=2, seed=SEED, ckks=CKKSServer(keys.server_context)
        )
        strategies.append(strategy)
        strategy.start(grid, state_to_record(trainable_state(_model())), num_rounds=ROUNDS)

    run_simulation(
        server_app,
        client_app,
        num_supernodes=N_CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    strategy = strategies[0]
    assert len(strategy.encrypted_aggregates) == ROUNDS and all(h["rejected"] == {} for h in strategy.history)
    # a key holder replays the rounds: initial state + each decrypted mean update
    holder = CKKSClient(keys.client_context)
    state = trainable_state(_model())
    for blob in strategy.encrypted_aggregates:
        state = apply(state, unflatten(*holder.decrypt_vector(blob)), allow_missing=True)
    reference = _reference(ckks_defense())
    for k, v in reference.global_state.items():  # equal up to CKKS error (fresh encryption randomness)
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="secret key"):
        PrivflStrategy(ckks_defense(), ckks=CKKSServer(keys.server_context))
