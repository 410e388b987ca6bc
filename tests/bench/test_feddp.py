"""``python -m privfl.bench feddp``: FedDP's claim next to what the accountant proves."""

from __future__ import annotations

import math

import pytest

from privfl.defenses.accounting import PrivacyAccountant
from privfl.defenses.calibration import gaussian_epsilon

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure")


def test_paper_setting_is_accounted_and_far_from_the_claim(bench_json):
    acc = bench_json("feddp")["accounting"]
    assert (acc["sigma"], acc["clip"], acc["clients"], acc["rounds"]) == (0.5, 0.05, 5, 150)
    assert acc["placement"] == "local"
    assert acc["paper_epsilon"] == pytest.approx(0.1)
    assert acc["noise_multiplier"] == 0.5  # Eq. 11: N(0, σ²C²I), so z = σ
    assert acc["noise_std"] == pytest.approx(0.025)
    exact = gaussian_epsilon(0.5 / math.sqrt(150), 1e-5)
    assert acc["exact_epsilon"] == pytest.approx(exact)
    # every accountant is a valid upper bound on the exact loss, and the tightest is reported
    for eps in acc["by_accountant"].values():
        assert eps >= exact * (1 - 1e-9)
    assert acc["epsilon"] == min(acc["by_accountant"].values())
    assert acc["epsilon"] == pytest.approx(403.5, rel=2e-3)
    assert acc["epsilon_one_round"] == pytest.approx(10.0, abs=0.05)
    # the floating-point floor of 150 DHU-Net-sized releases is in the reported δ
    assert acc["params"] == 55_414_330
    assert acc["delta_floor"] == pytest.approx(150 * math.ceil(55_414_330 / 2) * 2.0**-64, rel=1e-9)
    assert acc["delta_total"] == pytest.approx(1e-5 + acc["delta_floor"])
    # the noise a real epsilon = 0.1 would need, calibrated to the tightest (reported) accountant
    z = acc["noise_multiplier_for_paper_epsilon"]
    assert acc["calibrated_with"] == "tightest"
    proven = PrivacyAccountant()
    proven.record_gaussian(z, steps=150)
    assert 0.099 <= proven.epsilon().epsilon <= 0.1
    assert z == pytest.approx(376.6, rel=1e-3)


def test_central_placement_is_the_same_z(bench_json):
    acc = bench_json("feddp", "--placement", "central", "--rounds", "1")["accounting"]
    assert acc["placement"] == "central" and acc["noise_multiplier"] == 0.5
    assert acc["epsilon"] == pytest.approx(10.0, abs=0.05)


def test_train_mode_reports_utility_and_privacy(bench_json, tmp_path):
    out = bench_json(
        "feddp",
        "--train",
        "--train-rounds",
        "1",
        "--samples-per-client",
        "4",
        "--clients",
        "2",
        "--out",
        str(tmp_path / "r.json"),
    )
    train = out["training"]
    assert set(train) == {"no defense", "FedDPNoise"}
    assert train["no defense"]["privacy"] is None
    assert train["FedDPNoise"]["privacy"]["epsilon"] == pytest.approx(gaussian_epsilon(0.5, 1e-5), rel=1e-3)
    assert "NOT secure" in train["FedDPNoise"]["noise"]  # a seeded source is named as such
    assert (tmp_path / "r.json").exists()
