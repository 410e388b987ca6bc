"""DSL training loops: DSL / MM-DSL / Hetero-MM-DSL (:func:`train_dsl`) and CL-DSL (:func:`train_cl_dsl`).

The loops only wire the sides of :mod:`privfl.sharing.dsl.protocol` together — every message goes
``site.request → server.synthesize → site.respond → server.step`` — and record the bytes each
channel carries. ``observer(request, synthetic, reply)`` is called with exactly what the server
receives and sends, which is what a curious server could keep (the attack in
:mod:`privfl.attacks.gradient_sign` is such an observer).

Variants (Chang et al. 2023):

* **DSL** — one modality; every site has it.
* **MM-DSL** — ``M`` modalities; the generator outputs one 3-channel group per modality and each
  site has one discriminator per modality.
* **Hetero-MM-DSL** — a site has discriminators only for the modalities it holds, returns zero
  gradient on the others, and the server weighs each modality's gradient over the sites holding it
  (:func:`~privfl.sharing.dsl.protocol.modality_weights`). The generator still produces every
  modality for every mask: missing modalities are *completed*.
* **CL-DSL** — sites arrive one after another; at stage ``t`` the generator learns from site ``t``
  online (its adversarial and L1 terms through the same exchange) plus a reminding loss
  ``reminding_weight · ||G_t(m) − G_{t−1}(m)||²`` on masks of earlier sites, which the server kept,
  against the frozen previous generator.

Device and precision come from Lightning Fabric (CUDA with bf16 autocast where there is one).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privfl.fl.device import make_fabric
from privfl.progress import progress_bar
from privfl.seeding import derive_seed, seeded, torch_generator, torch_seeded
from privfl.sharing.dsl.networks import MaskToImageGenerator
from privfl.sharing.dsl.protocol import (
    DSLServer,
    DSLSite,
    GradientReply,
    MaskRequest,
    ReplyDefense,
    SyntheticImages,
    message_bytes,
    modality_weights,
)

__all__ = [
    "DSLConfig",
    "DSLResult",
    "DSLRun",
    "Observer",
    "SiteData",
    "synthesize",
    "train_cl_dsl",
    "train_dsl",
]

Observer = Callable[[MaskRequest, SyntheticImages, GradientReply], None]


@dataclass
class SiteData:
    """One site's training data.

    Attributes:
        images: ``(N, 3·M, H, W)`` float in [0, 1], the modalities' RGB images concatenated in the
            config's ``modalities`` order (channels of modalities the site lacks may hold anything).
        masks: ``(N, H, W)`` int64 labels.
        available: per modality, whether the site has it (default: all).
    """

    images: Tensor
    masks: Tensor
    available: tuple[bool, ...] | None = None


@dataclass
class DSLConfig:
    """Settings of :func:`train_dsl` and :func:`train_cl_dsl` (defaults: the paper's pix2pix settings).

    Attributes:
        modalities: names of the image modalities (one 3-channel group each).
        num_classes: mask classes.
        epochs: passes over the largest site's data (CL-DSL: per stage).
        batch_size: images per site per iteration.
        lr: Adam learning rate of generator and discriminators (paper: 2e-4).
        beta1: Adam β₁ (pix2pix: 0.5).
        lambda_l1: weight of the L1 term (pix2pix: 100).
        lambda_perceptual: weight of the perceptual term (needs a ``perceptual`` extractor).
        ngf: generator width.
        ndf: discriminator width.
        n_blocks: generator residual blocks (paper: 9).
        d_layers: discriminator depth (3: the 70×70 PatchGAN).
        dropout: generator dropout (its source of randomness).
        reminding_weight: CL-DSL's reminding-loss weight.
        seed: initialisation and batch order.
        accelerator: Lightning Fabric accelerator (``"auto"``: CUDA when present).
        precision: Lightning Fabric precision (default bf16-mixed on CUDA, 32-true on CPU).
    """

    modalities: tuple[str, ...] = ("he",)
    num_classes: int = 4
    epochs: int = 200
    batch_size: int = 4
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_l1: float = 100.0
    lambda_perceptual: float = 0.0
    ngf: int = 64
    ndf: int = 64
    n_blocks: int = 9
    d_layers: int = 3
    dropout: float = 0.5
    reminding_weight: float = 10.0
    seed: int = 0
    accelerator: str = "auto"
    precision: str | None = None

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be non-empty and distinct, got {self.modalities}")
        for name in ("epochs", "batch_size", "num_classes"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "lambda_l1", "lambda_perceptual", "reminding_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class DSLResult:
    """What :func:`train_dsl` / :func:`train_cl_dsl` return.

    Attributes:
        generator: the central generator (CPU, eval mode); :func:`synthesize` samples from it.
        variant: ``"DSL"``, ``"MM-DSL"``, ``"Hetero-MM-DSL"`` or ``"CL-DSL"``.
        modalities: the modality names.
        available: per site, per modality availability.
        history: one record per epoch: ``{"epoch", "stage", "g_loss", "l1", "d_loss"}`` with one mean
            per site (site-local diagnostics; these are **not** sent in the protocol).
        traffic: bytes per channel over the run: ``masks_to_server``, ``images_to_sites``,
            ``gradients_to_server``.
        messages: number of request/reply exchanges.
        seconds: wall-clock time.
    """

    generator: MaskToImageGenerator
    variant: str
    modalities: tuple[str, ...]
    available: list[tuple[bool, ...]]
    history: list[dict[str, Any]] = field(default_factory=list)
    traffic: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    seconds: float = 0.0


def _variant(available: Sequence[tuple[bool, ...]]) -> str:
    if len(available[0]) == 1:
        return "DSL"
    return "MM-DSL" if all(all(a) for a in available) else "Hetero-MM-DSL"


class DSLRun:
    """Shared set-up of the training loops here and of FedAvg-GAN (:mod:`privfl.sharing.dsl.baselines`):
    device, generator, sites, traffic counters, the exchange and the per-epoch log."""

    def __init__(
        self,
        sites: Sequence[SiteData],
        config: DSLConfig,
        perceptual: nn.Module | None,
        defense: ReplyDefense | None,
        observer: Observer | None,
    ) -> None:
        if not sites:
            raise ValueError("need at least one site")
        m = len(config.modalities)
        self.available = [tuple(s.available) if s.available is not None else (True,) * m for s in sites]
        if any(len(a) != m for a in self.available):
            raise ValueError(f"each site's availability needs one flag per modality ({m})")
        self.fabric = make_fabric(config.accelerator, config.precision)
        device = self.fabric.device
        self.config, self.observer = config, observer
        if perceptual is not None:
            perceptual = perceptual.to(device).eval()
            for p in perceptual.parameters():
                p.requires_grad_(False)
        self.sites = [
            DSLSite(
                j,
                s.images.to(device),
                s.masks.to(device),
                self.available[j],
                num_classes=config.num_classes,
                ndf=config.ndf,
                d_layers=config.d_layers,
                lr=config.lr,
                beta1=config.beta1,
                lambda_l1=config.lambda_l1,
                lambda_perceptual=config.lambda_perceptual,
                perceptual=perceptual,
                defense=defense,
                seed=derive_seed(config.seed, "dsl-site", j),
            )
            for j, s in enumerate(sites)
        ]
        with seeded(config.seed, "dsl-generator"):
            self.generator = MaskToImageGenerator(
                config.num_classes, m, ngf=config.ngf, n_blocks=config.n_blocks, dropout=config.dropout
            ).to(device)
        self.traffic = {"masks_to_server": 0, "images_to_sites": 0, "gradients_to_server": 0}
        self.messages = 0
        self.history: list[dict[str, Any]] = []

    def exchange(
        self, server: DSLServer, sites: Sequence[DSLSite]
    ) -> tuple[list[Tensor], list[GradientReply], list[MaskRequest]]:
        """One round trip with each of ``sites``: masks in, synthetic images out, gradients back."""
        outputs, replies, requests = [], [], []
        for site in sites:
            request = site.request(self.config.batch_size)
            with self.fabric.autocast():
                synthetic, out = server.synthesize(request)
            synthetic = SyntheticImages(synthetic.site, synthetic.images.float())
            reply = site.respond(synthetic)
            if self.observer is not None:
                self.observer(request, synthetic, reply)
            for key, msg in (
                ("masks_to_server", request),
                ("images_to_sites", synthetic),
                ("gradients_to_server", reply),
            ):
                self.traffic[key] += message_bytes(msg)
            self.messages += 1
            outputs.append(out.float())
            replies.append(reply)
            requests.append(request)
        return outputs, replies, requests

    def log_epoch(
        self, epoch: int, stage: int | None, sites: Sequence[DSLSite], marks: list[int]
    ) -> list[int]:
        """Append the epoch's mean site losses since ``marks`` (per-site list lengths); return new marks."""
        rec: dict[str, Any] = {"epoch": epoch, "stage": stage}
        for key, attr in (("g_loss", "generator"), ("l1", "l1"), ("d_loss", "discriminator")):
            rec[key] = [
                float(np.mean(values[mk:])) if len(values := getattr(s.losses, attr)) > mk else float("nan")
                for s, mk in zip(sites, marks)
            ]
        self.history.append(rec)
        return [len(s.losses.generator) for s in sites]

    @classmethod
    def seeded(
        cls,
        tag: str,
        sites: Sequence[SiteData],
        config: DSLConfig,
        perceptual: nn.Module | None,
        defense: ReplyDefense | None,
        observer: Observer | None,
        body: Callable[[DSLRun, float], DSLResult],
    ) -> DSLResult:
        """``body(run, t0)`` on a new run, all under ``seeded(config.seed, tag, cuda=True)`` (the global
        RNG is seeded for the run and restored afterwards); ``t0`` is the ``time.perf_counter()`` of
        the run's start, taken before the run is built."""
        with seeded(config.seed, tag, cuda=True):
            t0 = time.perf_counter()
            return body(cls(sites, config, perceptual, defense, observer), t0)

    def result(self, variant: str, t0: float) -> DSLResult:
        """The finished run as a :class:`DSLResult` (generator on the CPU in eval mode; ``t0`` is the
        ``time.perf_counter()`` of the run's start)."""
        generator = self.generator.cpu().eval()
        return DSLResult(
            generator=generator,
            variant=variant,
            modalities=self.config.modalities,
            available=self.available,
            history=self.history,
            traffic=dict(self.traffic),
            messages=self.messages,
            seconds=time.perf_counter() - t0,
        )


def train_dsl(
    sites: Sequence[SiteData],
    config: DSLConfig,
    *,
    perceptual: nn.Module | None = None,
    defense: ReplyDefense | None = None,
    observer: Observer | None = None,
    progress: bool = False,
) -> DSLResult:
    """Train DSL, MM-DSL or Hetero-MM-DSL (chosen by the sites' availability; module docstring).

    Args:
        sites: each site's data.
        config: sizes and schedule.
        perceptual: frozen feature extractor for the perceptual term (public; every site uses it).
        defense: site-side transform of each returned gradient, ``defense(grad, key)`` (e.g.
            :class:`~privfl.sharing.dsl.defense.ClipAndNoise`).
        observer: called with ``(request, synthetic, reply)`` of every exchange, as the server sees them.
        progress: rich progress bar.

    Deterministic for a given ``config.seed`` on CPU (the global RNG is seeded for the run and
    restored afterwards), except for the noise of a secure ``defense``.
    """
    body = partial(_train_dsl, progress=progress)
    return DSLRun.seeded("train_dsl", sites, config, perceptual, defense, observer, body)


def _train_dsl(run: DSLRun, t0: float, progress: bool) -> DSLResult:
    config = run.config
    weights = modality_weights([s.size for s in run.sites], run.available)
    server = DSLServer(
        run.generator, weights.to(run.fabric.device, torch.float32), lr=config.lr, beta1=config.beta1
    )
    iters = math.ceil(max(s.size for s in run.sites) / config.batch_size)
    variant = _variant(run.available)
    marks = [0] * len(run.sites)
    with progress_bar(progress, variant) as bar:
        task = bar.add_task(variant, total=config.epochs, status="")
        for epoch in range(config.epochs):
            for _ in range(iters):
                outputs, replies, _ = run.exchange(server, run.sites)
                server.step(outputs, replies)
            marks = run.log_epoch(epoch, None, run.sites, marks)
            bar.update(task, advance=1, status=f"L1 {np.nanmean(run.history[-1]['l1']):.3f}")
    return run.result(variant, t0)


def train_cl_dsl(
    sites: Sequence[SiteData],
    config: DSLConfig,
    *,
    perceptual: nn.Module | None = None,
    defense: ReplyDefense | None = None,
    observer: Observer | None = None,
    progress: bool = False,
) -> DSLResult:
    """Train CL-DSL: sites in the given order, ``config.epochs`` epochs each (module docstring).

    Arguments as for :func:`train_dsl`. The server keeps every mask it received (it needs earlier
    sites' masks for the reminding loss after those sites have left). Seeded as :func:`train_dsl`.
    """
    body = partial(_train_cl_dsl, progress=progress)
    return DSLRun.seeded("train_cl_dsl", sites, config, perceptual, defense, observer, body)


def _train_cl_dsl(run: DSLRun, t0: float, progress: bool) -> DSLResult:
    config = run.config
    device = run.fabric.device
    kept: list[Tensor] = []
    previous: MaskToImageGenerator | None = None
    gen = torch_generator(config.seed, "cl-dsl-remind")
    with progress_bar(progress, "CL-DSL") as bar:
        task = bar.add_task("CL-DSL", total=config.epochs * len(run.sites), status="")
        epoch_no = 0
        for t, site in enumerate(run.sites):
            weights = torch.zeros(len(run.sites), len(config.modalities), device=device)
            weights[t] = torch.tensor(run.available[t], dtype=torch.float32, device=device)
            server = DSLServer(run.generator, weights, lr=config.lr, beta1=config.beta1)
            iters = math.ceil(site.size / config.batch_size)
            received: list[Tensor] = []
            marks = [len(site.losses.generator)]
            for _ in range(config.epochs):
                for _ in range(iters):
                    outputs, replies, requests = run.exchange(server, [site])
                    received.append(requests[0].masks)
                    extra = None
                    if previous is not None and kept and config.reminding_weight > 0:
                        pool = torch.cat(kept)
                        pick = torch.randint(len(pool), (min(config.batch_size, len(pool)),), generator=gen)
                        old = pool[pick.to(pool.device)]
                        with torch.no_grad(), run.fabric.autocast():
                            target = previous(old).float()
                        with run.fabric.autocast():
                            extra = config.reminding_weight * F.mse_loss(run.generator(old).float(), target)
                    server.step(outputs, replies, extra)
                marks = run.log_epoch(epoch_no, t, [site], marks)
                epoch_no += 1
                bar.update(task, advance=1, status=f"site {t}  L1 {run.history[-1]['l1'][0]:.3f}")
            kept.append(torch.cat(received))
            previous = copy.deepcopy(run.generator).eval()
            for p in previous.parameters():
                p.requires_grad_(False)
    return run.result("CL-DSL", t0)


def synthesize(
    generator: MaskToImageGenerator,
    masks: Tensor,
    *,
    batch_size: int = 32,
    seed: int = 0,
    stochastic: bool = True,
) -> Tensor:
    """Synthetic images ``(N, 3·M, H, W)`` in [0, 1] for masks ``(N, H, W)``, on the generator's device.

    BatchNorm uses its running statistics; dropout stays on when ``stochastic`` (pix2pix's test-time
    randomness), seeded by ``seed`` without touching the global RNG.
    """
    device = next(generator.parameters()).device
    generator.eval()
    if stochastic:
        for mod in generator.modules():
            if isinstance(mod, nn.Dropout):
                mod.train()
    out = []
    with torch.no_grad(), torch_seeded(seed, device=device):
        for i in range(0, len(masks), batch_size):
            out.append(generator(masks[i : i + batch_size].to(device)).float())
    generator.eval()
    return torch.cat(out) if out else torch.empty(0, 3 * generator.modalities, *masks.shape[-2:])
