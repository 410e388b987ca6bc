"""``python -m privfl.bench feddp``: FedDP's claim next to what the accountant proves."""

from __future__ import annotations

import json
import math

import pytest

from privfl.bench.__main__ import main
from privfl.defenses.calibration import gaussian_epsilon

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure")


def run_json(capsys, *args: str) -> dict:
    assert main(["feddp", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_setting_is_accounted_and_far_from_the_claim(capsys):
    acc = run_json(capsys)["accounting"]
    assert (acc["sigma"], acc["clip"], acc["clients"], acc["rounds"]) == (0.5, 0.05, 5, 150)
    assert acc["paper_epsilon"] == pytest.approx(0.1)
    assert acc["noise_multiplier"] == pytest.approx(10.0)
    exact = gaussian_epsilon(10 / math.sqrt(150), 1e-5)
    assert acc["exact_epsilon"] == pytest.approx(exact)
    # every accountant is a valid upper bound on the exact loss, and the tightest is reported
    for eps in acc["by_accountant"].values():
        assert eps >= exact * (1 - 1e-9)
    assert acc["epsilon"] == min(acc["by_accountant"].values())
    assert acc["epsilon"] == pytest.approx(exact, rel=1e-3)
    assert acc["epsilon"] > 50 * acc["paper_epsilon"]
    # the noise a real epsilon = 0.1 would need
    assert gaussian_epsilon(acc["noise_multiplier_for_paper_epsilon"] / math.sqrt(150), 1e-5) <= 0.1 * (1 + 1e-6)


def test_train_mode_reports_utility_and_privacy(capsys, tmp_path):
    out = run_json(capsys, "--train", "--train-rounds", "1", "--samples-per-client", "4", "--clients", "2",
                   "--out", str(tmp_path / "r.json"))
    train = out["training"]
    assert set(train) == {"no defense", "FedDPNoise"}
    assert train["no defense"]["privacy"] is None
    assert train["FedDPNoise"]["privacy"]["epsilon"] == pytest.approx(gaussian_epsilon(10.0, 1e-5), rel=1e-3)
    assert "NOT secure" in train["FedDPNoise"]["noise"]  # a seeded source is named as such
    assert (tmp_path / "r.json").exists()
