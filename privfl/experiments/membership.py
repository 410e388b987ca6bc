"""Membership inference on an intentionally overfitted segmentation model, undefended and with DP-SGD.

:func:`run_membership_experiment` is the experiment behind ``python -m privfl.bench membership``:
the target and LiRA's shadows are trained by the same recipe, a :class:`FederatedTrainer` (privfl's
own FL loop), and attacked with :class:`~privfl.attacks.membership.LiRA`, the raw confidence
statistic and :class:`~privfl.attacks.membership.LossThreshold`. The attacks and their threat model
are in :mod:`privfl.attacks.membership`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from privfl.attacks.membership import LiRA, LossThreshold, ModelFactory, lira_scores
from privfl.attacks.metrics import attack_summary, empirical_epsilon, plot_roc, roc_curve
from privfl.data.synthetic import SyntheticHistology
from privfl.defenses.dpsgd import DPSGD
from privfl.defenses.rng import SeededNoise
from privfl.fl.client import ClientConfig
from privfl.fl.loop import run_federated
from privfl.models import build_model
from privfl.seeding import derive_seed, seeded

__all__ = ["FederatedTrainer", "run_membership_experiment"]


class FederatedTrainer:
    """A :data:`~privfl.attacks.membership.TrainFn` through privfl's own trainer:
    ``run_federated(model, [data], None, rounds, ...)`` with one client, no validation split and no test set.

    Keyword arguments go to :func:`~privfl.fl.loop.run_federated` (``config``, ``dp_sgd``,
    ``augment`` — ``None`` by default here —, ``accelerator``, ``loss_fn``, …). With ``dp_sgd`` whose
    noise is a seeded (non-secure) source, the noise is re-keyed by the call's seed, so that shadows
    and target do not share one noise stream. ``last_result`` keeps the last
    :class:`~privfl.fl.loop.FederatedResult` (history with the accounted ε).
    """

    def __init__(self, rounds: int = 1, **run_kwargs: Any) -> None:
        if "val_fraction" in run_kwargs or "test_data" in run_kwargs:
            raise ValueError("FederatedTrainer trains on all of the given data: no val_fraction / test_data")
        self.rounds = rounds
        self.run_kwargs = {"augment": None, "progress": False, **run_kwargs}
        self.last_result: Any = None

    def __call__(self, model: nn.Module, dataset: Dataset, seed: int) -> nn.Module:
        kwargs = dict(self.run_kwargs)
        dp = kwargs.get("dp_sgd")
        if dp is not None and isinstance(dp.noise, SeededNoise):
            kwargs["dp_sgd"] = dataclasses.replace(dp, noise=SeededNoise(derive_seed(dp.noise.seed, seed)))
        self.last_result = run_federated(
            model, [dataset], None, self.rounds, val_fraction=0.0, seed=seed, **kwargs
        )
        return self.last_result.model

    @property
    def last_epsilon(self) -> float | None:
        """Sample-level ε accounted for the last DP-SGD run (``None`` without DP-SGD)."""
        if self.last_result is None or not self.last_result.history:
            return None
        rec = self.last_result.history[-1].get("sample_privacy")
        return None if rec is None else float(rec["epsilon"])


_VARIANTS = {
    "lira_online_fixed": (True, True),
    "lira_online": (True, False),
    "lira_offline_fixed": (False, True),
    "lira_offline": (False, False),
}
"""Report name -> ``(online, fixed_variance)`` of the LiRA variants the experiment evaluates."""

_PLOTTED = ("lira_online_fixed", "lira_offline_fixed", "loss")
"""Attacks drawn in the experiment's ROC plot (all of them would be unreadable)."""


def _evaluate_scores(scores: Tensor, is_member: Tensor, delta: float | None) -> dict[str, Any]:
    out = dict(attack_summary(scores, is_member))
    if delta is not None:
        out["empirical_epsilon"] = float(empirical_epsilon(scores, is_member, delta))
    return out


