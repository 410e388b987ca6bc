"""``--preset`` values of ``attack-vs-dp``: the whole configuration of a sweep in one name.

``cpu-quick`` trains ``unet-wide`` (48 channels at full resolution) rather than ``dhunet-tiny``:
DHU-Net sees the image only through 4×4 patchify stems, and a batch-1 update of ``dhunet-tiny``
inverts to about 10 dB even undefended (benchmarks/RESULTS.md, "Inverting Gradients") — a sweep in
which the attack fails without any defense cannot show what a defense buys. ``--model
dhunet-tiny`` runs the same sweep on DHU-Net.
"""

from __future__ import annotations

from typing import Any

from privfl.experiments.attack_vs_dp.experiment import Preset
from privfl.fl import ClientConfig

PRESETS: dict[str, Preset] = {
    # about 5 minutes on 2 CPU cores for the default sweep (benchmarks/RESULTS.md)
    "cpu-quick": Preset(
        model="unet-wide",
        clients=5,
        samples_per_client=16,
        size=32,
        rounds=10,
        config=ClientConfig(local_epochs=1, batch_size=4, lr=0.1, momentum=0.9),
        clip=0.5,
        inversion_iterations=200,
        inversion_batch=4,
    ),
    # FedDP's setting (5 clients, 224×224, 150 rounds, batch 24, SGD); meant for a GPU
    "paper": Preset(
        model="dhunet",
        clients=5,
        samples_per_client=96,
        size=224,
        rounds=150,
        config=ClientConfig(local_epochs=1, batch_size=24, lr=0.01, momentum=0.9),
        clip=0.05,
        inversion_iterations=2000,
        inversion_batch=4,
    ),
}


def resolve(name: str, overrides: dict[str, Any]) -> Preset:
    """The preset ``name`` with the non-``None`` ``overrides`` applied (``ValueError`` for a bad name
    or a value out of range)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name].with_overrides(overrides)
