"""Metrics for the attacks: how well an image was reconstructed, how well members were told apart.

Reconstruction (gradient inversion)
    :func:`psnr` (dB), :func:`ssim` (unitless, scikit-image's implementation) and :func:`feature_mse`
    (mean squared distance in some feature space) score each reconstructed image against its true
    image. A batch attack returns its images in an arbitrary order, so :func:`match_batches` first
    pairs them with the true images by the Hungarian method (maximum total PSNR, or minimum total
    MSE).

Membership inference
    Scores are oriented so that **higher means "member"**. :func:`roc_curve`, :func:`auc`,
    :func:`tpr_at_fpr` and :func:`attack_summary` give the numbers LiRA (Carlini et al. 2022) reports:
    AUC, TPR at 0.1% and 1% FPR, balanced accuracy; :func:`plot_roc` draws the log-log ROC.

Empirical ε
    :func:`empirical_epsilon` turns an attack's error rates into a lower bound on the ε of the
    training procedure, ``ε_LB = max(ln((1−δ−FPR)/FNR), ln((1−δ−FNR)/FPR), 0)`` with FPR and FNR
    replaced by Clopper–Pearson upper bounds (:func:`privfl.audit.clopper_pearson`,
    :func:`privfl.audit.epsilon_lower_bound`). It must never exceed the accountant's ε.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from privfl.audit import choose_threshold, clopper_pearson, epsilon_lower_bound

__all__ = [
    "attack_summary",
    "auc",
    "empirical_epsilon",
    "feature_mse",
    "match_batches",
    "mean_psnr",
    "plot_roc",
    "psnr",
    "roc_curve",
    "ssim",
    "tpr_at_fpr",
]

Tensor = torch.Tensor

#: SSIM window side (scikit-image's default); shrunk to the largest odd size that fits smaller images.
_SSIM_WIN = 7


# --------------------------------------------------------------------------------------------
# image reconstruction
# --------------------------------------------------------------------------------------------


def _check_range(data_range: float) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float, np.integer, np.floating)):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    r = float(data_range)
    if not (math.isfinite(r) and r > 0.0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    return r


def _as_batch(name: str, x: Tensor) -> Tensor:
    """``(C, H, W)`` or ``(B, C, H, W)`` tensor -> ``(B, C, H, W)`` float64 (validated)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name} must be (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got {x.dtype}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _pair(reconstructed: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    r, t = _as_batch("reconstructed", reconstructed), _as_batch("target", target)
    if r.shape != t.shape:
        raise ValueError(
            f"reconstructed and target must have the same shape, got "
            f"{tuple(reconstructed.shape)} and {tuple(target.shape)}"
        )
    return r, t.to(r.device)


def _psnr_from_mse(mse: Tensor, data_range: float) -> Tensor:
    """``10·log10(range² / MSE)`` in dB; +inf where the MSE is 0."""
    return 10.0 * torch.log10(data_range**2 / mse)  # x / 0 = inf -> log10(inf) = inf


def psnr(reconstructed: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio of each reconstructed image against its true image, in dB.

    ``PSNR = 10·log10(data_range² / MSE)`` with the MSE averaged over all channels and pixels of one
    image. Images are expected in ``[0, data_range]`` (values outside are *not* clipped). Identical
    images give ``+inf``.

    Args:
        reconstructed: ``(B, C, H, W)`` or ``(C, H, W)`` images (any real dtype, any device).
        target: true images, same shape.
        data_range: width of the valid pixel range (1 for images in [0, 1], 255 for 8-bit images).

    Returns:
        ``(B,)`` float64 tensor of PSNRs in dB on ``reconstructed``'s device (``(1,)`` for one image).

    Raises:
        ValueError: shapes differ or are not 3-/4-D, empty or non-finite images, ``data_range`` <= 0.
        TypeError: an input is not a tensor.
    """
    dr = _check_range(data_range)
    r, t = _pair(reconstructed, target)
    return _psnr_from_mse((r - t).square().mean(dim=(1, 2, 3)), dr)


def mean_psnr(reconstructed: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """Mean over the batch of the per-image :func:`psnr`, in dB (``inf`` if any pair is identical)."""
    return float(psnr(reconstructed, target, data_range).mean())


def ssim(reconstructed: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity (Wang et al. 2004) of each reconstructed image against its true image.

    Computed by :func:`skimage.metrics.structural_similarity` per image with ``channel_axis=0``
    (the mean SSIM over channels and windows), a 7×7 uniform window (scikit-image's default) and
    ``K1 = 0.01``, ``K2 = 0.03``. For images with a side shorter than 7 pixels the window shrinks to
    the largest odd size that fits (at least 3). Unitless, in ``[-1, 1]``; identical images give 1.
    Runs on the CPU (inputs on a GPU are copied).

    Args:
        reconstructed: ``(B, C, H, W)`` or ``(C, H, W)`` images in ``[0, data_range]``.
        target: true images, same shape.
        data_range: width of the valid pixel range (sets SSIM's stabilising constants).

    Returns:
        ``(B,)`` float64 tensor on ``reconstructed``'s device.

    Raises:
        ValueError: as :func:`psnr`, and images with a side shorter than 3 pixels.
    """
    from skimage.metrics import structural_similarity

    dr = _check_range(data_range)
    r, t = _pair(reconstructed, target)
    side = min(r.shape[-2], r.shape[-1])
    if side < 3:
        raise ValueError(f"ssim needs images of at least 3x3 pixels, got {tuple(r.shape[-2:])}")
    win = min(_SSIM_WIN, side if side % 2 else side - 1)
    rn, tn = r.cpu().numpy(), t.cpu().numpy()
    vals = [structural_similarity(a, b, data_range=dr, channel_axis=0, win_size=win) for a, b in zip(rn, tn)]
    return torch.tensor(vals, dtype=torch.float64, device=r.device)


def feature_mse(reconstructed: Tensor, target: Tensor, feature_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Mean squared distance between the features of each reconstructed and true image.

    ``feature_fn`` maps a ``(B, C, H, W)`` batch to ``(B, ...)`` features (e.g. the penultimate
    layer of a network); it is called once on each batch, under :func:`torch.no_grad`, with the
    inputs as given (dtype and device unchanged). The squared difference is averaged over all
    feature entries of an image, so the unit is the square of the features' unit.

    Returns:
        ``(B,)`` float64 tensor on the features' device.

    Raises:
        ValueError: shapes differ, non-finite images, or ``feature_fn`` returns tensors whose shapes
            differ or whose first dimension is not ``B``.
        TypeError: an input is not a tensor, ``feature_fn`` is not callable or returns no tensor.
    """
    if not callable(feature_fn):
        raise TypeError(f"feature_fn must be callable, got {type(feature_fn).__name__}")
    _pair(reconstructed, target)  # validation only
    rec = reconstructed.unsqueeze(0) if reconstructed.dim() == 3 else reconstructed
    tgt = target.unsqueeze(0) if target.dim() == 3 else target
    b = rec.shape[0]
    with torch.no_grad():
        fr, ft = feature_fn(rec), feature_fn(tgt.to(rec.device))
    if not isinstance(fr, torch.Tensor) or not isinstance(ft, torch.Tensor):
        raise TypeError("feature_fn must return tensors")
    if fr.shape != ft.shape or fr.dim() == 0 or fr.shape[0] != b:
        raise ValueError(
            f"feature_fn must return (B={b}, ...) features of equal shapes, got "
            f"{tuple(fr.shape)} and {tuple(ft.shape)}"
        )
    d = (fr.detach().to(torch.float64) - ft.detach().to(device=fr.device, dtype=torch.float64)).square()
    return d.reshape(b, -1).mean(dim=1)


def match_batches(
    reconstructed: Tensor, target: Tensor, metric: str = "psnr", data_range: float = 1.0
) -> tuple[list[int], Tensor]:
    """Pair reconstructed images with true images by the Hungarian method.

    Solves the assignment problem (:func:`scipy.optimize.linear_sum_assignment`) on the pairwise
    per-image MSE: ``metric="psnr"`` maximises the total PSNR (minimises ``Σ log MSE``; an exact
    match, MSE 0, is preferred over any other), ``metric="mse"`` minimises the total MSE. The two
    can differ when errors are unequal.

    Args:
        reconstructed: ``(R, C, H, W)`` reconstructions (or one ``(C, H, W)`` image), in
            ``[0, data_range]``.
        target: ``(B, C, H, W)`` true images with ``B <= R`` (or one image); extra reconstructions
            stay unmatched.
        metric: ``"psnr"`` or ``"mse"``.
        data_range: width of the pixel range, for the reported PSNRs only (the matching does not
            depend on it).

    Returns:
        ``(perm, scores)``: ``perm[i]`` is the index into ``reconstructed`` matched to ``target[i]``
        (distinct indices); ``scores[i]`` is that pair's PSNR in dB for ``"psnr"``,
        or its MSE for ``"mse"``, as a ``(B,)`` float64 tensor.

    Raises:
        ValueError: unknown ``metric``, image shapes differ, fewer reconstructions than targets,
            non-finite images, ``data_range`` <= 0.
    """
    dr = _check_range(data_range)
    if metric not in ("psnr", "mse"):
        raise ValueError(f"match_batches: metric must be 'psnr' or 'mse', got {metric!r}")
    r, t = _as_batch("reconstructed", reconstructed), _as_batch("target", target)
    if r.shape[1:] != t.shape[1:]:
        raise ValueError(f"match_batches: image shapes differ: {tuple(r.shape[1:])} and {tuple(t.shape[1:])}")
    if r.shape[0] < t.shape[0]:
        raise ValueError(f"match_batches: {r.shape[0]} reconstructions cannot cover {t.shape[0]} targets")
    t = t.to(r.device)
    # (B, R) pairwise MSE, one target at a time (bounded memory, exact 0 for identical images)
    mse = torch.stack([(r - ti).square().mean(dim=(1, 2, 3)) for ti in t]).cpu().numpy()
    cost = np.log(np.maximum(mse, np.finfo(np.float64).tiny)) if metric == "psnr" else mse
    rows, cols = linear_sum_assignment(cost)
    perm = [0] * t.shape[0]
    for i, j in zip(rows.tolist(), cols.tolist()):
        perm[i] = j
    matched = torch.from_numpy(mse[np.arange(t.shape[0]), perm].copy())
    scores = _psnr_from_mse(matched, dr) if metric == "psnr" else matched
    return perm, scores.to(r.device)


# --------------------------------------------------------------------------------------------
# membership inference
# --------------------------------------------------------------------------------------------


def _to_numpy(name: str, x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{name} must be array-like: {e}") from e
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def _check_scores(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(scores as float64, is_member as bool)``; both classes must be present."""
    s, m = _to_numpy("scores", scores), _to_numpy("is_member", is_member)
    if s.shape != m.shape:
        raise ValueError(f"scores and is_member must have the same length, got {s.shape[0]} and {m.shape[0]}")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    if m.dtype.kind not in "biuf" or not np.isin(m, (0, 1)).all():
        raise ValueError("is_member must contain only booleans or 0/1")
    m = m.astype(bool)
    n1 = int(m.sum())
    if n1 == 0 or n1 == m.size:
        raise ValueError(f"need both members and non-members, got {n1} members of {m.size}")
    return s, m


def roc_curve(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of the test "member iff score >= threshold".

    One point per distinct score (tied scores move FPR and TPR together, a diagonal step), plus
    ``(0, 0)`` at threshold ``+inf``; the last point is ``(1, 1)``. No intermediate points are
    dropped, so :func:`tpr_at_fpr` on these points is exact.

    Args:
        scores: ``(N,)`` finite attack scores, higher meaning "member" (array-like or tensor).
        is_member: ``(N,)`` ground truth, booleans or 0/1.

    Returns:
        ``(fpr, tpr, thresholds)``: float64 arrays; ``fpr`` and ``tpr`` non-decreasing in [0, 1],
        ``thresholds`` strictly decreasing (first ``+inf``). ``fpr[i]`` is the fraction of
        non-members and ``tpr[i]`` of members with ``score >= thresholds[i]``.

    Raises:
        ValueError: lengths differ, not 1-D, non-finite scores, labels other than 0/1, or only one
            class present.
    """
    s, m = _check_scores(scores, is_member)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, m_sorted = s[order], m[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(m_sorted)[last_of_run]
    fps = (last_of_run + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    thresholds = np.r_[np.inf, s_sorted[last_of_run]]
    return fpr, tpr, thresholds


def auc(fpr: Any, tpr: Any) -> float:
    """Area under a curve by the trapezoidal rule (for a ROC: the AUC, in [0, 1]).

    ``fpr`` must be monotonic (either direction). For :func:`roc_curve`'s output this equals the
    Mann–Whitney probability ``P(member score > non-member score) + ½·P(tie)``.

    Raises:
        ValueError: lengths differ, fewer than 2 points, non-finite or non-monotonic ``fpr``.
    """
    x = _to_numpy("fpr", fpr).astype(np.float64)
    y = _to_numpy("tpr", tpr).astype(np.float64)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"auc: fpr and tpr need the same length >= 2, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("auc: fpr and tpr must be finite")
    dx = np.diff(x)
    if (dx < 0).any() and (dx > 0).any():
        raise ValueError("auc: fpr must be monotonic")
    return float(abs(np.sum(dx * (y[1:] + y[:-1]) / 2.0)))


def _tpr_at(fpr_curve: np.ndarray, tpr_curve: np.ndarray, target: float) -> float:
    return float(tpr_curve[fpr_curve <= target].max())


def _check_fpr(fpr: float) -> float:
    if (
        isinstance(fpr, bool)
        or not isinstance(fpr, (int, float, np.integer, np.floating))
        or not 0.0 <= float(fpr) <= 1.0
    ):
        raise ValueError(f"tpr_at_fpr: fpr must be a number in [0, 1], got {fpr!r}")
    return float(fpr)


def tpr_at_fpr(scores: Any, is_member: Any, fpr: float) -> float:
    """The highest TPR over the thresholds whose FPR is <= ``fpr`` (as LiRA reports it).

    Scores are oriented higher = member. With ``n`` non-members FPRs come in steps of ``1/n``, so
    for ``fpr < 1/n`` this is the TPR at zero false positives (e.g. TPR at 0.1% FPR needs >= 1000
    non-members to mean what it says).

    Raises:
        ValueError: as :func:`roc_curve`, and ``fpr`` outside [0, 1].
    """
    target = _check_fpr(fpr)
    f, t, _ = roc_curve(scores, is_member)
    return _tpr_at(f, t, target)


def attack_summary(scores: Any, is_member: Any) -> dict[str, float | int]:
    """The LiRA table row of a membership-inference attack.

    Returns:
        ``{"auc", "tpr_at_0.1%_fpr", "tpr_at_1%_fpr", "balanced_accuracy", "n_members",
        "n_nonmembers"}``. Rates are fractions in [0, 1]. ``balanced_accuracy`` is
        ``max over thresholds of (TPR + 1 − FPR) / 2`` — the best threshold chosen on the same data,
        hence optimistic (as in LiRA).

    Raises:
        ValueError: as :func:`roc_curve`.
    """
    s, m = _check_scores(scores, is_member)
    f, t, _ = roc_curve(s, m)
    return {
        "auc": auc(f, t),
        "tpr_at_0.1%_fpr": _tpr_at(f, t, 0.001),
        "tpr_at_1%_fpr": _tpr_at(f, t, 0.01),
        "balanced_accuracy": float(np.max((t + 1.0 - f) / 2.0)),
        "n_members": int(m.sum()),
        "n_nonmembers": int((~m).sum()),
    }


def plot_roc(curves: Mapping[str, Sequence[Any]], path: str | Path, loglog: bool = True) -> Path:
    """Draw ROC curves, with the diagonal (random guessing) and each curve's AUC in the legend.

    Uses matplotlib's object-oriented API with the Agg canvas (no pyplot, no global backend change).
    On log-log axes points with FPR or TPR = 0 cannot be shown; the axes start at the smallest
    positive rate (rounded down to a power of ten, at least 1e-6), as in LiRA's figures.

    Args:
        curves: ``{label: (fpr, tpr)}`` (a 3-tuple from :func:`roc_curve` is accepted too).
        path: output file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...). Parent
            directories are created.
        loglog: logarithmic axes (default) or linear ones.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no curves, or a curve whose fpr and tpr differ in length or are empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_roc: no curves given")
    data: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name, curve in curves.items():
        if len(curve) not in (2, 3):
            raise ValueError(f"plot_roc: curve {name!r} must be (fpr, tpr), got {len(curve)} items")
        f = _to_numpy("fpr", curve[0]).astype(np.float64)
        t = _to_numpy("tpr", curve[1]).astype(np.float64)
        if f.shape != t.shape or f.size == 0:
            raise ValueError(f"plot_roc: curve {name!r} needs fpr and tpr of equal non-zero length")
        data.append((str(name), f, t))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo = 0.0
    if loglog:
        pos = np.concatenate([np.r_[f[f > 0], t[t > 0]] for _, f, t in data])
        lo = max(1e-6, 10.0 ** math.floor(math.log10(pos.min()))) if pos.size else 1e-3
        lo = min(lo, 1e-1)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.plot([lo, 1.0], [lo, 1.0], ls="--", color="grey", lw=1, label="random")
    for name, f, t in data:
        label = f"{name} (AUC = {auc(f, t):.3f})" if f.size >= 2 else name
        ax.plot(f, t, lw=1.5, label=label)
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    return out


# --------------------------------------------------------------------------------------------
# empirical ε
# --------------------------------------------------------------------------------------------


def _best_threshold(s0: np.ndarray, s1: np.ndarray, delta: float, confidence: float) -> float:
    """Threshold ``t`` of "member iff score > t" maximising ε_LB with Clopper–Pearson upper bounds of
    *these* samples (``s0`` non-member, ``s1`` member scores)."""
    return choose_threshold(s0, s1, delta, confidence, directions=(1,))[0]


def _eps_at(s0: np.ndarray, s1: np.ndarray, thr: float, delta: float, confidence: float) -> float:
    fp = int((s0 > thr).sum())
    fn = int((s1 <= thr).sum())
    fpr_u = clopper_pearson(fp, s0.size, confidence)[1]
    fnr_u = clopper_pearson(fn, s1.size, confidence)[1]
    return epsilon_lower_bound(fpr_u, fnr_u, delta)


def empirical_epsilon(
    scores: Any,
    is_member: Any,
    delta: float,
    confidence: float = 0.95,
    split: bool = True,
    seed: int | None = 0,
) -> float:
    """Lower bound on the ε of the training procedure from a membership-inference attack.

    The test is "member iff score > t" (scores oriented higher = member; flip their sign for the
    other orientation). Its FPR and FNR are replaced by the upper ends of two-sided Clopper–Pearson
    intervals at ``confidence`` (:func:`privfl.audit.clopper_pearson`; each is a one-sided bound at
    level ``(1 + confidence) / 2``, so both hold at once with probability >= ``confidence``) and
    turned into ``ε_LB = max(ln((1−δ−FPR)/FNR), ln((1−δ−FNR)/FPR), 0)`` by
    :func:`privfl.audit.epsilon_lower_bound`. The threshold ``t`` maximises that bound.

    ``split=True`` (default): members and non-members are each split at random in two halves; ``t``
    is chosen on the first halves and the bound is computed on the held-out halves only, so it is
    statistically valid (holds with probability >= ``confidence``). ``split=False`` chooses ``t`` and
    evaluates on the same data: the maximum over thresholds is **optimistic** (a biased, too-large
    bound, not a valid one), though its variance is lower.

    The bound is only as meaningful as the setting: each member/non-member score must come from an
    independent run of the randomised training, as in a DP audit (Jagielski et al. 2020,
    Nasr et al. 2021); scores of many examples of one trained model are not independent trials of one
    neighbouring pair. A small ε_LB proves nothing about privacy.

    Args:
        scores: ``(N,)`` finite scores, higher meaning "member".
        is_member: ``(N,)`` booleans or 0/1.
        delta: δ of the guarantee being tested, in [0, 1).
        confidence: confidence of the bound, in (0, 1).
        split: choose the threshold on half of the data and evaluate on the other half.
        seed: seed of the random split (``None``: fresh randomness).

    Returns:
        ε_LB >= 0 (nats; finite for finitely many scores).

    Raises:
        ValueError: as :func:`roc_curve`; ``delta`` outside [0, 1), ``confidence`` outside (0, 1),
            and with ``split=True`` fewer than 2 members or non-members.
    """
    s, m = _check_scores(scores, is_member)
    if (
        isinstance(delta, bool)
        or not isinstance(delta, (int, float, np.integer, np.floating))
        or not 0.0 <= float(delta) < 1.0
    ):
        raise ValueError(f"empirical_epsilon: delta must be in [0, 1), got {delta!r}")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float, np.integer, np.floating))
        or not 0.0 < float(confidence) < 1.0
    ):
        raise ValueError(f"empirical_epsilon: confidence must be in (0, 1), got {confidence!r}")
    delta, confidence = float(delta), float(confidence)
    s0, s1 = s[~m], s[m]
    if not split:
        return _eps_at(s0, s1, _best_threshold(s0, s1, delta, confidence), delta, confidence)
    if s0.size < 2 or s1.size < 2:
        raise ValueError(
            f"empirical_epsilon: split=True needs >= 2 members and non-members, got {s1.size} and {s0.size}"
        )
    rng = np.random.default_rng(seed)
    p0, p1 = rng.permutation(s0.size), rng.permutation(s1.size)
    h0, h1 = s0.size // 2, s1.size // 2
    thr = _best_threshold(s0[p0[:h0]], s1[p1[:h1]], delta, confidence)
    return _eps_at(s0[p0[h0:]], s1[p1[h1:]], thr, delta, confidence)
