"""The DSL comparison of ``python -m privfl.bench dsl``, as one function: :func:`run_dsl_experiment`.

1. **Data.** A :class:`~privfl.data.MultiStainHistology` set: the same tissue as H&E and as an
   IHC-like stain (two modalities); site ``j`` has stain profile ``j``, a training and a held-out
   test split. For Hetero-MM-DSL some sites lack a modality (``preset.missing``).
2. **Methods**, each ending in a downstream segmenter (``preset.seg_model``) evaluated on the real
   held-out H&E images of all sites (mean foreground Dice):

   * ``Real (centralized)`` — trained on the pooled real H&E images (the upper reference);
   * ``FedAvg`` — federated training on the real images (privfl's FL loop);
   * ``FedAvg-GAN`` — pix2pix trained by FedAvg, downstream on its synthetic images;
   * ``DSL``, ``DSL + clip/noise`` (the returned gradients defended by
     :class:`~privfl.sharing.dsl.defense.ClipAndNoise`), ``MM-DSL``, ``Hetero-MM-DSL``, ``CL-DSL``
     — downstream on the central generator's synthetic H&E images of every training mask
     (Hetero-MM-DSL completes H&E for the sites that lack it).

3. **Fidelity.** Dist-FID (each site's real feature statistics against the synthetic ones, weighted
   by site size) and FID against the pooled real statistics, per modality, with privfl's own
   random-feature encoder (or a local timm checkpoint): comparable between runs of this benchmark,
   not with Inception-FID papers.
4. **Attacks.** Membership inference — LOSS on each downstream segmenter (members: the real
   training images whose masks generated the synthetic data; non-members: the test images), the
   distance to the closest synthetic image, and LiRA with shadow DSL pipelines when
   ``preset.lira_shadows > 0``; reconstruction of site 0's real images from the returned gradients
   — passive (honest-but-curious server, :class:`~privfl.attacks.gradient_sign.GradientSignAttack`)
   and active (malicious server, :func:`~privfl.attacks.gradient_sign.bisect_site`) — without the
   defense and at each noise multiplier, as PSNR against the real image next to what the server has
   anyway (its own recent synthetic images of that mask).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from privfl.attacks.gradient_sign import GradientSignAttack, bisect_site, mask_key
from privfl.attacks.membership import LiRA, LossThreshold
from privfl.attacks.metrics import attack_summary, psnr
from privfl.attacks.synthetic import distance_to_closest_record
from privfl.data.multistain import MultiStainHistology
from privfl.defenses.rng import NoiseSource
from privfl.fl import ClientConfig, run_federated
from privfl.models import build_model
from privfl.seeding import derive_seed, torch_seeded
from privfl.sharing.dsl.baselines import train_fedavg_gan
from privfl.sharing.dsl.defense import ClipAndNoise
from privfl.sharing.dsl.fid import FeatureStats, dist_fid, feature_stats, fid, fid_extractor, pooled_stats
from privfl.sharing.dsl.protocol import DSLSite
from privfl.sharing.dsl.train import DSLConfig, DSLResult, SiteData, synthesize, train_cl_dsl, train_dsl
from privfl.sharing.embeddings import dhunet_encoder

__all__ = ["METHODS", "PRESETS", "DSLPreset", "run_dsl_experiment"]

METHODS = (
    "Real (centralized)",
    "FedAvg",
    "FedAvg-GAN",
    "DSL",
    "DSL + clip/noise",
    "MM-DSL",
    "Hetero-MM-DSL",
    "CL-DSL",
)


@dataclass(frozen=True)
class DSLPreset:
    """Sizes and hyper-parameters of a run.

    Attributes:
        name: preset name.
        sites: number of sites (one stain profile each).
        train_per_site: real training images per site.
        test_per_site: real held-out images per site.
        size: image side in pixels (a multiple of 4, >= 32).
        missing: ``(site, modality)`` pairs a site lacks in Hetero-MM-DSL.
        epochs: DSL epochs (CL-DSL: per site); FedAvg-GAN runs as many rounds of one local epoch.
        batch_size: images per site per DSL iteration.
        ngf: generator width.
        ndf: discriminator width.
        n_blocks: generator residual blocks.
        lambda_l1: L1 weight (pix2pix: 100).
        lambda_perceptual: perceptual-loss weight; the features are a frozen random ``dhunet-tiny``
            encoder seeded differently from the FID extractor (0: no perceptual term).
        reminding_weight: CL-DSL's reminding-loss weight.
        seg_model: downstream segmenter (``privfl.models`` name).
        seg_epochs: downstream training epochs (FedAvg: rounds).
        fedavg_local_epochs: FedAvg's local epochs per round (default: as many as there are sites, so
            each client takes about as many steps as the centralized model).
        seg_batch_size: downstream batch size.
        seg_lr: downstream SGD learning rate.
        seg_seeds: downstream models trained per method (Dice is their mean ± std); the same seeds
            for every method.
        defense_clip: per-image clip of the returned gradients (``ClipAndNoise``).
        defense_noises: noise multipliers of the defense; ``DSL + clip/noise`` runs once per value.
        attack_images: site-0 images the passive attacker tracks.
        bisect_passes: passes of the active bisection attack (bits per pixel).
        lira_shadows: shadow DSL pipelines for LiRA (0: LiRA skipped).
        seed: data, initialisation, batch order and seeded noise.
    """

    name: str
    sites: int = 3
    train_per_site: int = 16
    test_per_site: int = 8
    size: int = 32
    missing: tuple[tuple[int, str], ...] = ((1, "ihc"), (2, "he"))
    epochs: int = 25
    batch_size: int = 4
    ngf: int = 16
    ndf: int = 16
    n_blocks: int = 3
    lambda_l1: float = 100.0
    lambda_perceptual: float = 0.0
    reminding_weight: float = 10.0
    seg_model: str = "unet-tiny"
    seg_epochs: int = 30
    seg_batch_size: int = 8
    seg_lr: float = 0.01
    seg_seeds: int = 3
    fedavg_local_epochs: int = 3
    defense_clip: float = 1.0
    defense_noises: tuple[float, ...] = (0.01, 0.05, 0.2)
    attack_images: int = 8
    bisect_passes: int = 8
    lira_shadows: int = 0
    seed: int = 0


PRESETS = {
    "cpu-quick": DSLPreset(
        "cpu-quick", train_per_site=24, test_per_site=12, epochs=40, seg_epochs=40, lira_shadows=4
    ),
    "tiny": DSLPreset(
        "tiny",
        sites=3,
        train_per_site=4,
        test_per_site=2,
        epochs=1,
        ngf=4,
        ndf=4,
        n_blocks=1,
        seg_epochs=1,
        seg_seeds=1,
        fedavg_local_epochs=1,
        defense_noises=(0.05,),
        attack_images=2,
        bisect_passes=2,
    ),
    "gpu": DSLPreset(
        "gpu",
        sites=4,
        train_per_site=200,
        test_per_site=50,
        size=128,
        epochs=200,
        batch_size=8,
        ngf=64,
        ndf=64,
        n_blocks=9,
        lambda_perceptual=10.0,
        seg_model="dhunet-tiny",
        seg_epochs=100,
        seg_batch_size=16,
        fedavg_local_epochs=4,
        attack_images=16,
        bisect_passes=8,
        lira_shadows=8,
    ),
}

MODALITIES = ("he", "ihc")


@dataclass
class _Data:
    train: list[SiteData]  # both modalities
    test_images: Tensor  # (N, 6, H, W)
    test_masks: Tensor
    available: list[tuple[bool, ...]]  # Hetero-MM-DSL

    def he(self, images: Tensor) -> Tensor:
        return images[:, :3]

    def he_only(self) -> list[SiteData]:
        return [SiteData(s.images[:, :3], s.masks) for s in self.train]


def _data(preset: DSLPreset) -> _Data:
    per = preset.train_per_site + preset.test_per_site
    ds = MultiStainHistology(
        preset.sites * per, size=preset.size, seed=preset.seed, sites=preset.sites, modalities=MODALITIES
    )
    train, test_x, test_m = [], [], []
    for j in range(preset.sites):
        idx = np.flatnonzero(ds.sites_of == j)
        pairs = [ds[int(i)] for i in idx]
        x = torch.stack([p[0] for p in pairs])
        m = torch.stack([p[1] for p in pairs])
        train.append(SiteData(x[: preset.train_per_site], m[: preset.train_per_site]))
        test_x.append(x[preset.train_per_site :])
        test_m.append(m[preset.train_per_site :])
    missing = set(preset.missing)
    unknown = {mod for _, mod in missing} - set(MODALITIES)
    if unknown or any(not 0 <= s < preset.sites for s, _ in missing):
        raise ValueError(f"preset.missing names unknown sites or modalities: {sorted(missing)}")
    available = [tuple((j, mod) not in missing for mod in MODALITIES) for j in range(preset.sites)]
    return _Data(train, torch.cat(test_x), torch.cat(test_m), available)


def _config(preset: DSLPreset, modalities: tuple[str, ...]) -> DSLConfig:
    return DSLConfig(
        modalities=modalities,
        epochs=preset.epochs,
        batch_size=preset.batch_size,
        ngf=preset.ngf,
        ndf=preset.ndf,
        n_blocks=preset.n_blocks,
        lambda_l1=preset.lambda_l1,
        lambda_perceptual=preset.lambda_perceptual,
        reminding_weight=preset.reminding_weight,
        seed=preset.seed,
    )


def _seg_model(preset: DSLPreset) -> nn.Module:
    """A fresh downstream segmenter (DHU-Nets are built for the preset's image size)."""
    extra = {"img_size": preset.size} if preset.seg_model.startswith("dhunet") else {}
    return build_model(preset.seg_model, num_classes=4, **extra)


def _segmenter(
    images: Tensor,
    masks: Tensor,
    data: _Data,
    preset: DSLPreset,
    seed: int,
    clients: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> tuple[nn.Module, float]:
    """Train the downstream segmenter centrally on ``(images, masks)`` (or by FedAvg over ``clients``);
    return it and its Dice on the real held-out H&E images."""
    with torch_seeded(seed):
        model = _seg_model(preset)
    parts = clients if clients is not None else [(images, masks)]
    local_epochs = preset.fedavg_local_epochs if clients is not None else 1
    result = run_federated(
        model,
        [TensorDataset(x.float(), m.long()) for x, m in parts],
        TensorDataset(data.he(data.test_images), data.test_masks),
        rounds=preset.seg_epochs,
        config=ClientConfig(local_epochs=local_epochs, batch_size=preset.seg_batch_size, lr=preset.seg_lr),
        val_fraction=0,
        seed=seed,
        progress=False,
    )
    return result.model.cpu().eval(), float(result.history[-1]["test"]["dice"] or 0.0)


def _downstream(
    images: Tensor,
    masks: Tensor,
    data: _Data,
    preset: DSLPreset,
    clients: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`_segmenter` with each of ``preset.seg_seeds`` seeds — the same seeds for every method,
    so methods are compared on equal terms; the first seed's model is the one attacked."""
    models, dice = [], []
    for k in range(preset.seg_seeds):
        model, d = _segmenter(images, masks, data, preset, derive_seed(preset.seed, "seg", k), clients)
        models.append(model)
        dice.append(d)
    return models[0], {"dice": float(np.mean(dice)), "dice_std": float(np.std(dice)), "dice_per_seed": dice}


def _membership(model: nn.Module, data: _Data, synthetic: Tensor | None) -> dict[str, Any]:
    """LOSS on the segmenter and the distance to the closest synthetic image (H&E)."""
    members = torch.cat([data.he(s.images) for s in data.train])
    member_masks = torch.cat([s.masks for s in data.train])
    non = data.he(data.test_images)
    is_member = torch.cat([torch.ones(len(members)), torch.zeros(len(non))]).bool()
    loss = LossThreshold()
    scores = torch.cat(
        [
            loss.scores(model, TensorDataset(members, member_masks)),
            loss.scores(model, TensorDataset(non, data.test_masks)),
        ]
    )
    out: dict[str, Any] = {
        "loss": {"attack": "LOSS on the downstream segmenter", **attack_summary(scores, is_member)}
    }
    if synthetic is not None:
        dcr = distance_to_closest_record(torch.cat([members, non]).flatten(1), synthetic.flatten(1))
        out["dcr"] = {"attack": "distance to the closest synthetic image", **attack_summary(dcr, is_member)}
    return out


def _fidelity(
    synthetic: Tensor,
    site_stats: Mapping[str, Sequence[FeatureStats | None]],
    extractor: nn.Module,
    modalities: Sequence[str],
) -> dict[str, dict[str, float]]:
    out = {}
    for k, mod in enumerate(modalities):
        syn = feature_stats(synthetic[:, 3 * k : 3 * k + 3], extractor)
        held = [s for s in site_stats[mod] if s is not None]
        out[mod] = {"dist_fid": dist_fid(held, syn), "fid": fid(pooled_stats(held), syn)}
    return out


def _reconstruction(attack: GradientSignAttack, result: DSLResult, site: SiteData) -> dict[str, Any]:
    recon, seen = attack.reconstruct(site.masks)
    prior, _ = attack.reconstruct(site.masks, use_signs=False)
    real = site.images[seen, :3]
    final = synthesize(result.generator, site.masks[seen], seed=0)[:, :3]
    return {
        "psnr": float(psnr(recon[seen], real).mean()),
        "images": int(seen.sum()),
        "observations_per_image": float(
            np.mean([attack.observations(mask_key(m)) for m in site.masks[seen]])
        ),
        "psnr_server_synthetic": float(psnr(prior[seen], real).mean()),
        "psnr_final_generator": float(psnr(final, real).mean()),
    }


def _bisect(site: SiteData, preset: DSLPreset, defense: ClipAndNoise | None) -> dict[str, Any]:
    target = DSLSite(
        0,
        site.images[:, :3],
        site.masks,
        (True,),
        ndf=preset.ndf,
        lambda_l1=preset.lambda_l1,
        defense=defense,
        seed=derive_seed(preset.seed, "bisect"),
    )
    masks, recon = bisect_site(target, preset.bisect_passes, batch_size=preset.batch_size)
    index = {mask_key(m): i for i, m in enumerate(site.masks)}
    real = site.images[[index[mask_key(m)] for m in masks], :3]
    return {"psnr": float(psnr(recon, real).mean()), "images": len(masks), "passes": preset.bisect_passes}


def _lira(
    preset: DSLPreset, data: _Data, target: nn.Module, perceptual: nn.Module | None, progress: bool
) -> dict[str, Any]:
    """LiRA: shadows re-run DSL + the downstream segmenter on random halves of the population."""
    pop_x = torch.cat([*(data.he(s.images) for s in data.train), data.he(data.test_images)])
    pop_m = torch.cat([*(s.masks for s in data.train), data.test_masks])
    n_train = sum(len(s.masks) for s in data.train)
    site_of = torch.cat(
        [torch.full((len(s.masks),), j) for j, s in enumerate(data.train)]
        + [torch.arange(len(data.test_masks)) % preset.sites]
    )

    def train_fn(model: nn.Module, subset: Any, seed: int) -> nn.Module:
        idx = torch.as_tensor(subset.indices)
        sites = [
            SiteData(pop_x[idx[site_of[idx] == j]], pop_m[idx[site_of[idx] == j]])
            for j in range(preset.sites)
        ]
        sites = [s for s in sites if len(s.masks)]
        res = train_dsl(sites, replace(_config(preset, ("he",)), seed=seed), perceptual=perceptual)
        syn = synthesize(res.generator, pop_m[idx], seed=seed)
        seg, _ = _segmenter(syn, pop_m[idx], data, preset, seed)
        return seg

    lira = LiRA(
        lambda: _seg_model(preset), train_fn, preset.lira_shadows, seed=preset.seed, progress=progress
    )
    population = TensorDataset(pop_x, pop_m)
    lira.fit_shadows(population)
    scores = lira.scores(target, population)
    is_member = torch.arange(len(pop_m)) < n_train
    return {
        "attack": f"LiRA ({preset.lira_shadows} shadow DSL pipelines)",
        **attack_summary(scores, is_member),
    }


def run_dsl_experiment(
    preset: DSLPreset,
    *,
    methods: Sequence[str] | None = None,
    noise: NoiseSource | None = None,
    extractor: nn.Module | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the comparison (module docstring) and return one JSON-ready record.

    Args:
        preset: sizes and hyper-parameters.
        methods: a subset of :data:`METHODS` (default all).
        noise: the defense's noise source (default privfl's secure source; pass ``SeededNoise`` for
            a reproducible run).
        extractor: FID feature extractor (default :func:`~privfl.sharing.dsl.fid.fid_extractor`).
        progress: rich progress bars.
        log: called with a line when each method starts.

    Returns:
        ``{"preset", "data", "methods": [...], "attacks": {...}, "seconds"}``; Dice in [0, 1], FID in
        squared feature units, PSNR in dB.
    """
    chosen = tuple(methods) if methods is not None else METHODS
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    say = log or (lambda _line: None)
    t0 = time.perf_counter()
    data = _data(preset)
    extractor = extractor if extractor is not None else fid_extractor(size=preset.size, seed=preset.seed)
    perceptual = (
        dhunet_encoder(size=preset.size, seed=derive_seed(preset.seed, "perceptual"))
        if preset.lambda_perceptual
        else None
    )
    site_stats: dict[str, list[FeatureStats | None]] = {
        mod: [
            feature_stats(s.images[:, 3 * k : 3 * k + 3], extractor) if data.available[j][k] else None
            for j, s in enumerate(data.train)
        ]
        for k, mod in enumerate(MODALITIES)
    }
    # plain DSL and its baselines see H&E at every site, so their H&E Dist-FID uses every site
    he_stats = {"he": [feature_stats(s.images[:, :3], extractor) for s in data.train]}
    all_masks = torch.cat([s.masks for s in data.train])
    rows: list[dict[str, Any]] = []
    attacks: dict[str, Any] = {}
    target_for_lira: nn.Module | None = None

    def downstream(
        name: str,
        result: DSLResult,
        stats: Mapping[str, Sequence[FeatureStats | None]],
        t_start: float,
        extra: dict[str, Any] | None = None,
    ) -> None:
        synthetic = synthesize(result.generator, all_masks, seed=preset.seed)
        seg, dice = _downstream(synthetic[:, :3], all_masks, data, preset)
        rows.append(
            {
                "method": name,
                **dice,
                "fidelity": _fidelity(synthetic, stats, extractor, result.modalities),
                "mia": _membership(seg, data, synthetic[:, :3]),
                "available": [list(a) for a in result.available],
                "traffic_bytes": result.traffic,
                "history": result.history,
                **(extra or {}),
                "seconds": time.perf_counter() - t_start,
            }
        )
        if name == "DSL":
            nonlocal target_for_lira
            target_for_lira = seg

    if "Real (centralized)" in chosen:
        say("Real (centralized)")
        t = time.perf_counter()
        seg, dice = _downstream(torch.cat([data.he(s.images) for s in data.train]), all_masks, data, preset)
        rows.append(
            {
                "method": "Real (centralized)",
                **dice,
                "mia": _membership(seg, data, None),
                "seconds": time.perf_counter() - t,
            }
        )
    if "FedAvg" in chosen:
        say("FedAvg")
        t = time.perf_counter()
        seg, dice = _downstream(
            all_masks, all_masks, data, preset, clients=[(data.he(s.images), s.masks) for s in data.train]
        )
        rows.append(
            {
                "method": "FedAvg",
                **dice,
                "mia": _membership(seg, data, None),
                "seconds": time.perf_counter() - t,
            }
        )
    he_config = _config(preset, ("he",))
    if "FedAvg-GAN" in chosen:
        say("FedAvg-GAN")
        t = time.perf_counter()
        downstream(
            "FedAvg-GAN",
            train_fedavg_gan(
                data.he_only(), he_config, rounds=preset.epochs, perceptual=perceptual, progress=progress
            ),
            he_stats,
            t,
        )
    reconstruction: list[dict[str, Any]] = []
    for name, sigma in [("DSL", None), *(("DSL + clip/noise", s) for s in preset.defense_noises)]:
        if name not in chosen:
            continue
        say(name if sigma is None else f"{name} (σ = {sigma})")
        t = time.perf_counter()
        guarded = None if sigma is None else ClipAndNoise(preset.defense_clip, sigma, noise)
        spy = GradientSignAttack(site=0, max_images=preset.attack_images)
        result = train_dsl(
            data.he_only(), he_config, perceptual=perceptual, defense=guarded, observer=spy, progress=progress
        )
        setting = {"noise_multiplier": sigma, "clip": None if sigma is None else preset.defense_clip}
        reconstruction.append({"attack": "passive", **setting, **_reconstruction(spy, result, data.train[0])})
        reconstruction.append({"attack": "active", **setting, **_bisect(data.train[0], preset, guarded)})
        downstream(name, result, he_stats, t, {"defense": repr(guarded) if guarded else None, **setting})
    if reconstruction:
        attacks["reconstruction"] = reconstruction
    if "MM-DSL" in chosen:
        say("MM-DSL")
        t = time.perf_counter()
        full = [SiteData(s.images, s.masks) for s in data.train]
        downstream(
            "MM-DSL",
            train_dsl(full, _config(preset, MODALITIES), perceptual=perceptual, progress=progress),
            {
                mod: [feature_stats(s.images[:, 3 * k : 3 * k + 3], extractor) for s in data.train]
                for k, mod in enumerate(MODALITIES)
            },
            t,
        )
    if "Hetero-MM-DSL" in chosen:
        say("Hetero-MM-DSL")
        t = time.perf_counter()
        hetero = [SiteData(s.images, s.masks, a) for s, a in zip(data.train, data.available)]
        result = train_dsl(hetero, _config(preset, MODALITIES), perceptual=perceptual, progress=progress)
        downstream("Hetero-MM-DSL", result, site_stats, t)
    if "CL-DSL" in chosen:
        say("CL-DSL")
        t = time.perf_counter()
        downstream(
            "CL-DSL",
            train_cl_dsl(data.he_only(), he_config, perceptual=perceptual, progress=progress),
            he_stats,
            t,
        )
    if preset.lira_shadows > 0 and target_for_lira is not None:
        say("LiRA shadows")
        attacks["lira_dsl"] = _lira(preset, data, target_for_lira, perceptual, progress)
    return {
        "preset": asdict(preset),
        "data": {
            "sites": preset.sites,
            "modalities": list(MODALITIES),
            "available": [list(a) for a in data.available],
            "train_per_site": preset.train_per_site,
            "test_per_site": preset.test_per_site,
            "size": preset.size,
        },
        "methods": rows,
        "attacks": attacks,
        "seconds": time.perf_counter() - t0,
    }
