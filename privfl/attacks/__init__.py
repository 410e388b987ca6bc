"""Attacks that test privfl's defenses: gradient inversion, membership inference, and their metrics.

* :mod:`privfl.attacks.inversion` — :class:`InvertingGradients` (Geiping et al. 2020) reconstructs
  a client's images from the update it shared (a gradient or a multi-step FedAvg delta, defended
  or not); :func:`observe_update` produces ground-truth updates.
* :mod:`privfl.attacks.membership` — :class:`LossThreshold` (Yeom et al. 2018) and :class:`LiRA`
  (Carlini et al. 2022) with shadow models trained by any recipe (e.g. privfl's own FL loop:
  :class:`~privfl.experiments.membership.FederatedTrainer`).
* :mod:`privfl.attacks.synthetic` — :func:`distance_to_closest_record`: membership inference
  against released synthetic data (what data-sharing methods such as DP-CVAE release).
* :mod:`privfl.attacks.gradient_sign` — :class:`GradientSignAttack` and :func:`bisect_site`:
  real images from the gradients Distributed Synthetic Learning sites return (passive and active
  server).
* :mod:`privfl.attacks.metrics` — PSNR, SSIM, feature MSE, batch matching; ROC, AUC, TPR at low
  FPR, log-log ROC plots and the empirical ε lower bound.

Each attack's module docstring states its threat model. See ``docs/attacks.md``. The experiments
that run these attacks against privfl's defenses are in :mod:`privfl.experiments`.
"""

from privfl.attacks.gradient_sign import GradientSignAttack, bisect_site, sign_vote_estimate
from privfl.attacks.inversion import (
    InversionResult,
    InvertingGradients,
    LocalRecipe,
    observe_update,
    recover_labels,
    total_variation,
)
from privfl.attacks.membership import (
    LiRA,
    LossThreshold,
    lira_scores,
    logit_confidence,
    segmentation_scores,
)
from privfl.attacks.metrics import (
    attack_summary,
    auc,
    empirical_epsilon,
    match_batches,
    mean_psnr,
    plot_roc,
    psnr,
    roc_curve,
    ssim,
    tpr_at_fpr,
)
from privfl.attacks.synthetic import distance_to_closest_record

__all__ = [
    "GradientSignAttack",
    "InversionResult",
    "InvertingGradients",
    "LiRA",
    "LocalRecipe",
    "LossThreshold",
    "attack_summary",
    "auc",
    "bisect_site",
    "distance_to_closest_record",
    "empirical_epsilon",
    "lira_scores",
    "logit_confidence",
    "match_batches",
    "mean_psnr",
    "observe_update",
    "plot_roc",
    "psnr",
    "recover_labels",
    "roc_curve",
    "segmentation_scores",
    "sign_vote_estimate",
    "ssim",
    "total_variation",
    "tpr_at_fpr",
]
