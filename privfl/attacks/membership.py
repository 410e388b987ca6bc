"""Membership inference against segmentation models: the LOSS threshold attack and LiRA.

Threat model
------------
The attacker wants to know whether a given sample — an image *with its mask* — was in the training
set of a model. They have

* **query access to the model's logits** (black box: the per-pixel class logits of any image they
  submit; no gradients, no weights), here on the final trained (global) model;
* **the population**: a set of candidate samples, each of which may or may not have been trained on
  (in the experiments: the target trained on a random half of it);
* **the training recipe** (LiRA only): architecture, optimiser, hyper-parameters, number of rounds,
  DP-SGD settings — everything but the target's data, initialisation and randomness — so they can
  train *shadow models* that behave like the target. Shadows are trained with privfl's own trainer
  (:func:`~privfl.fl.loop.run_federated`) through the same ``train_fn`` as the target.

The attacks output a **score per sample, higher = more likely a member**; turn them into AUC / TPR
at low FPR with :mod:`privfl.attacks.metrics`.

Per-sample statistic
--------------------
For segmentation the statistic is the pixel-averaged *logit-scaled confidence* of the true class
(Carlini et al. 2022, applied per pixel): with ``p`` the softmax probability of the true class
``y`` at a pixel, ``φ = log(p / (1 − p))``, computed stably as ``z_y − logsumexp_{k≠y} z_k`` from the
logits ``z``, and averaged over the pixels of the image (:func:`segmentation_scores`). Unlike ``p``
itself, ``φ`` is roughly Gaussian across models, which is what LiRA's parametric fit assumes.

Attacks
-------
* :class:`LossThreshold` (Yeom et al. 2018): score ``−loss`` (or ``φ``); a sample is called a
  member when its score is above a threshold (by default the members' mean score, i.e. the average
  training loss; or the best threshold on a labelled calibration set).
* :class:`LiRA` (Carlini et al. 2022, "Membership Inference Attacks From First Principles"):
  ``num_shadows`` shadow models are trained on random halves of the population such that every
  sample is IN the training set of exactly ``⌊num_shadows / 2⌋`` shadows. Per sample, the IN and
  OUT statistics are fitted by Gaussians; the target's statistic is scored by the likelihood ratio
  (online) or by the one-sided OUT-only test (offline). The pure statistics step is
  :func:`lira_scores` (no models), so it can be tested and reused on precomputed statistics.

Not implemented: query augmentation (Carlini et al. average over flipped / shifted queries) and
the Shokri et al. (2017) shadow-model *classifier* attack (LiRA supersedes it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from privfl.progress import progress_bar
from privfl.seeding import derive_seed, seeded

__all__ = [
    "LiRA",
    "LossThreshold",
    "lira_scores",
    "logit_confidence",
    "sample_losses",
    "segmentation_scores",
    "shadow_membership",
]

ModelFactory = Callable[[], nn.Module]
"""Builds a fresh, untrained model (called under a seeded torch RNG)."""

TrainFn = Callable[[nn.Module, Dataset, int], nn.Module]
"""``train_fn(fresh model, training set, seed) -> trained model``: the training recipe. The target
and every shadow must be trained by the same one (e.g. one
:class:`~privfl.experiments.membership.FederatedTrainer`)."""

Statistic = Callable[[nn.Module, Dataset], Tensor]
"""``statistic(model, dataset) -> (N,)`` per-sample statistic, higher for members."""


# --------------------------------------------------------------------------------------------
# per-sample statistics
# --------------------------------------------------------------------------------------------


def logit_confidence(logits: Tensor, target: Tensor) -> Tensor:
    """Per-pixel logit-scaled confidence of the true class, ``log(p_y / (1 − p_y))``.

    Computed as ``z_y − logsumexp_{k≠y} z_k`` (exact, no ``log(1 − p)`` cancellation), in float32 or
    wider. ``logits``: ``(B, C, H, W)`` (or ``(B, C)``); ``target``: ``(B, H, W)`` (or ``(B,)``)
    integer classes in ``0..C−1``. Returns a tensor of ``target``'s shape.

    Raises:
        ValueError: shapes that do not match, ``C < 2``, or classes outside ``0..C−1``.
    """
    if logits.ndim < 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, C, ...) with C >= 2 classes, got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"dataset/model mismatch: logits {tuple(logits.shape)} need targets of shape {expected}, "
            f"got {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {target.dtype}")
    num_classes = logits.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"dataset/model mismatch: target classes must be in 0..{num_classes - 1}, got "
            f"{int(target.min())}..{int(target.max())}"
        )
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    t = target.long().unsqueeze(1)
    z_true = z.gather(1, t).squeeze(1)
    others = z.scatter(1, t, float("-inf"))
    return z_true - torch.logsumexp(others, dim=1)


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _eval_batches(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device | str | None):
    """Yield ``(logits, masks)`` per batch, with ``model`` in eval mode and no gradients (the mode
    is restored afterwards)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the dataset is empty")
    dev = _model_device(model, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
                    raise ValueError("the dataset must yield (image, mask) pairs")
                images, masks = batch
                out = model(images.to(dev))
                if not isinstance(out, Tensor):
                    raise ValueError(
                        f"the model must return a logit tensor in eval mode, got {type(out).__name__}"
                    )
                if out.ndim != 4:
                    raise ValueError(
                        f"dataset/model mismatch: expected (B, C, H, W) logits, got {tuple(out.shape)}"
                    )
                yield out, masks.to(out.device)
    finally:
        model.train(was_training)


def segmentation_scores(
    model: nn.Module, dataset: Dataset, batch_size: int = 16, device: torch.device | str | None = None
) -> Tensor:
    """Per-sample statistic: the pixel mean of :func:`logit_confidence` of the true class.

    ``model`` is evaluated in eval mode (its mode is restored afterwards) on ``dataset``'s
    ``(image 3×H×W, mask H×W)`` pairs; ``device`` defaults to the model's. Returns a float64 CPU
    tensor of shape ``(len(dataset),)``; higher means the model fits the sample better.

    Raises:
        ValueError: empty dataset, a model output that is not ``(B, C, H, W)`` logits, or masks that
            do not match the output (spatial size, classes outside ``0..C−1``).
    """
    out = [
        logit_confidence(logits, masks).flatten(1).mean(dim=1).double().cpu()
        for logits, masks in _eval_batches(model, dataset, batch_size, device)
    ]
    return torch.cat(out)


def sample_losses(
    model: nn.Module,
    dataset: Dataset,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-sample loss of ``model`` (eval mode) on ``dataset``, float64 CPU tensor ``(N,)``.

    ``loss=None``: pixel-mean cross-entropy. Otherwise ``loss(logits, mask)`` is applied to each
    sample alone (a batch of one), so batch-coupled losses such as the reference soft Dice give
    per-sample values (e.g. pass ``CEDiceLoss()`` to score with the training loss).
    """
    out: list[Tensor] = []
    for logits, masks in _eval_batches(model, dataset, batch_size, device):
        if logits.shape[0] != masks.shape[0] or logits.shape[2:] != masks.shape[1:]:
            raise ValueError(
                f"dataset/model mismatch: logits {tuple(logits.shape)}, masks {tuple(masks.shape)}"
            )
        if loss is None:
            logit_confidence(logits, masks)  # validates the classes
            out.append(
                F.cross_entropy(logits.float(), masks.long(), reduction="none")
                .flatten(1)
                .mean(1)
                .double()
                .cpu()
            )
        else:
            out.append(
                torch.stack(
                    [
                        torch.as_tensor(loss(logits[i : i + 1], masks[i : i + 1].long())).reshape(())
                        for i in range(logits.shape[0])
                    ]
                )
                .double()
                .cpu()
            )
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# LOSS threshold (Yeom et al. 2018)
# --------------------------------------------------------------------------------------------


class LossThreshold:
    """The LOSS attack (Yeom et al. 2018): members have lower loss, so ``score = −loss``.

    Threat model: query access to the model's logits and the sample's mask; no shadow models.

    Args:
        statistic: ``"loss"`` (score ``−sample_losses``) or ``"confidence"`` (score = the
            pixel-mean logit-scaled confidence of :func:`segmentation_scores`).
        loss: the per-sample loss for ``statistic="loss"`` (default pixel-mean cross-entropy).

    The scores alone give the ROC (the usual way to report the attack). For a decision rule,
    :meth:`fit` sets ``threshold``: by default the members' mean score (Yeom et al.: "the average
    training loss"), or, given non-members too, the threshold of best balanced accuracy on that
    calibration set. :meth:`predict` then calls ``score >= threshold`` a member.
    """

    def __init__(
        self,
        statistic: Literal["loss", "confidence"] = "loss",
        loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        batch_size: int = 16,
        device: torch.device | str | None = None,
    ) -> None:
        if statistic not in ("loss", "confidence"):
            raise ValueError(f"statistic must be 'loss' or 'confidence', got {statistic!r}")
        self.statistic = statistic
        self.loss = loss
        self.batch_size = batch_size
        self.device = device
        self.threshold: float | None = None

    def scores(self, model: nn.Module, dataset: Dataset) -> Tensor:
        """Per-sample membership scores ``(N,)``, higher = more likely a member."""
        if self.statistic == "confidence":
            return segmentation_scores(model, dataset, self.batch_size, self.device)
        return -sample_losses(model, dataset, self.loss, self.batch_size, self.device)

    def fit_threshold(self, member_scores: Tensor, non_member_scores: Tensor | None = None) -> LossThreshold:
        """Set ``threshold`` from precomputed scores (see the class docstring); returns ``self``."""
        m = torch.as_tensor(member_scores, dtype=torch.float64).flatten()
        if m.numel() == 0 or not torch.isfinite(m).all():
            raise ValueError("member_scores must be non-empty and finite")
        if non_member_scores is None:
            self.threshold = float(m.mean())
            return self
        n = torch.as_tensor(non_member_scores, dtype=torch.float64).flatten()
        if n.numel() == 0 or not torch.isfinite(n).all():
            raise ValueError("non_member_scores must be non-empty and finite")
        cand = torch.unique(torch.cat([m, n]))  # sorted
        tpr = (m[None, :] >= cand[:, None]).double().mean(1)
        tnr = (n[None, :] < cand[:, None]).double().mean(1)
        best = int(torch.argmax(tpr + tnr))
        # place the threshold midway to the next-lower candidate so that unseen ties are robust
        lower = cand[best - 1] if best > 0 else cand[best] - 1.0
        self.threshold = float((cand[best] + lower) / 2)
        return self

    def fit(self, model: nn.Module, members: Dataset, non_members: Dataset | None = None) -> LossThreshold:
        """Calibrate ``threshold`` on known members (and optionally non-members); returns ``self``."""
        return self.fit_threshold(
            self.scores(model, members), None if non_members is None else self.scores(model, non_members)
        )

    def predict(self, model: nn.Module, dataset: Dataset) -> Tensor:
        """Boolean ``(N,)``: ``score >= threshold`` (needs :meth:`fit` first)."""
        if self.threshold is None:
            raise RuntimeError("call fit() or fit_threshold() before predict()")
        return self.scores(model, dataset) >= self.threshold


# --------------------------------------------------------------------------------------------
# LiRA (Carlini et al. 2022)
# --------------------------------------------------------------------------------------------


def shadow_membership(num_shadows: int, num_samples: int, seed: int) -> Tensor:
    """Boolean ``(num_shadows, num_samples)`` IN matrix: every sample (column) is IN for exactly
    ``num_shadows // 2`` shadows, chosen uniformly at random (Carlini et al.'s ``keep`` matrix), so
    each shadow trains on about half the population. Deterministic in ``seed``."""
    if num_shadows < 2:
        raise ValueError(
            f"LiRA needs num_shadows >= 2 (IN and OUT models for every sample), got {num_shadows}"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rng = np.random.default_rng(derive_seed(seed, "lira-shadow-membership"))
    order = rng.random((num_shadows, num_samples)).argsort(axis=0).argsort(axis=0)
    return torch.from_numpy(order < num_shadows // 2)


def _normal_logpdf(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return -torch.log(std) - 0.5 * ((x - mean) / std) ** 2


def lira_scores(
    target_stats: Tensor,
    shadow_stats: Tensor,
    shadow_in: Tensor,
    *,
    online: bool = True,
    fixed_variance: bool = False,
    min_std: float = 1e-6,
) -> Tensor:
    """LiRA's per-sample test from precomputed statistics (no models involved).

    Args:
        target_stats: ``(N,)`` statistic of each sample on the target model.
        shadow_stats: ``(S, N)`` statistic of each sample on each shadow model.
        shadow_in: ``(S, N)`` bool, whether the sample was in the shadow's training set.
        online: score ``log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²)`` (the likelihood ratio);
            otherwise the offline one-sided test ``log Φ((φ − μ_out) / σ_out)`` (OUT shadows only;
            ``Φ`` is the standard normal CDF).
        fixed_variance: one σ shared by all samples (and, online, by IN and OUT): the pooled
            within-sample standard deviation of the shadow statistics around their per-sample
            IN / OUT means. Otherwise σ per sample and side (population std, ``ddof=0``). Carlini
            et al. recommend the fixed variance with few (< ~64) shadows.
        min_std: lower bound on every σ (a sample with one shadow on a side has σ = 0).

    Returns:
        float64 ``(N,)`` scores, higher = more likely a member.

    Raises:
        ValueError: shapes that do not match, fewer than 2 shadows, a sample without an OUT shadow
            (or, online, without an IN shadow), non-finite statistics.
    """
    x = torch.as_tensor(target_stats).double().cpu()
    s = torch.as_tensor(shadow_stats).double().cpu()
    keep = torch.as_tensor(shadow_in).cpu()
    if keep.dtype != torch.bool:
        raise ValueError(f"shadow_in must be a bool tensor, got {keep.dtype}")
    if s.ndim != 2 or x.ndim != 1 or keep.shape != s.shape or s.shape[1] != x.shape[0]:
        raise ValueError(
            f"need target_stats (N,), shadow_stats and shadow_in (S, N); got {tuple(x.shape)}, "
            f"{tuple(s.shape)}, {tuple(keep.shape)}"
        )
    if s.shape[0] < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models, got {s.shape[0]}")
    if not (torch.isfinite(x).all() and torch.isfinite(s).all()):
        raise ValueError("statistics must be finite")
    if not min_std > 0:
        raise ValueError(f"min_std must be > 0, got {min_std}")

    def side(mask: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
        count = mask.sum(0)
        if (count == 0).any():
            raise ValueError(f"{int((count == 0).sum())} sample(s) have no {name} shadow model")
        w = mask.double()
        mean = (w * s).sum(0) / count
        sq = (w * (s - mean) ** 2).sum(0)  # per-sample sum of squared residuals
        return mean, sq, count.double()

    mu_out, sq_out, n_out = side(~keep, "OUT")
    if online:
        mu_in, sq_in, n_in = side(keep, "IN")
        if fixed_variance:
            sd = torch.sqrt((sq_in.sum() + sq_out.sum()) / (n_in.sum() + n_out.sum())).clamp_min(min_std)
            sd_in = sd_out = sd.expand_as(x)
        else:
            sd_in = torch.sqrt(sq_in / n_in).clamp_min(min_std)
            sd_out = torch.sqrt(sq_out / n_out).clamp_min(min_std)
        return _normal_logpdf(x, mu_in, sd_in) - _normal_logpdf(x, mu_out, sd_out)
    if fixed_variance:
        sd_out = torch.sqrt(sq_out.sum() / n_out.sum()).clamp_min(min_std).expand_as(x)
    else:
        sd_out = torch.sqrt(sq_out / n_out).clamp_min(min_std)
    return torch.special.log_ndtr((x - mu_out) / sd_out)


class LiRA:
    """The Likelihood Ratio Attack (Carlini et al. 2022) with shadow models.

    Threat model: query access to the target's logits; the attacker knows the population (every
    candidate sample with its mask) and the training recipe, and trains ``num_shadows`` shadow
    models with it on random halves of the population (:func:`shadow_membership`).

    Args:
        model_factory: builds a fresh model (the target's architecture); called under a seeded torch
            RNG, so shadow initialisations are deterministic.
        train_fn: ``(model, train subset, seed) -> trained model``; must be the recipe the target was
            trained with (e.g. the same :class:`~privfl.experiments.membership.FederatedTrainer`,
            DP-SGD settings included).
        num_shadows: shadow models (>= 2; every sample is IN for ``num_shadows // 2`` of them).
        online: default variant for :meth:`scores` (online IN/OUT likelihood ratio, or offline).
        fixed_variance: default variance model for :meth:`scores` (see :func:`lira_scores`).
        seed: everything random (splits, initialisations, training seeds) derives from it.
        statistic: per-sample statistic, default :func:`segmentation_scores`.

    After :meth:`fit_shadows` the attack keeps only ``shadow_stats`` / ``shadow_in`` (``(S, N)``),
    not the models. Both variants can be scored from one set of shadows.
    """

    def __init__(
        self,
        model_factory: ModelFactory,
        train_fn: TrainFn,
        num_shadows: int = 16,
        *,
        online: bool = True,
        fixed_variance: bool = False,
        seed: int = 0,
        statistic: Statistic | None = None,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> None:
        if int(num_shadows) != num_shadows or num_shadows < 2:
            raise ValueError(
                f"LiRA needs num_shadows >= 2 (IN and OUT models for every sample), got {num_shadows}"
            )
        self.model_factory = model_factory
        self.train_fn = train_fn
        self.num_shadows = int(num_shadows)
        self.online = online
        self.fixed_variance = fixed_variance
        self.seed = int(seed)
        self.batch_size = batch_size
        self.device = device
        self.statistic: Statistic = statistic or (
            lambda model, data: segmentation_scores(model, data, self.batch_size, self.device)
        )
        self.progress = progress
        self.shadow_in: Tensor | None = None
        self.shadow_stats: Tensor | None = None
        self.shadow_seconds: list[float] = []

    def fit_shadows(self, population: Dataset) -> LiRA:
        """Train the shadows on their halves of ``population`` and record every sample's statistic
        on each; returns ``self``."""
        n = len(population)  # type: ignore[arg-type]
        keep = shadow_membership(self.num_shadows, n, self.seed)
        stats = torch.empty(self.num_shadows, n, dtype=torch.float64)
        self.shadow_seconds = []
        with progress_bar(self.progress, "LiRA shadows", status=None) as bar:
            task = bar.add_task("shadows", total=self.num_shadows)
            for i in range(self.num_shadows):
                t0 = time.perf_counter()
                members = torch.nonzero(keep[i]).flatten().tolist()
                if not members:
                    raise ValueError(f"shadow {i} got an empty training half (population of {n})")
                with seeded(self.seed, "lira-shadow", i, "init"):
                    model = self.model_factory()
                    model = self.train_fn(
                        model, Subset(population, members), derive_seed(self.seed, "lira-shadow", i, "train")
                    )
                stats[i] = self.statistics(model, population)
                del model
                self.shadow_seconds.append(time.perf_counter() - t0)
                bar.advance(task)
        self.shadow_in, self.shadow_stats = keep, stats
        return self

    def statistics(self, model: nn.Module, population: Dataset) -> Tensor:
        """The per-sample statistic of ``population`` on ``model``, float64 CPU ``(N,)`` (what
        :meth:`scores_from_stats` takes for the target model)."""
        out = torch.as_tensor(self.statistic(model, population)).double().cpu().flatten()
        if out.shape[0] != len(population):  # type: ignore[arg-type]
            raise ValueError(f"the statistic returned {out.shape[0]} values for {len(population)} samples")  # type: ignore[arg-type]
        return out

    def scores(
        self,
        target_model: nn.Module,
        population: Dataset,
        *,
        online: bool | None = None,
        fixed_variance: bool | None = None,
    ) -> Tensor:
        """Membership scores ``(N,)`` of ``population`` (the one the shadows were fitted on) against
        ``target_model``, higher = more likely a member. ``online`` / ``fixed_variance`` override the
        attack's defaults."""
        if self.shadow_stats is None or self.shadow_in is None:
            raise RuntimeError("call fit_shadows(population) before scores()")
        if len(population) != self.shadow_stats.shape[1]:  # type: ignore[arg-type]
            raise ValueError(
                f"population has {len(population)} samples, the shadows were fitted on "  # type: ignore[arg-type]
                f"{self.shadow_stats.shape[1]}"
            )
        return self.scores_from_stats(
            self.statistics(target_model, population), online=online, fixed_variance=fixed_variance
        )

    def scores_from_stats(
        self, target_stats: Tensor, *, online: bool | None = None, fixed_variance: bool | None = None
    ) -> Tensor:
        """:func:`lira_scores` of precomputed target statistics against the fitted shadows."""
        if self.shadow_stats is None or self.shadow_in is None:
            raise RuntimeError("call fit_shadows(population) before scores()")
        return lira_scores(
            target_stats,
            self.shadow_stats,
            self.shadow_in,
            online=self.online if online is None else online,
            fixed_variance=self.fixed_variance if fixed_variance is None else fixed_variance,
        )
