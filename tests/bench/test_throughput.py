"""train-throughput benchmark: the measured core and the CLI, on CPU with dhunet-tiny."""

from __future__ import annotations

import json

from privfl.bench.throughput import measure_train_throughput
from privfl.fl.device import make_fabric
from privfl.models import build_model


def test_measure_train_throughput_cpu():
    model = build_model("dhunet-tiny", num_classes=4, img_size=64)
    result = measure_train_throughput(model, 64, 2, steps=2, warmup=1, fabric=make_fabric("cpu"))
    for key in ("images_per_s", "s_per_step", "s_per_step_mean", "peak_memory_mib", "params", "final_loss"):
        assert result[key] > 0, key
    assert len(result["step_times"]) == 2
    assert result["device"] == "cpu" and result["device_name"].startswith("cpu")
    assert result["precision"] == "32-true"
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert abs(result["images_per_s"] - 2 / result["s_per_step"]) < 1e-9
    assert result["loss"]


def test_cli_writes_json(tmp_path):
    from privfl.bench.__main__ import main

    out = tmp_path / "t.json"
    rc = main(
        [
            "train-throughput",
            "--model",
            "dhunet-tiny",
            "--img-size",
            "64",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["result"]["model"] == "dhunet-tiny"
    assert data["result"]["batch_size"] == 2
    assert data["result"]["images_per_s"] > 0
    assert "cpu" in data["machine"]
