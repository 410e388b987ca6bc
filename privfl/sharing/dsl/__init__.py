"""Distributed Synthetic Learning (Chang et al., Nature Communications 2023), attacked.

One central mask-conditioned generator learns against per-site discriminators; only masks,
synthetic images and gradients with respect to the synthetic images cross site boundaries, and
downstream models train on the synthetic data.

* :mod:`~privfl.sharing.dsl.networks` — the pix2pix ResNet generator and the PatchGAN discriminator.
* :mod:`~privfl.sharing.dsl.protocol` — the messages, each side's step, weighted gradient averaging.
* :mod:`~privfl.sharing.dsl.train` — DSL, MM-DSL, Hetero-MM-DSL and CL-DSL.
* :mod:`~privfl.sharing.dsl.defense` — clipping + noise on the returned gradients.
* :mod:`~privfl.sharing.dsl.fid` — FID and Dist-FID from per-site feature statistics.
* :mod:`~privfl.sharing.dsl.baselines` — FedAvg-GAN.
* :mod:`~privfl.experiments.dsl` — the comparison behind ``python -m privfl.bench dsl``.

What leaks, and the attacks that measure it: :mod:`privfl.attacks.gradient_sign` (real images from
the returned gradients) and membership inference on the synthetic data
(:mod:`privfl.experiments.dsl`). The method and its threat model: docs/dsl.md.
"""

from privfl.sharing.dsl.defense import ClipAndNoise
from privfl.sharing.dsl.networks import MaskToImageGenerator, PatchDiscriminator
from privfl.sharing.dsl.protocol import (
    DSLProtocolError,
    DSLServer,
    DSLSite,
    GradientReply,
    MaskRequest,
    ReplyDefense,
    SyntheticImages,
    average_gradients,
    modality_weights,
)
from privfl.sharing.dsl.train import DSLConfig, DSLResult, SiteData, synthesize, train_cl_dsl, train_dsl

__all__ = [
    "ClipAndNoise",
    "DSLConfig",
    "DSLProtocolError",
    "DSLResult",
    "DSLServer",
    "DSLSite",
    "GradientReply",
    "MaskRequest",
    "MaskToImageGenerator",
    "PatchDiscriminator",
    "ReplyDefense",
    "SiteData",
    "SyntheticImages",
    "average_gradients",
    "modality_weights",
    "synthesize",
    "train_cl_dsl",
    "train_dsl",
]
