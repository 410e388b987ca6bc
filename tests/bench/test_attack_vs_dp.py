"""``python -m privfl.bench attack-vs-dp``: settings, planning, errors before training, the JSON schema,
an end-to-end two-setting sweep, and ``--resume``."""

from __future__ import annotations

import copy
import csv
import json

import jsonschema
import pytest
import torch

from privfl.bench.__main__ import main
from privfl.bench.attack_vs_dp.presets import resolve
from privfl.bench.attack_vs_dp.schema import validate_results
from privfl.experiments.attack_vs_dp.experiment import OutOfBudgetError, make_plan
from privfl.experiments.attack_vs_dp.probes import payload_bytes
from privfl.experiments.attack_vs_dp.settings import (
    DEFAULT_SETTINGS,
    SweepSpec,
    encoder_patterns,
    get_setting,
    parse_settings,
    planned_epsilon,
)
from privfl.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure")

TINY = [
    "--model",
    "unet-tiny",
    "--clients",
    "2",
    "--samples-per-client",
    "2",
    "--rounds",
    "1",
    "--inversion-iterations",
    "3",
    "--inversion-batch",
    "2",
    "--seeded-noise",
    "--device",
    "cpu",
    "--no-progress",
]


# ---------------------------------------------------------------------------------------------
# settings and planning
# ---------------------------------------------------------------------------------------------


def test_default_sweep_is_the_documented_list_and_builds():
    """The default sweep of docs/attack_vs_dp.md."""
    settings = parse_settings(None)
    assert [s.name for s in settings] == list(DEFAULT_SETTINGS)
    spec = SweepSpec(rounds=3, num_clients=5)
    model = build_model("unet-tiny")
    for s in settings:
        defense = s.build(spec, model)
        eps = planned_epsilon(defense, spec)
        assert (eps is None) == (s.name in ("none", "partial-encoders", "ckks")), s.name
        if s.target_epsilon is not None:  # calibrated to the target: at most it, and not far below
            assert 0.8 * s.target_epsilon <= eps <= s.target_epsilon * (1 + 1e-6), (s.name, eps)


def test_feddp_planned_epsilon_matches_the_paper_setting():
    """FedDP's σ = 0.5, C = 0.05 over its 150 rounds: the accountant's ε = 403.5 (RESULTS.md), not
    C/σ = 0.1."""
    spec = SweepSpec(rounds=150, num_clients=5)
    eps = planned_epsilon(get_setting("feddp").build(spec, build_model("unet-tiny")), spec)
    assert eps == pytest.approx(403.5, abs=0.1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("none,bogus", "unknown setting 'bogus'; valid: none, feddp"),
        ("gauss-central-eps0", "positive"),
        ("laplace-epsx", "unknown setting"),
        ("none,none", "twice: none"),
        (" , ", "empty"),
    ],
)
def test_bad_settings_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_settings(text)


def test_parametric_settings_and_encoder_patterns():
    assert get_setting("gauss-distributed-eps2.5").target_epsilon == 2.5
    assert get_setting("laplace-eps1e-1").target_epsilon == pytest.approx(0.1)
    assert encoder_patterns(build_model("unet-tiny")) == ["down.*"]
    assert encoder_patterns(build_model("dhunet-tiny")) == ["global_branch.*", "local_branch.*"]
    with pytest.raises(ValueError, match="no known encoder"):
        encoder_patterns(torch.nn.Linear(2, 2))


def test_budget_is_checked_before_training():
    preset = resolve("cpu-quick", {"model": "unet-tiny", "rounds": 2})
    with pytest.raises(OutOfBudgetError, match=r"gauss-central-eps8 \(ε = .*\); drop them"):
        make_plan(
            preset,
            parse_settings("none,gauss-central-eps8,gauss-central-eps1"),
            delta=1e-5,
            seed=0,
            seeded_noise=True,
            max_epsilon=1.0,
        )
    plan = make_plan(
        preset,
        parse_settings("none,gauss-central-eps1"),
        delta=1e-5,
        seed=0,
        seeded_noise=True,
        max_epsilon=1.0,
    )
    assert plan.planned_epsilons["none"] is None and plan.planned_epsilons["gauss-central-eps1"] <= 1.0