def _pooled_scores(lira: LiRA, target_stats: Tensor, is_member: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Scores of every variant over the target *and* each shadow attacked in turn with the other
    shadows as references (leave-one-out), concatenated: ``(S + 1)·N`` scores per variant. Many more
    (correlated) trials than the target alone, so AUCs near 0.5 are estimated far more tightly."""
    assert lira.shadow_stats is not None and lira.shadow_in is not None
    stats, keep = lira.shadow_stats, lira.shadow_in
    out: dict[str, tuple[Tensor, Tensor]] = {}
    labels = torch.cat([is_member, *keep.unbind(0)])
    for name, (online, fixed) in _VARIANTS.items():
        parts = [lira_scores(target_stats, stats, keep, online=online, fixed_variance=fixed)]
        for j in range(stats.shape[0]):
            rest = [i for i in range(stats.shape[0]) if i != j]
            parts.append(lira_scores(stats[j], stats[rest], keep[rest], online=online, fixed_variance=fixed))
        out[name] = (torch.cat(parts), labels)
    out["confidence"] = (torch.cat([target_stats, *stats.unbind(0)]), labels)
    return out


def _attack_target(
    name: str,
    trainer: FederatedTrainer,
    model_factory: ModelFactory,
    population: Dataset,
    members: Sequence[int],
    is_member: Tensor,
    num_shadows: int,
    seed: int,
    progress: bool,
    delta: float | None,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    t0 = time.perf_counter()
    with seeded(seed, name, "target-init"):
        target = trainer(
            model_factory(), Subset(population, list(members)), derive_seed(seed, name, "target-train")
        )
    target_seconds = time.perf_counter() - t0
    history = trainer.last_result.history
    epsilon = trainer.last_epsilon

    t0 = time.perf_counter()
    lira = LiRA(model_factory, trainer, num_shadows, seed=derive_seed(seed, name, "lira"), progress=progress)
    lira.fit_shadows(population)
    shadow_seconds = time.perf_counter() - t0

    target_stats = lira.statistics(target, population)
    results: dict[str, Any] = {
        "train_loss": float(history[-1]["train_loss"]),
        "epsilon_accounted": epsilon,
        "target_seconds": target_seconds,
        "shadow_seconds": shadow_seconds,
        "mean_stat_members": float(target_stats[is_member].mean()),
        "mean_stat_non_members": float(target_stats[~is_member].mean()),
    }
    attacks = {
        k: lira.scores_from_stats(target_stats, online=on, fixed_variance=fx)
        for k, (on, fx) in _VARIANTS.items()
    }
    attacks["confidence"] = target_stats
    attacks["loss"] = LossThreshold("loss").scores(target, population)
    for attack, scores in attacks.items():
        results[attack] = _evaluate_scores(scores, is_member, delta)
        if attack in _PLOTTED:
            fpr, tpr, _ = roc_curve(scores, is_member)
            curves[f"{name} {attack}"] = (fpr, tpr)
    if num_shadows >= 4:  # leave-one-out needs >= 1 IN and OUT shadow per sample among the others
        results["pooled"] = {
            attack: _evaluate_scores(scores, labels, delta)
            for attack, (scores, labels) in _pooled_scores(lira, target_stats, is_member).items()
        }
    return results


def run_membership_experiment(
    *,
    population_size: int = 64,
    image_size: int = 32,
    model: str = "unet",
    model_kwargs: dict[str, Any] | None = None,
    num_shadows: int = 8,
    rounds: int = 1,
    local_epochs: int = 60,
    batch_size: int = 8,
    lr: float = 0.05,
    dp_epsilon: float | None = 1.0,
    dp_delta: float = 1e-5,
    dp_max_grad_norm: float = 1.0,
    dp_local_epochs: int | None = 20,
    dp_lr: float | None = 0.01,
    undefended: bool = True,
    seed: int = 0,
    data_seed: int = 0,
    accelerator: str = "cpu",
    progress: bool = False,
    roc_path: str | None = None,
) -> dict[str, Any]:
    """Membership inference on an intentionally overfitted segmentation model, with and without DP-SGD.

    A :class:`~privfl.data.synthetic.SyntheticHistology` population of ``population_size`` images
    (``image_size``², seed ``data_seed``) is split at random into members (half: the target's
    training set) and non-members. The target — ``build_model(model, **model_kwargs)``, by default
    a 4-level U-Net with widths (8, 16, 32, 64) (deep enough to memorise 32 images; ``unet-tiny``
    barely overfits them) — is trained by :class:`FederatedTrainer`: one client, ``rounds`` rounds
    of ``local_epochs`` epochs, SGD at ``lr``, batch ``batch_size``, no augmentation. It is attacked
    with LiRA (``num_shadows`` shadows trained by the same recipe; online/offline × per-sample/fixed
    variance), the raw confidence statistic and the LOSS attack.

    With ``dp_epsilon`` the same is repeated with sample-level DP-SGD calibrated to
    ``(dp_epsilon, dp_delta)`` over the whole run (clip ``dp_max_grad_norm``; ``dp_local_epochs``
    epochs at ``dp_lr``, ``None`` for the undefended recipe's — at the undefended lr the noise makes
    SGD diverge, and fewer epochs keep opacus affordable on a CPU; seeded, non-secure noise for
    reproducibility) — target and shadows alike — and every attack's empirical ε lower bound
    (:func:`~privfl.attacks.metrics.empirical_epsilon`) is reported next to the accounted ε.
    ``undefended=False`` skips the undefended part.

    Returns a dict: ``config``; ``undefended`` and/or ``dp``, each with ``train_loss``,
    ``epsilon_accounted``, ``target_seconds``, ``shadow_seconds``, the mean statistic of members /
    non-members, per attack (``lira_online_fixed``, ``lira_online``, ``lira_offline_fixed``,
    ``lira_offline``, ``confidence``, ``loss``) the :func:`~privfl.attacks.metrics.attack_summary`
    of the target plus ``empirical_epsilon`` (at ``dp_delta``; the undefended one shows what the audit
    can detect), and ``pooled`` (``num_shadows >= 4``): the same
    summaries over the target and every shadow attacked leave-one-out by the others,
    ``(num_shadows + 1) · population_size`` scores — tighter estimates, not independent trials;
    ``seconds``. ``roc_path``: also write a log-log ROC plot of the target attacks (LiRA online / offline with
    fixed variance, LOSS) there.

    Cost (CPU, one torch thread — with tiny models extra threads mostly spin on a shared machine): the
    defaults take about 1.5 minutes (undefended ≈ 6 s per model, DP-SGD ≈ 5 s, 2 × 9 models).
    """
    if population_size < 4:
        raise ValueError(f"population_size must be >= 4, got {population_size}")
    if not undefended and dp_epsilon is None:
        raise ValueError("nothing to run: undefended=False and dp_epsilon=None")
    t_start = time.perf_counter()
    if model_kwargs is None:
        model_kwargs = {"widths": (8, 16, 32, 64)} if model == "unet" else {}
    config = {
        k: v
        for k, v in locals().items()
        if k not in ("t_start",)
        and not k.startswith("_")
        and isinstance(v, (int, float, str, dict, type(None)))
    }
    population = SyntheticHistology(population_size, size=image_size, seed=data_seed)
    rng = np.random.default_rng(derive_seed(seed, "target-members"))
    members = np.sort(rng.permutation(population_size)[: population_size // 2]).tolist()
    is_member = torch.zeros(population_size, dtype=torch.bool)
    is_member[members] = True
    num_classes = SyntheticHistology.num_classes

    def factory() -> nn.Module:
        return build_model(model, num_classes=num_classes, **model_kwargs)

    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # ROC (fpr, tpr) per attack
    cfg = ClientConfig(local_epochs=local_epochs, batch_size=batch_size, lr=lr)
    out: dict[str, Any] = {"config": config}

    def attack(name: str, trainer: FederatedTrainer) -> dict[str, Any]:
        return _attack_target(
            name,
            trainer,
            factory,
            population,
            members,
            is_member,
            num_shadows,
            seed,
            progress,
            dp_delta,
            curves,
        )

    if undefended:
        plain = FederatedTrainer(rounds, config=cfg, accelerator=accelerator, num_classes=num_classes)
        out["undefended"] = attack("undefended", plain)
    if dp_epsilon is not None:
        dp_cfg = dataclasses.replace(
            cfg,
            local_epochs=local_epochs if dp_local_epochs is None else dp_local_epochs,
            lr=lr if dp_lr is None else dp_lr,
        )
        dp = DPSGD(
            max_grad_norm=dp_max_grad_norm,
            target_epsilon=dp_epsilon,
            delta=dp_delta,
            noise=SeededNoise(derive_seed(seed, "dp-noise")),
        )
        private = FederatedTrainer(
            rounds, config=dp_cfg, accelerator=accelerator, dp_sgd=dp, num_classes=num_classes
        )
        out["dp"] = attack("dp", private)
    if roc_path is not None:
        plot_roc(curves, roc_path, loglog=True)
    out["seconds"] = time.perf_counter() - t_start
    return out
