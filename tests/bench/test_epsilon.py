"""`python -m privfl.bench epsilon`: the privacy calculator, in-process, tables and --json."""

from __future__ import annotations

import pytest

from privfl.bench.__main__ import main
from privfl.defenses.accounting import calibrate, compute_epsilons
from privfl.defenses.calibration import (
    analytic_gaussian_sigma,
    balle_wang_delta,
    classical_gaussian_sigma,
    laplace_scale,
)

ORACLE = [
    "epsilon",
    "--noise-multiplier",
    "1.5",
    "--sample-rate",
    "0.04",
    "--steps",
    "2250",
    "--delta",
    "1e-5",
]


def test_accounting_table_marks_the_tightest(capsys):
    assert main(ORACLE) == 0
    out = capsys.readouterr().out
    eps = compute_epsilons(1.5, 0.04, 2250, 1e-5)
    tightest = min(eps, key=eps.get)
    for name, value in eps.items():
        assert name in out and f"{value:.6g}" in out
    assert "7.32911" in out
    line = next(line for line in out.splitlines() if "tightest" in line)
    assert tightest in line


def test_accounting_json_equals_the_library(bench_json):
    data = bench_json(*ORACLE)
    eps = compute_epsilons(1.5, 0.04, 2250, 1e-5)
    assert data["mode"] == "accounting"
    assert data["by_accountant"] == eps
    assert data["epsilon"] == min(eps.values()) and data["accountant"] == min(eps, key=eps.get)
    assert (data["noise_multiplier"], data["sample_rate"], data["steps"], data["delta"]) == (
        1.5,
        0.04,
        2250,
        1e-5,
    )
    assert data["by_accountant"]["rdp"] == pytest.approx(7.32911, abs=5e-6)


def test_accounting_json_reports_skipped_accountants(bench_json):
    data = bench_json(*["epsilon", "-z", "0.05", "-q", "0.1", "-T", "10", "--accountants", "rdp,prv"])
    assert set(data["by_accountant"]) == {"rdp"} and "prv" in data["skipped"]
    assert data["epsilon"] == compute_epsilons(0.05, 0.1, 10, 1e-5, ("rdp",))["rdp"]


def test_calibration_mode(bench_json, capsys):
    argv = [
        "epsilon",
        "--target-epsilon",
        "3",
        "--sample-rate",
        "0.01",
        "--steps",
        "1000",
        "--accountants",
        "rdp",
    ]
    assert main(argv) == 0
    z = calibrate(3.0, 1e-5, 1000, 0.01, accountant="rdp")
    assert f"{z:.6g}" in capsys.readouterr().out
    data = bench_json(*argv)
    assert data["mode"] == "calibrate" and data["calibrated_with"] == "rdp"
    assert data["noise_multiplier"] == z
    assert data["by_accountant"] == compute_epsilons(z, 0.01, 1000, 1e-5, ("rdp",))
    assert 0.99 * 3 <= data["by_accountant"]["rdp"] <= 3


def test_gaussian_mechanism_modes(bench_json, capsys):
    data = bench_json(*["epsilon", "--mechanism", "gaussian", "--epsilon", "1", "--delta", "1e-5"])
    assert data["sigma"] == analytic_gaussian_sigma(1.0, 1e-5) == pytest.approx(3.730632, rel=1e-6)
    assert data["calibration"] == "analytic" and data["sensitivity"] == 1.0
    assert data["exact_delta"] == balle_wang_delta(data["sigma"], 1.0)
    data = bench_json(
        *[
            "epsilon",
            "--mechanism",
            "gaussian",
            "--epsilon",
            "0.5",
            "--sensitivity",
            "2",
            "--calibration",
            "classical",
        ]
    )
    assert data["sigma"] == classical_gaussian_sigma(0.5, 1e-5, 2.0)
    assert data["noise_multiplier"] == pytest.approx(data["sigma"] / 2)
    assert main(["epsilon", "--mechanism", "gaussian", "--epsilon", "1"]) == 0
    assert "3.730632" in capsys.readouterr().out


def test_laplace_mechanism_mode(bench_json):
    data = bench_json(*["epsilon", "--mechanism", "laplace", "--epsilon", "0.5", "--sensitivity", "3"])
    assert data == {
        "mode": "mechanism",
        "mechanism": "laplace",
        "epsilon": 0.5,
        "sensitivity": 3.0,
        "scale": laplace_scale(0.5, 3.0),
        "noise_multiplier": 2.0,
    }
    assert data["scale"] == 6.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["epsilon", "-z", "1", "--target-epsilon", "2", "-T", "10"], "exactly one of"),
        (["epsilon", "-q", "0.1", "-T", "10"], "exactly one of"),
        (["epsilon", "-z", "1", "-q", "0.1"], "needs --steps"),
        (["epsilon", "-z", "1", "-T", "10", "--accountant", "prv"], "needs --target-epsilon"),
        (["epsilon", "-z", "1", "-T", "10", "--epsilon", "1"], "need --mechanism"),
        (["epsilon", "--mechanism", "gaussian"], "needs --epsilon"),
        (["epsilon", "--mechanism", "gaussian", "--epsilon", "1", "-T", "5"], "--steps"),
        (["epsilon", "--mechanism", "laplace", "--epsilon", "1", "--delta", "1e-5"], "pure epsilon-DP"),
        (
            ["epsilon", "--mechanism", "gaussian", "--epsilon", "1", "--calibration", "classical"],
            "epsilon < 1",
        ),
        (["epsilon", "--mechanism", "gaussian", "--epsilon", "-1"], "epsilon must be a finite number > 0"),
        (
            ["epsilon", "--mechanism", "gaussian", "--epsilon", "1", "--delta", "2"],
            "delta must be in the open",
        ),
        (["epsilon", "-z", "-1", "-T", "10"], "noise_multiplier must be >= 0"),
        (["epsilon", "-z", "1", "-T", "10", "-q", "1.5"], "sample_rate"),
        (["epsilon", "-z", "1", "-T", "10", "--delta", "0"], "delta"),
        (["epsilon", "-z", "1", "-T", "10", "--accountants", "rdp,moments"], "comma-separated subset"),
        (["epsilon", "--target-epsilon", "0", "-T", "10"], "target_epsilon"),
    ],
)
def test_bad_combinations_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_calibration_defaults_to_the_tightest_reported_accountant(bench_json):
    """Calibrating with RDP and reporting PLD, target ε = 1 (q = 0.01, 1000 steps) came out at z = 1.513
    with reported ε = 0.906."""
    data = bench_json(*["epsilon", "--target-epsilon", "1", "--sample-rate", "0.01", "--steps", "1000"])
    assert data["calibrated_with"] == "tightest"
    assert 0.99 <= data["epsilon"] <= 1.0
    assert data["noise_multiplier"] < 1.45
    rdp = bench_json(
        *[
            "epsilon",
            "--target-epsilon",
            "1",
            "--sample-rate",
            "0.01",
            "--steps",
            "1000",
            "--accountant",
            "rdp",
        ]
    )
    assert rdp["calibrated_with"] == "rdp" and rdp["noise_multiplier"] > 1.5 and rdp["epsilon"] < 0.95