def test_preset_overrides_are_validated():
    assert resolve("paper", {"rounds": 2, "model": None}).rounds == 2
    assert resolve("paper", {}).model == "dhunet"
    for overrides, message in [
        ({"rounds": 0}, "--rounds must be >= 1"),
        ({"clip": -1.0}, "--clip must be > 0"),
        ({"inversion_batch": 9, "samples_per_client": 8}, "exceeds"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve("cpu-quick", overrides)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("gpu-fast", {})


def test_payload_bytes():
    assert payload_bytes(b"abc") == 3 and payload_bytes(None) == 0
    assert payload_bytes({"a": torch.zeros(10), "b": torch.zeros(2, 3, dtype=torch.float64)}) == 40 + 48
    with pytest.raises(TypeError, match="cannot size"):
        payload_bytes(3.0)


# ---------------------------------------------------------------------------------------------
# command line: errors before training, end to end, resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--settings", "none,nope"], "unknown setting 'nope'"),
        (["--data", "/no/such/folder"], "not a directory"),
        (["--settings", "gauss-central-eps8", "--max-epsilon", "1"], "over the budget --max-epsilon 1"),
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--delta", "0"], "--delta must be in"),
    ],
)
def test_invalid_runs_fail_before_training(tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        main(["attack-vs-dp", *TINY, "--out", str(out), *extra])
    assert not out.exists()  # nothing trained, nothing written


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-setting, one-round sweep end to end (about 15 s)."""
    out = tmp_path_factory.mktemp("avd")
    code = main(["attack-vs-dp", *TINY, "--settings", "none,feddp", "--out", str(out)])
    return code, out, json.loads((out / "results.json").read_text())


def test_end_to_end_outputs_follow_the_schema(sweep):
    code, out, results = sweep
    assert code == 0
    validate_results(results)
    for name in (
        "results.json",
        "results.csv",
        "frontier.png",
        "reconstructions.png",
        "roc.png",
        "report.md",
    ):
        assert (out / name).stat().st_size > 0, name
    none, feddp = results["settings"]
    assert (none["name"], feddp["name"]) == ("none", "feddp")
    assert none["privacy"]["epsilon"] is None
    # FedDP: the accountant's ε for one round exceeds the paper's claimed C/σ = 0.1
    assert feddp["privacy"]["claimed_epsilon"] == pytest.approx(0.1)
    assert feddp["privacy"]["epsilon"] == pytest.approx(feddp["privacy"]["planned_epsilon"], rel=1e-6)
    assert feddp["privacy"]["epsilon"] > feddp["privacy"]["claimed_epsilon"]
    assert [inv["batch"] for inv in none["inversion"]] == [1, 2]
    assert none["inversion"][0]["attacked"] == "client 0's payload"
    # the client sends every floating entry in float32 and downloads the same
    assert none["wire"]["upload_bytes_per_client"] == none["wire"]["download_bytes_per_client"]
    assert none["wire"]["bytes_per_round"] == 2 * 2 * none["wire"]["upload_bytes_per_client"]
    assert none["membership"]["n_members"] == 4 and 0 <= none["membership"]["auc"] <= 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["none", "feddp"] and rows[0]["epsilon"] == ""
    report = (out / "report.md").read_text()
    assert "Without a defense, client 0's batch-1 update is inverted to" in report
    assert "FedDP claims ε = C/σ = 0.1; the accountant proves" in report
    assert "![reconstructions](reconstructions.png)" in report


def test_schema_rejects_broken_results(sweep):
    _, _, results = sweep
    for mutate in (
        lambda r: r.pop("settings"),
        lambda r: r["settings"][0]["utility"].update(dice=1.5),
        lambda r: r["settings"][0]["privacy"].update(epsilon="small"),
        lambda r: r["settings"][0]["inversion"][0].pop("psnr_db"),
        lambda r: r.update(schema_version=99),
    ):
        broken = copy.deepcopy(results)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_results(broken)


def test_resume_reuses_finished_settings(sweep, capsys):
    _, out, results = sweep
    capsys.readouterr()
    assert (
        main(["attack-vs-dp", *TINY, "--settings", "none,feddp", "--out", str(out), "--resume", "--json"])
        == 0
    )
    captured = capsys.readouterr()
    assert captured.err.count("done in an earlier run, reused") == 2
    again = json.loads(captured.out)
    assert [s["seconds"] for s in again["settings"]] == [s["seconds"] for s in results["settings"]]
    # a different configuration is not reused
    assert (
        main(
            [
                "attack-vs-dp",
                *TINY,
                "--settings",
                "none",
                "--out",
                str(out),
                "--resume",
                "--json",
                "--inversion-iterations",
                "4",
            ]
        )
        == 0
    )
    assert "reused" not in capsys.readouterr().err


def test_resume_needs_out():
    with pytest.raises(SystemExit, match="--resume needs --out"):
        main(["attack-vs-dp", *TINY, "--resume"])


def test_partial_sharing_and_ckks_sweep(tmp_path, capsys):
    assert (
        main(["attack-vs-dp", *TINY, "--settings", "partial-encoders,ckks", "--out", str(tmp_path), "--json"])
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    validate_results(results)
    partial, ckks = results["settings"]
    # decoders stay local: utility is each client's personalized model, and only the encoders travel
    assert partial["utility"]["model"] == "personalized (mean over clients)"
    assert partial["inversion"][0]["attacked"] == "client 0's payload"
    assert partial["wire"]["upload_bytes_per_client"] < partial["wire"]["download_bytes_per_client"]
    # CKKS hides each update: the server is left with the aggregate, and ciphertexts are larger than floats
    assert ckks["utility"]["model"] == "global"
    assert ckks["inversion"][0]["attacked"] == "aggregate of all clients"
    assert ckks["wire"]["upload_bytes_per_client"] > 4 * ckks["wire"]["download_bytes_per_client"]
