"""``python -m privfl.bench fedavg-vs-feddp`` and ``noise-ablation`` (FedDP's Tables I and II with the
accounted ε): end-to-end tiny runs through the dispatcher, and argument errors before any training."""

from __future__ import annotations

import argparse
import csv
import json
import math

import pytest

from privfl.bench import paper_tables as pt
from privfl.bench.__main__ import main
from privfl.defenses.calibration import gaussian_epsilon
from privfl.experiments.sweep import load_federation
from privfl.models import list_models

TINY = [
    "--clients",
    "2",
    "--samples-per-client",
    "2",
    "--size",
    "32",
    "--rounds",
    "1",
    "--device",
    "cpu",
    "--no-progress",
    "--json",
]


def _run(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started before the arguments were validated")

    monkeypatch.setattr(pt, "train", boom)


def test_presets_and_overrides():
    quick = pt.PRESETS["cpu-quick"]
    assert (
        quick.models,
        quick.model,
        quick.clients,
        quick.samples_per_client,
        quick.size,
        quick.rounds,
        quick.config.local_epochs,
        quick.config.batch_size,
        quick.config.lr,
    ) == (("dhunet-tiny", "unet"), "dhunet-tiny", 5, 16, 32, 10, 1, 4, 0.1)
    paper = pt.PRESETS["paper"]
    assert (
        paper.models,
        paper.clients,
        paper.size,
        paper.rounds,
        paper.config.batch_size,
        paper.config.lr,
        paper.config.momentum,
    ) == (("dhunet", "unet"), 5, 224, 150, 24, 0.01, 0.9)
    p = argparse.ArgumentParser()
    pt.add_common_arguments(p)
    got = pt.resolve_preset(
        p.parse_args(["--preset", "paper", "--rounds", "7", "--lr", "0.2", "--device", "cpu"])
    )
    assert (got.rounds, got.config.lr, got.device, got.size) == (7, 0.2, "cpu", 224)


def test_centralized_pools_every_client_into_one():
    fed = load_federation("synthetic", num_clients=3, samples_per_client=2, image_size=32)
    pooled = pt.centralized(fed)
    assert pooled.num_clients == 1 and len(pooled.clients[0]) == 6 and pooled.test is fed.test


def test_fedavg_vs_feddp_end_to_end(tmp_path, capsys):
    res = _run(capsys, ["fedavg-vs-feddp", "--models", "unet-tiny", *TINY, "--out", str(tmp_path)])
    rows = res["rows"]
    assert [(r["model"], r["setting"]) for r in rows] == [
        ("unet-tiny", s) for s in ("centralized", "FL", "FedDP")
    ]
    by = {r["setting"]: r for r in rows}
    for r in rows:
        assert 0 <= r["dice"] <= 1 and 0 <= r["jaccard"] <= r["dice"] + 1e-9 and 0 <= r["accuracy"] <= 1
        assert r["train_seconds"] > 0
    assert by["centralized"]["epsilon"] is None and by["FL"]["epsilon"] is None
    assert by["centralized"]["paper_epsilon"] is None and by["FL"]["paper_epsilon"] is None
    feddp = by["FedDP"]
    assert feddp["paper_epsilon"] == pytest.approx(0.05 / 0.5)  # FedDP's Eq. 14, C/σ
    # one round, every client sampled: one Gaussian release with z = σ = 0.5 (Eq. 11: N(0, σ²C²);
    # ε ≈ 10.0, not 0.1)
    assert isinstance(feddp["epsilon"], float) and feddp["epsilon"] > 0
    assert 1e-5 < feddp["delta"] < 1e-5 * (1 + 1e-6)  # δ + the noise's floating-point floor
    assert feddp["epsilon"] == pytest.approx(gaussian_epsilon(0.5, 1e-5), rel=0.02)
    assert feddp["epsilon"] > feddp["paper_epsilon"]
    assert res["config"]["seed"] == 0 and res["config"]["rounds"] == 1
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    with (tmp_path / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["setting"] for r in table] == ["centralized", "FL", "FedDP"]
    assert table[0]["epsilon"] == "" and float(table[2]["epsilon"]) == pytest.approx(feddp["epsilon"])


def test_noise_ablation_end_to_end(tmp_path, capsys):
    res = _run(
        capsys,
        [
            "noise-ablation",
            "--model",
            "unet-tiny",
            "--clips",
            "0.05,0.35",
            "--sigmas",
            "0.3,0.5",
            *TINY,
            "--out",
            str(tmp_path),
        ],
    )
    rows = res["rows"]
    assert [(r["clip"], r["sigma"]) for r in rows] == [
        (None, None),
        (0.05, 0.3),
        (0.05, 0.5),
        (0.35, 0.3),
        (0.35, 0.5),
    ]
    ref, cells = rows[0], {(r["clip"], r["sigma"]): r for r in rows[1:]}
    assert ref["epsilon"] is None and ref["paper_epsilon"] is None
    for (clip, sigma), r in cells.items():
        assert isinstance(r["epsilon"], float) and r["epsilon"] > 0
        assert r["paper_epsilon"] == pytest.approx(clip / sigma)
        assert r["epsilon"] == pytest.approx(gaussian_epsilon(sigma, 1e-5), rel=0.02)  # z = σ, whatever C
        assert r["epsilon"] > r["paper_epsilon"], (clip, sigma)  # C/σ understates what is proven
        assert 0 <= r["dice"] <= 1 and math.isfinite(r["train_seconds"])
    for clip in (0.05, 0.35):  # more noise, less ε
        assert cells[(clip, 0.5)]["epsilon"] < cells[(clip, 0.3)]["epsilon"]
    # N(0, σ²C²): the noise multiplier is σ whatever C, so at fixed σ every clip proves the same ε
    assert cells[(0.35, 0.5)]["epsilon"] == pytest.approx(cells[(0.05, 0.5)]["epsilon"], rel=1e-9)
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    with (tmp_path / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 5
    png = tmp_path / "ablation.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fedavg-vs-feddp", "--models", "unet-tiny,no-such-net"], "unknown model 'no-such-net'"),
        (["noise-ablation", "--model", "no-such-net"], "unknown model 'no-such-net'"),
        (["noise-ablation", "--model", "unet-tiny", "--clips", "0"], "--clips"),
        (["noise-ablation", "--model", "unet-tiny", "--clips", ""], "--clips"),
        (["noise-ablation", "--model", "unet-tiny", "--sigmas=-0.5"], "--sigmas"),
        (["noise-ablation", "--model", "unet-tiny", "--sigmas", "0.5,x"], "--sigmas"),
        (["fedavg-vs-feddp", "--models", "unet-tiny", "--rounds", "0"], "--rounds"),
    ],
)
def test_bad_arguments_refused_before_training(monkeypatch, tmp_path, argv, message):
    _no_training(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--clients", "2", "--samples-per-client", "2", "--out", str(tmp_path / "out"), "--json"])
    text = str(exc.value.code)
    assert message in text
    if "unknown model" in message:
        assert all(name in text for name in list_models())
    assert not (tmp_path / "out").exists()
