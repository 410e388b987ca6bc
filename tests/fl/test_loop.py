"""FedAvg loop: aggregation, sampling, checkpoint/resume, and the defense boundary."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from privfl.data import SyntheticHistology, partition
from privfl.defenses import Defense, NoDefense, RoundContext
from privfl.fl import CheckpointMismatchError, ClientConfig, Server, load_checkpoint, run_federated
from privfl.models import build_model
from privfl.updates import InvalidUpdateError, Update, weighted_mean

SIZE = 32


def _setup(n_clients: int = 3, per_client: int = 10, seed: int = 0):
    data = SyntheticHistology(n_clients * per_client, size=SIZE, seed=seed, sites=n_clients)
    clients = partition(data, "iid", n_clients, seed=seed)
    test = SyntheticHistology(8, size=SIZE, seed=seed + 1)
    torch.manual_seed(seed)
    model = build_model("unet-tiny", num_classes=4)
    return model, clients, test


CFG = ClientConfig(local_steps=2, batch_size=4, lr=0.05)


def test_history_records_and_checkpoint(tmp_path):
    model, clients, test = _setup()
    res = run_federated(model, clients, test, 2, config=CFG, checkpoint_dir=tmp_path, progress=False)
    assert [r["round"] for r in res.history] == [0, 1]
    for rec in res.history:
        assert set(rec["val"]) == {"0", "1", "2"}
        assert 0.0 <= rec["test"]["dice"] <= 1.0
        assert rec["update_norm"] > 0
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["round"] == 1
    for k, v in res.global_state.items():
        assert torch.equal(ckpt["global_state"][k], v)
    # the returned model holds the final global state
    sd = res.model.state_dict()
    assert all(torch.equal(sd[k].float().cpu(), v) for k, v in res.global_state.items())


class _Crash(RuntimeError):
    pass


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    model, clients, test = _setup()
    full = run_federated(model, clients, test, 4, config=CFG, seed=3, progress=False)

    def crash_after_round_2(rec):
        if rec["round"] == 1:
            raise _Crash

    model, clients, test = _setup()
    with pytest.raises(_Crash):
        run_federated(
            model,
            clients,
            test,
            4,
            config=CFG,
            seed=3,
            checkpoint_dir=tmp_path,
            progress=False,
            on_round_end=crash_after_round_2,
        )
    assert load_checkpoint(tmp_path)["round"] == 1

    model, clients, test = _setup()
    resumed = run_federated(
        model, clients, test, 4, config=CFG, seed=3, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3]  # no round lost or applied twice
    for k in full.global_state:
        assert torch.equal(full.global_state[k], resumed.global_state[k]), k
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]


def test_resume_refuses_a_different_configuration(tmp_path):
    model, clients, test = _setup()
    run_federated(model, clients, test, 1, config=CFG, seed=0, checkpoint_dir=tmp_path, progress=False)
    model, clients, test = _setup()
    with pytest.raises(CheckpointMismatchError):
        run_federated(
            model, clients, test, 1, config=CFG, seed=1, checkpoint_dir=tmp_path, resume=True, progress=False
        )


class _Recorder(Defense):
    """Keeps each update it protects, plus a snapshot, to check the loop never mutates them afterwards."""

    def __init__(self):
        self.seen: list[tuple[Update, Update]] = []
        self.contexts: list[RoundContext] = []

    def protect(self, update, ctx):
        self.seen.append((update, {k: v.clone() for k, v in update.items()}))
        self.contexts.append(ctx)
        return {k: v.clone() for k, v in update.items()}

    def aggregate(self, payloads: Sequence[Update], ctx):
        return weighted_mean(list(payloads), ctx.weights)


def test_loop_never_mutates_an_update_after_protect_and_weights_follow_sizes():
    data = SyntheticHistology(24, size=SIZE, seed=0)
    clients = [
        torch.utils.data.Subset(data, range(0, 5)),
        torch.utils.data.Subset(data, range(5, 20)),
        torch.utils.data.Subset(data, range(20, 24)),
    ]
    model = build_model("unet-tiny")
    rec = _Recorder()
    run_federated(model, clients, None, 2, config=CFG, defense=rec, val_fraction=0.0, progress=False)
    assert len(rec.seen) == 6
    for update, snapshot in rec.seen:
        assert all(torch.equal(update[k], snapshot[k]) for k in update)
    ctx = rec.contexts[0]
    assert ctx.client_id == 0 and ctx.sampled == (0, 1, 2)
    assert ctx.weights == pytest.approx((5 / 24, 15 / 24, 4 / 24))


def test_server_aggregates_weighted_mean_and_rejects_nan():
    state = {"w": torch.zeros(3)}
    server = Server(state, NoDefense(), num_clients=2)
    ctx = server.context(0, (0, 1), (1, 3))
    server.aggregate([{"w": torch.tensor([4.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 4.0, 0.0])}], ctx)
    assert torch.allclose(server.global_state["w"], torch.tensor([1.0, 3.0, 0.0]))
    with pytest.raises(InvalidUpdateError, match="w"):
        server.aggregate([{"w": torch.tensor([float("nan"), 0, 0])}, {"w": torch.zeros(3)}], ctx)
    assert torch.allclose(server.global_state["w"], torch.tensor([1.0, 3.0, 0.0]))  # nothing applied


def test_client_sampling_is_deterministic_and_sized():
    server = Server({"w": torch.zeros(1)}, NoDefense(), num_clients=10, fraction=0.3, seed=5)
    a = [server.sample(r) for r in range(5)]
    assert a == [server.sample(r) for r in range(5)]
    assert all(len(s) == 3 and len(set(s)) == 3 for s in a)
    assert len(set(a)) > 1
    with pytest.raises(ValueError):
        Server({"w": torch.zeros(1)}, NoDefense(), num_clients=3, fraction=0.0)


def test_bad_arguments_raise():
    model, clients, test = _setup()
    with pytest.raises(ValueError, match="rounds"):
        run_federated(model, clients, test, 0, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        run_federated(model, clients, test, 1, resume=True, progress=False)
    with pytest.raises(ValueError, match="lr"):
        ClientConfig(lr=0)


def test_fedavg_learns_on_synthetic_data():
    """Mean test Dice over classes 1..3 rises clearly across rounds (3 clients, IID)."""
    data = SyntheticHistology(60, size=SIZE, seed=0, sites=3)
    clients = partition(data, "iid", 3, seed=0)
    test = SyntheticHistology(16, size=SIZE, seed=1, sites=3)
    torch.manual_seed(0)
    res = run_federated(
        build_model("unet"),
        clients,
        test,
        6,
        config=ClientConfig(batch_size=8, lr=0.05),
        val_fraction=0.0,
        progress=False,
    )
    dice = res.curve("test", "dice")
    assert max(dice[-2:]) > dice[0] + 0.15, dice


class _NegativeVariance(Defense):
    """Pushes every running variance far below zero, as large DP noise on the aggregate can."""

    def protect(self, update: Update, ctx: RoundContext) -> Update:
        return update

    def aggregate(self, payloads: Sequence, ctx: RoundContext) -> Update:
        mean = weighted_mean(list(payloads), ctx.weights)
        return {k: (v - 100.0 if k.endswith("running_var") else v) for k, v in mean.items()}


def test_noised_running_variances_are_clamped_so_evaluation_stays_finite():
    model, clients, test = _setup(2, 4)
    result = run_federated(
        model, clients, test, 1, config=CFG, defense=_NegativeVariance(), progress=False, accelerator="cpu"
    )
    variances = [v for k, v in result.global_state.items() if k.endswith("running_var")]
    assert variances and all(bool((v >= 0).all()) for v in variances)
    assert min(float(v.min()) for v in variances) == 0.0  # clamped, not left at -100 + something
    assert all(0.0 <= result.history[-1]["test"][m] <= 1.0 for m in ("dice", "jaccard", "accuracy"))


# --- DP-SGD in the loop ------------------------------------------------------------------------------


def test_dp_sgd_run_reports_each_clients_accountant_checkpoints_it_and_resumes(tmp_path):
    import json
    import math

    from privfl.defenses.dpsgd import DPSGD, dpsgd_event
    from privfl.defenses.rng import SeededNoise

    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, noise=SeededNoise(0))
    cfg = ClientConfig(local_steps=2, batch_size=4)

    def run(**kwargs):
        data = SyntheticHistology(16, size=SIZE, seed=0, sites=2)
        torch.manual_seed(0)
        model, clients = build_model("unet-tiny", num_classes=4), partition(data, "iid", 2, seed=0)
        return run_federated(
            model, clients, None, 2, config=cfg, dp_sgd=dp, progress=False, val_fraction=0.0, **kwargs
        )

    full = run(checkpoint_dir=tmp_path / "full")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in full.model.modules())  # converted for opacus
    sp = full.history[-1]["sample_privacy"]
    q = 1 / math.ceil(8 / 4)  # Poisson rate: 1 / number of batches
    reference = dp.make_accountant()
    reference.record(dpsgd_event(1.0, q, 4))  # two rounds of two steps
    expected = reference.epsilon()
    assert sp["epsilon"] == expected.epsilon and sp["accountant"] == expected.accountant
    assert sp["per_client"] == {"0": expected.epsilon, "1": expected.epsilon}
    assert sp["delta"] > 1e-5  # the floating-point δ floor of two rounds is added to δ
    assert full.history[0]["sample_privacy"]["epsilon"] < sp["epsilon"]
    ckpt = load_checkpoint(tmp_path / "full")
    states = ckpt["dp_sgd"]
    assert set(states) == {"0", "1"} and json.loads(json.dumps(states)) == states
    assert dp.make_accountant(states["0"]).events == reference.events
    assert json.loads((tmp_path / "full" / "history.json").read_text())[-1]["sample_privacy"] == sp

    def crash(rec):
        raise _Crash

    with pytest.raises(_Crash):
        run(checkpoint_dir=tmp_path / "resumed", on_round_end=crash)
    resumed = run(checkpoint_dir=tmp_path / "resumed", resume=True)
    assert resumed.history[-1]["sample_privacy"] == sp
    for k in full.global_state:
        assert torch.equal(full.global_state[k], resumed.global_state[k]), k
