"""Membership inference against released synthetic data: the distance to the closest record.

Threat model: the attacker holds what a data-sharing method releases — synthetic records, or a
generator it can sample from as often as it likes — and a candidate record (an embedding and its
label). It guesses "member of the training data" when the candidate lies close to some synthetic
record of its class: a generator that memorised a training record reproduces something near it.
The score is ``−min_j ||x − s_j||₂`` over the synthetic records ``s_j`` of the candidate's class
(all records if ``by_class=False``); higher means more likely a member. This is the DCR
("distance to closest record") attack of the synthetic-data literature (e.g. Chen et al., GAN-Leaks,
CCS 2020, full black-box). Feed the scores to :func:`privfl.attacks.metrics.attack_summary` for
the AUC and the TPR at low FPR.

Differential privacy bounds it like any attack: a generator trained with (ε, δ)-DP releases
synthetic data that is (ε, δ)-DP too (post-processing), so its TPR at FPR α is at most
``e^ε·α + δ``.
"""

from __future__ import annotations

import torch

__all__ = ["distance_to_closest_record"]


def distance_to_closest_record(
    candidates: torch.Tensor,
    synthetic: torch.Tensor,
    candidate_labels: torch.Tensor | None = None,
    synthetic_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Membership scores ``(N,)`` (float64): minus the L2 distance of each candidate to its closest
    synthetic record — of the same label when both label tensors are given.

    Args:
        candidates: ``(N, D)`` records whose membership is guessed.
        synthetic: ``(M, D)`` released synthetic records.
        candidate_labels: ``(N,)`` class labels of the candidates, or ``None`` (then also for the
            synthetic records).
        synthetic_labels: ``(M,)`` class labels of the synthetic records, or ``None``.

    Raises:
        ValueError: shapes that do not match, only one label tensor, or a candidate class with no
            synthetic record.
    """
    x = torch.as_tensor(candidates, dtype=torch.float64)
    s = torch.as_tensor(synthetic, dtype=torch.float64)
    if x.ndim != 2 or s.ndim != 2 or x.shape[1] != s.shape[1] or not len(s):
        raise ValueError(
            f"need (N, D) candidates and non-empty (M, D) synthetic records, got {tuple(x.shape)} "
            f"and {tuple(s.shape)}"
        )
    if (candidate_labels is None) != (synthetic_labels is None):
        raise ValueError("give both label tensors or neither")
    dist = torch.cdist(x, s)
    if candidate_labels is not None and synthetic_labels is not None:
        cy = torch.as_tensor(candidate_labels).reshape(-1)
        sy = torch.as_tensor(synthetic_labels).reshape(-1)
        if len(cy) != len(x) or len(sy) != len(s):
            raise ValueError("one label per record")
        missing = sorted(set(cy.tolist()) - set(sy.tolist()))
        if missing:
            raise ValueError(f"no synthetic record of class(es) {missing}")
        dist = dist.masked_fill(cy[:, None] != sy[None, :], float("inf"))
    return -dist.min(dim=1).values
