"""``python -m privfl.bench secagg``: masking cost against RandomState masks, bytes, exactness."""

from __future__ import annotations

import json

import pytest

from privfl.bench.__main__ import main
from privfl.bench.secagg import measure_secagg
from privfl.defenses.secagg.protocol import MaskedInput


def test_cli_json_small_run(capsys, tmp_path):
    out = tmp_path / "secagg.json"
    assert (
        main(
            [
                "secagg",
                "--params",
                "20000",
                "--clients",
                "5",
                "--dropouts",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--json",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    r = record["result"]
    assert json.loads(out.read_text())["result"]["params"] == 20000
    assert (r["clients"], r["dropouts"], r["threshold"]) == (5, 2, 3)
    assert r["exact_sum"] is True
    assert r["max_abs_error"] <= r["max_error_bound"] + 1e-7  # + float32 rounding of the mean
    w = r["wire"]
    assert w["masked_input_bytes"] == 4 * 20000 + MaskedInput.OVERHEAD
    assert w["overhead_bytes"] == MaskedInput.OVERHEAD == 126
    assert r["anchor"]["client_masks"] == 5 and r["anchor"]["server_masks"] == 3 + 2 * 3
    for key in ("client_protect_s", "server_unmask_s", "dropout_recovery_s", "setup_s"):
        assert r[key] > 0
    assert "machine" in record


def test_arguments_checked():
    with pytest.raises(ValueError, match="threshold"):
        measure_secagg(params=100, clients=3, dropouts=2, repeats=1, warmup=0)
    with pytest.raises(ValueError):
        measure_secagg(params=0)
