"""``python -m privfl.bench dsl`` on the tiny preset: every method, fidelity, membership and the
gradient-reconstruction attacks are reported; the outputs are written."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest

from privfl.defenses.rng import SeededNoise
from privfl.experiments.dsl import METHODS, PRESETS, run_dsl_experiment

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure", "ignore:.*Secure RNG")


@pytest.fixture(scope="module")
def record():
    return run_dsl_experiment(PRESETS["tiny"], noise=SeededNoise(0))


def test_every_method_reports_dice_fidelity_and_membership(record):
    rows = {r["method"]: r for r in record["methods"]}
    assert list(rows) == list(METHODS)
    preset = PRESETS["tiny"]
    n_members, n_non = preset.sites * preset.train_per_site, preset.sites * preset.test_per_site
    for name, r in rows.items():
        assert (
            0 <= r["dice"] <= 1
            and r["dice_std"] >= 0
            and len(r["dice_per_seed"]) == PRESETS["tiny"].seg_seeds
        )
        loss = r["mia"]["loss"]
        assert 0 <= loss["auc"] <= 1 and (loss["n_members"], loss["n_nonmembers"]) == (n_members, n_non)
        if name in ("Real (centralized)", "FedAvg"):
            assert "fidelity" not in r and "dcr" not in r["mia"]
            continue
        assert r["fidelity"]["he"]["dist_fid"] >= 0 and r["fidelity"]["he"]["fid"] >= 0
        assert 0 <= r["mia"]["dcr"]["auc"] <= 1
    assert set(rows["MM-DSL"]["fidelity"]) == set(rows["Hetero-MM-DSL"]["fidelity"]) == {"he", "ihc"}
    assert rows["Hetero-MM-DSL"]["available"] == record["data"]["available"]
    assert not all(all(a) for a in record["data"]["available"])  # some site lacks a modality
    assert rows["DSL + clip/noise"]["defense"].startswith("ClipAndNoise") and rows["DSL"]["defense"] is None
    assert rows["DSL + clip/noise"]["noise_multiplier"] == PRESETS["tiny"].defense_noises[0]
    assert rows["FedAvg-GAN"]["traffic_bytes"]["models_to_server"] > 0
    assert rows["DSL"]["traffic_bytes"]["gradients_to_server"] > 0


def test_reconstruction_attacks_with_and_without_the_defense(record):
    rows = {(a["attack"], a["noise_multiplier"]): a for a in record["attacks"]["reconstruction"]}
    assert set(rows) == {("passive", None), ("active", None), ("passive", 0.05), ("active", 0.05)}
    for a in rows.values():
        assert a["psnr"] > 0 and a["images"] > 0
    assert (
        rows["passive", None]["observations_per_image"] >= 1
        and rows["passive", None]["psnr_server_synthetic"] > 0
    )
    assert (
        rows["passive", 0.05]["clip"] == PRESETS["tiny"].defense_clip
        and rows["passive", None]["clip"] is None
    )
    # bisection against a noise-free site beats the noisy one
    assert rows["active", None]["psnr"] > rows["active", 0.05]["psnr"]


def test_lira_with_shadow_dsl_pipelines():
    preset = replace(PRESETS["tiny"], lira_shadows=2)
    record = run_dsl_experiment(preset, methods=["DSL"], noise=SeededNoise(0))
    lira = record["attacks"]["lira_dsl"]
    assert lira["attack"].startswith("LiRA (2 shadow") and 0 <= lira["auc"] <= 1
    assert lira["n_members"] == preset.sites * preset.train_per_site


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown methods"):
        run_dsl_experiment(PRESETS["tiny"], methods=["GAN"])


def test_cli_writes_json_csv_plot_and_report(tmp_path, capsys):
    from privfl.bench.__main__ import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "dsl",
                "--preset",
                "tiny",
                "--seeded-noise",
                "--no-progress",
                "--methods",
                "FedAvg",
                "DSL",
                "DSL + clip/noise",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["subcommand"] == "dsl" and [r["method"] for r in printed["methods"]] == [
        "FedAvg",
        "DSL",
        "DSL + clip/noise",
    ]
    assert json.loads((out / "results.json").read_text())["noise"] == "seeded (NOT secure)"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["FedAvg", "DSL", "DSL + clip/noise"] and float(
        rows[1]["dice"]
    ) >= 0
    attacks = list(csv.DictReader((out / "attacks.csv").open()))
    assert {(a["attack"], a["noise_multiplier"]) for a in attacks} == {
        ("passive", ""),
        ("active", ""),
        ("passive", "0.05"),
        ("active", "0.05"),
    }
    report = (out / "report.md").read_text()
    assert "Dist-FID" in report and "PSNR" in report and (out / "dsl.png").stat().st_size > 10_000
    assert main(["dsl", "--preset", "tiny", "--timm-model", "resnet18", "--out", str(out)]) == 2


def test_gpu_preset_networks_and_perceptual_loss_fit_together():
    """The ``gpu`` preset cannot run here; its networks, image size and perceptual extractor must fit."""
    import torch

    from privfl.experiments.dsl import MODALITIES, _config
    from privfl.sharing.dsl import MaskToImageGenerator, PatchDiscriminator
    from privfl.sharing.embeddings import dhunet_encoder

    preset = PRESETS["gpu"]
    config = _config(preset, MODALITIES)
    assert config.lambda_perceptual > 0 and preset.lira_shadows > 0
    gen = MaskToImageGenerator(4, len(MODALITIES), ngf=config.ngf, n_blocks=config.n_blocks)
    masks = torch.randint(0, 4, (1, preset.size, preset.size))
    out = gen(masks)
    assert out.shape == (1, 6, preset.size, preset.size)
    dhunet_encoder(size=preset.size, seed=1)(out[:, :3]).abs().mean().backward()  # the perceptual term
    assert next(gen.parameters()).grad is not None
    disc = PatchDiscriminator(4, 3, ndf=config.ndf, n_layers=config.d_layers)
    assert disc(out[:, 3:].detach(), masks).shape[:2] == (1, 1)


def test_seg_model_option_is_checked(tmp_path):
    from privfl.bench.__main__ import main

    assert main(["dsl", "--preset", "tiny", "--seg-model", "no-such-model", "--out", str(tmp_path)]) == 2
