"""``python -m privfl.bench dpcvae`` on a tiny preset: every method and column, the ε it reports is
the accountant's, the outputs are written."""

from __future__ import annotations

import csv
import json

import pytest

from privfl.defenses.accounting import PrivacyAccountant
from privfl.defenses.rng import SeededNoise
from privfl.experiments.dpcvae import PRESETS, run_dpcvae_experiment

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure", "ignore:.*Secure RNG")

METHODS = ["Local", "FedAvg", "FedProx", "FedLambda", "DP-CVAE", "DP-CGAN"]


@pytest.fixture(scope="module")
def record():
    return run_dpcvae_experiment(PRESETS["tiny"], noise=SeededNoise(0))


def test_every_method_reports_utility_and_the_generators_privacy(record):
    rows = {r["method"]: r for r in record["methods"]}
    assert list(rows) == METHODS
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["balanced_accuracy"] <= 1
        assert len(r["per_client_accuracy"]) == PRESETS["tiny"].clients and r["params"]["total"] > 0
    for name in ("DP-CVAE", "DP-CGAN"):
        r = rows[name]
        assert r["fidelity_sliced_w1"] > 0 and 0 <= r["lambda"] <= 1
        assert 0 <= r["mia"]["auc"] <= 1 and r["mia"]["n_members"] == sum(record["data"]["sizes"]["train"])
        assert r["mia_loss"]["n_members"] == r["mia"]["n_members"] and 0 <= r["mia_loss"]["auc"] <= 1
    assert rows["FedAvg"]["mia"]["attack"].startswith("LOSS")
    assert rows["DP-CGAN"]["params"]["total"] > rows["DP-CVAE"]["params"]["total"]


def test_reported_epsilon_is_the_accountants(record):
    preset = PRESETS["tiny"]
    for r in record["methods"]:
        if r["method"] not in ("DP-CVAE", "DP-CGAN"):
            assert r.get("epsilon") is None  # no DP, no ε
            continue
        accountants = []
        for state in r["accountant_states"]:
            acct = PrivacyAccountant(delta=preset.delta, accountants=r["accountants"])
            acct.load_state_dict(state)
            accountants.append(acct)
        recomputed = [a.epsilon().epsilon for a in accountants]
        assert r["per_client_epsilon"] == pytest.approx(recomputed, rel=1e-12)
        assert r["epsilon"] == max(recomputed) <= preset.epsilon * (1 + 1e-6)
        assert r["delta"] == max(a.epsilon().delta for a in accountants) >= preset.delta
        assert accountants[0].steps > 0


def test_cli_writes_json_csv_plot_and_report(tmp_path, capsys):
    from privfl.bench.__main__ import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "dpcvae",
                "--preset",
                "tiny",
                "--seeded-noise",
                "--no-progress",
                "--methods",
                "Local",
                "FedAvg",
                "DP-CVAE",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["method"] for r in printed["methods"]] == ["Local", "FedAvg", "DP-CVAE"]
    assert (out / "dpcvae.png").stat().st_size > 0 and "| DP-CVAE |" in (out / "report.md").read_text()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["Local", "FedAvg", "DP-CVAE"] and rows[2]["epsilon"]
    with pytest.raises(SystemExit):
        main(["dpcvae", "--preset", "nope"])


def test_unknown_method_is_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown methods"):
        run_dpcvae_experiment(PRESETS["tiny"], methods=["FedSGD"])
