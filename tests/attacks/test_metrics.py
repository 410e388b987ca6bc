"""Tests of privfl.attacks.metrics: reconstruction metrics (PSNR, SSIM, feature MSE, Hungarian
matching), membership-inference metrics (ROC, AUC, TPR at low FPR, summary, plot) and the
empirical ε lower bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu

from privfl.attacks.metrics import (
    attack_summary,
    auc,
    empirical_epsilon,
    feature_mse,
    match_batches,
    mean_psnr,
    plot_roc,
    psnr,
    roc_curve,
    ssim,
    tpr_at_fpr,
)
from privfl.audit import clopper_pearson, epsilon_lower_bound

DELTA = 1e-5


def _images(b: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g)


# --------------------------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------------------------


def test_psnr_of_known_mse() -> None:
    t = torch.full((2, 1, 4, 4), 0.5)
    r = t.clone()
    r[0] += 0.1  # MSE 0.01 -> 20 dB
    r[1] += 0.01  # MSE 1e-4 -> 40 dB
    p = psnr(r, t)
    assert p.shape == (2,) and p.dtype == torch.float64
    assert p.tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    # 8-bit range: an error of 1 grey level everywhere -> 10 log10(255^2) dB
    assert float(psnr(t * 255 + 1, t * 255, data_range=255)[0]) == pytest.approx(
        20 * math.log10(255), abs=1e-9
    )


def test_psnr_single_image_identical_and_mean() -> None:
    x = _images(1)[0]
    p = psnr(x, x)
    assert p.shape == (1,) and math.isinf(float(p[0])) and float(p[0]) > 0
    t = torch.zeros(3, 1, 2, 2)
    r = t + torch.tensor([0.1, 0.01, 0.001]).view(3, 1, 1, 1)
    assert mean_psnr(r, t) == pytest.approx(40.0, abs=1e-4)
    assert math.isinf(mean_psnr(t, t))


def test_psnr_symmetric_and_per_image() -> None:
    a, b = _images(5, seed=1), _images(5, seed=2)
    assert torch.allclose(psnr(a, b), psnr(b, a))
    assert torch.allclose(psnr(a, b)[2:3], psnr(a[2], b[2]))


@pytest.mark.parametrize(
    ("r", "t", "kw", "exc"),
    [
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5), {}, ValueError),
        (torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4), {}, ValueError),
        (torch.zeros(4, 4), torch.zeros(4, 4), {}, ValueError),
        (torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4), {}, ValueError),
        (torch.full((1, 1, 2, 2), float("nan")), torch.zeros(1, 1, 2, 2), {}, ValueError),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), {"data_range": 0.0}, ValueError),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), {"data_range": -1.0}, ValueError),
        (np.zeros((1, 1, 2, 2)), torch.zeros(1, 1, 2, 2), {}, TypeError),
    ],
)
def test_psnr_bad_inputs(r, t, kw, exc) -> None:
    with pytest.raises(exc):
        psnr(r, t, **kw)


# --------------------------------------------------------------------------------------------
# SSIM, feature MSE
# --------------------------------------------------------------------------------------------


def test_ssim_identical_is_one_and_noise_lowers_it() -> None:
    x = _images(3, h=32, w=32)
    s = ssim(x, x)
    assert s.shape == (3,)
    assert torch.allclose(s, torch.ones(3, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    small = ssim((x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1), x)
    big = ssim((x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1), x)
    assert (big < small).all() and (small < 1).all() and (big > -1).all()
    assert ssim(x[0], x[0]).shape == (1,)


def test_ssim_small_images_and_bad_inputs() -> None:
    x = _images(2, h=5, w=6)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))  # window shrinks to 5
    with pytest.raises(ValueError):
        ssim(_images(1, h=2, w=8), _images(1, h=2, w=8))
    with pytest.raises(ValueError):
        ssim(_images(1), _images(2))


def test_feature_mse() -> None:
    x = _images(3)
    w = torch.randn(3 * 16 * 16, 5, generator=torch.Generator().manual_seed(0))

    def feats(z: torch.Tensor) -> torch.Tensor:
        return z.flatten(1) @ w

    assert torch.equal(feature_mse(x, x, feats), torch.zeros(3, dtype=torch.float64))
    y = _images(3, seed=9)
    expected = ((feats(x) - feats(y)).double() ** 2).mean(dim=1)
    assert torch.allclose(feature_mse(x, y, feats), expected, rtol=1e-5)
    # identity features: plain per-image MSE
    assert torch.allclose(feature_mse(x, y, lambda z: z), ((x - y).double() ** 2).mean(dim=(1, 2, 3)))
    assert feature_mse(x[0], y[0], feats).shape == (1,)
    with pytest.raises(ValueError):
        feature_mse(x, y, lambda z: z.sum())  # no batch dimension
    with pytest.raises(TypeError):
        feature_mse(x, y, "not callable")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Hungarian matching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["psnr", "mse"])
def test_match_batches_recovers_shuffled_batch(metric: str) -> None:
    t = _images(8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(4))
    noise = 0.02 * torch.randn(t.shape, generator=torch.Generator().manual_seed(5))
    r = (t + noise)[perm]  # r[k] is a noisy copy of t[perm[k]]
    got, scores = match_batches(r, t, metric=metric)
    inverse = torch.argsort(perm).tolist()  # t[i] is at r[inverse[i]]
    assert got == inverse
    expected = (
        psnr(r[inverse], t) if metric == "psnr" else ((r[inverse] - t).double() ** 2).mean(dim=(1, 2, 3))
    )
    assert torch.allclose(scores, expected)


def test_match_batches_exact_copies_and_extra_reconstructions() -> None:
    t = _images(3)
    r = torch.cat([_images(2, seed=7), t[[2, 0, 1]]])  # two decoys, then the exact images
    perm, scores = match_batches(r, t)
    assert perm == [3, 4, 2]
    assert torch.isinf(scores).all()
    perm1, _ = match_batches(t, t[1])
    assert perm1 == [1]
    r8 = (t * 255).round()
    perm8, s8 = match_batches(r8 + 1, r8, data_range=255)
    assert perm8 == [0, 1, 2] and s8.tolist() == pytest.approx([20 * math.log10(255)] * 3)


def test_match_batches_psnr_and_mse_objectives_differ() -> None:
    # 1-pixel targets 0.5 and 1.0; reconstructions 0.5005 (near-exact copy of 0.5) and 0.0.
    # identity {0->0, 1->1}: MSEs 2.5e-7 and 1.0      (sum 1.0,    log-sum -15.2)
    # swapped  {1->0, 0->1}: MSEs 0.25 and 0.2495      (sum 0.4995, log-sum -2.8)
    t = torch.tensor([0.5, 1.0]).view(2, 1, 1, 1)
    r = torch.tensor([0.5005, 0.0]).view(2, 1, 1, 1)
    perm_psnr, s_psnr = match_batches(r, t, "psnr")
    perm_mse, s_mse = match_batches(r, t, "mse")
    assert perm_psnr == [0, 1] and perm_mse == [1, 0]
    assert float(s_psnr.sum()) > float(psnr(r[[1, 0]], t).sum())
    assert s_mse.tolist() == pytest.approx([0.25, 0.4995**2], rel=1e-5)


def test_match_batches_bad_inputs() -> None:
    t = _images(3)
    with pytest.raises(ValueError):
        match_batches(t, t, metric="ssim")
    with pytest.raises(ValueError):
        match_batches(t[:2], t)  # fewer reconstructions than targets
    with pytest.raises(ValueError):
        match_batches(_images(3, h=8), t)


# --------------------------------------------------------------------------------------------
# ROC, AUC, TPR at low FPR
# --------------------------------------------------------------------------------------------

#: hand example: the only mis-ordered (member, non-member) pair is (0.6, 0.7) -> AUC 8/9
HAND_SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
HAND_MEMBER = [1, 1, 0, 1, 0, 0]


def test_roc_curve_hand_example() -> None:
    fpr, tpr, thr = roc_curve(HAND_SCORES, HAND_MEMBER)
    assert fpr.tolist() == pytest.approx([0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert math.isinf(thr[0]) and thr[1:].tolist() == HAND_SCORES
    assert auc(fpr, tpr) == pytest.approx(8 / 9)
    assert tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 0.3) == pytest.approx(2 / 3)
    assert tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 1 / 3) == pytest.approx(1.0)
    assert tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 1.0) == 1.0


def test_roc_curve_ties_step_diagonally() -> None:
    fpr, tpr, thr = roc_curve([1.0, 1.0, 0.0, 0.0], [True, False, True, False])
    assert fpr.tolist() == [0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0]
    assert thr.tolist() == [math.inf, 1.0, 0.0]
    assert auc(fpr, tpr) == 0.5
    # tensors are accepted too
    f2, t2, _ = roc_curve(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1, 0, 1, 0]))
    assert f2.tolist() == fpr.tolist() and t2.tolist() == tpr.tolist()


def test_auc_perfect_random_inverted() -> None:
    rng = np.random.default_rng(0)
    member = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    perfect = np.r_[rng.uniform(1, 2, 500), rng.uniform(0, 1, 500)]
    assert auc(*roc_curve(perfect, member)[:2]) == 1.0
    assert auc(*roc_curve(-perfect, member)[:2]) == 0.0
    assert auc(*roc_curve(rng.normal(size=1000), member)[:2]) == pytest.approx(0.5, abs=0.05)
    assert auc(*roc_curve(np.zeros(1000), member)[:2]) == 0.5  # all tied
    # reversed curve orientation gives the same area
    f, t, _ = roc_curve(perfect, member)
    assert auc(f[::-1], t[::-1]) == 1.0


SCORES = st.lists(st.integers(-5, 5).map(float) | st.floats(-1e3, 1e3), min_size=2, max_size=40)


@st.composite
def scored(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    s = np.array(draw(SCORES))
    m = np.array(draw(st.lists(st.booleans(), min_size=s.size, max_size=s.size)))
    m[0], m[1] = True, False  # both classes present
    return s, m


@settings(max_examples=60, deadline=None)
@given(scored())
def test_roc_properties(data: tuple[np.ndarray, np.ndarray]) -> None:
    s, m = data
    fpr, tpr, thr = roc_curve(s, m)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all() and (np.diff(thr) < 0).all()
    for f, t, th in zip(fpr, tpr, thr):  # definition: member iff score >= threshold
        assert f == pytest.approx(np.mean(s[~m] >= th)) and t == pytest.approx(np.mean(s[m] >= th))
    a = auc(fpr, tpr)
    assert 0.0 <= a <= 1.0
    # AUC is the Mann-Whitney statistic (ties count 1/2), so negating the scores gives 1 - AUC
    u = mannwhitneyu(s[m], s[~m]).statistic / (m.sum() * (~m).sum())
    assert a == pytest.approx(u, abs=1e-12)
    assert auc(*roc_curve(-s, m)[:2]) == pytest.approx(1.0 - a, abs=1e-12)
    # tpr_at_fpr is monotone in the FPR budget and matches the curve
    budgets = [0.0, 0.001, 0.01, 0.1, 0.5, 1.0]
    vals = [tpr_at_fpr(s, m, b) for b in budgets]
    assert vals == sorted(vals) and vals[-1] == 1.0
    summary = attack_summary(s, m)
    assert summary["auc"] == pytest.approx(a)
    assert 0.5 <= summary["balanced_accuracy"] <= 1.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6), min_size=4, max_size=30, unique=True), st.randoms(use_true_random=False)
)
def test_auc_of_negated_scores_without_ties(values: list[float], rnd) -> None:
    s = np.array(values)
    m = np.array([rnd.random() < 0.5 for _ in values])
    m[0], m[-1] = True, False
    a = auc(*roc_curve(s, m)[:2])
    assert auc(*roc_curve(-s, m)[:2]) == pytest.approx(1.0 - a, abs=1e-12)


def test_attack_summary_values() -> None:
    n = 2000
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    s = attack_summary(np.r_[np.arange(n) + n, np.arange(n)], member)  # perfectly separable
    assert s == {
        "auc": 1.0,
        "tpr_at_0.1%_fpr": 1.0,
        "tpr_at_1%_fpr": 1.0,
        "balanced_accuracy": 1.0,
        "n_members": n,
        "n_nonmembers": n,
    }
    rng = np.random.default_rng(1)
    r = attack_summary(rng.normal(size=2 * n), member)
    assert r["auc"] == pytest.approx(0.5, abs=0.03)
    assert r["tpr_at_0.1%_fpr"] < 0.01 and r["tpr_at_1%_fpr"] < 0.04
    assert r["balanced_accuracy"] < 0.55
    # hand example: best threshold 0.6 or 0.8 -> (TPR + 1 - FPR) / 2 = (1 + 2/3) / 2
    h = attack_summary(HAND_SCORES, HAND_MEMBER)
    assert h["balanced_accuracy"] == pytest.approx(5 / 6) and h["tpr_at_1%_fpr"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("scores", "member"),
    [
        ([0.1, 0.2], [1, 0, 1]),  # lengths differ
        ([0.1, 0.2], [1, 1]),  # one class only
        ([0.1, 0.2], [0, 0]),
        ([0.1, float("nan")], [1, 0]),  # non-finite
        ([0.1, float("inf")], [1, 0]),
        ([0.1, 0.2], [1, 2]),  # not 0/1
        ([0.1, 0.2], [1.0, 0.5]),
        ([[0.1], [0.2]], [[1], [0]]),  # not 1-D
        (["a", "b"], [1, 0]),
        ([], []),
    ],
)
def test_bad_membership_inputs(scores, member) -> None:
    for fn in (
        roc_curve,
        attack_summary,
        lambda s, m: tpr_at_fpr(s, m, 0.01),
        lambda s, m: empirical_epsilon(s, m, DELTA),
    ):
        with pytest.raises(ValueError):
            fn(scores, member)


def test_bad_auc_and_fpr_inputs() -> None:
    with pytest.raises(ValueError):
        auc([0.0, 1.0], [0.0])
    with pytest.raises(ValueError):
        auc([0.0], [0.0])
    with pytest.raises(ValueError):
        auc([0.0, 0.5, 0.2, 1.0], [0.0, 0.5, 0.6, 1.0])  # not monotonic
    with pytest.raises(ValueError):
        auc([0.0, float("nan")], [0.0, 1.0])
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError):
            tpr_at_fpr(HAND_SCORES, HAND_MEMBER, bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


def test_plot_roc_writes_file(tmp_path) -> None:
    rng = np.random.default_rng(2)
    member = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    good = np.r_[rng.normal(1.5, 1, 300), rng.normal(0, 1, 300)]
    curves = {"LiRA": roc_curve(good, member)[:2], "LOSS": roc_curve(rng.normal(size=600), member)}
    out = plot_roc(curves, tmp_path / "sub" / "roc.png")
    assert out == tmp_path / "sub" / "roc.png" and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lin = plot_roc({"x": ([0, 0.5, 1], [0, 0.8, 1])}, str(tmp_path / "lin.pdf"), loglog=False)
    assert lin.suffix == ".pdf" and lin.stat().st_size > 0
    with pytest.raises(ValueError):
        plot_roc({}, tmp_path / "empty.png")
    with pytest.raises(ValueError):
        plot_roc({"bad": ([0, 1], [0])}, tmp_path / "bad.png")


# --------------------------------------------------------------------------------------------
# empirical ε
# --------------------------------------------------------------------------------------------


def test_empirical_epsilon_random_scores_near_zero() -> None:
    rng = np.random.default_rng(3)
    member = np.r_[np.ones(2000, bool), np.zeros(2000, bool)]
    s = rng.normal(size=4000)
    assert empirical_epsilon(s, member, DELTA) < 0.1
    assert empirical_epsilon(s, member, DELTA, split=False) < 0.2


def test_empirical_epsilon_separable_scores() -> None:
    n = 1000
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    s = np.r_[np.arange(n) + 10.0 * n, np.arange(n)]
    # held-out halves of 500 with zero errors: both rates <= the 97.5% one-sided CP bound for 0/500
    expected = epsilon_lower_bound(clopper_pearson(0, n // 2)[1], clopper_pearson(0, n // 2)[1], DELTA)
    assert empirical_epsilon(s, member, DELTA) == pytest.approx(expected)
    assert expected > 4.5
    full = epsilon_lower_bound(clopper_pearson(0, n)[1], clopper_pearson(0, n)[1], DELTA)
    assert empirical_epsilon(s, member, DELTA, split=False) == pytest.approx(full)
    # inverted orientation: the test "member iff score > t" is useless
    assert empirical_epsilon(-s, member, DELTA) == 0.0


def test_empirical_epsilon_grows_with_separation_and_is_reproducible() -> None:
    rng = np.random.default_rng(4)
    member = np.r_[np.ones(3000, bool), np.zeros(3000, bool)]
    z = rng.normal(size=6000)
    eps = [empirical_epsilon(z + mu * member, member, DELTA) for mu in (0.0, 1.0, 3.0)]
    assert eps[0] < eps[1] < eps[2]
    assert empirical_epsilon(z + member, member, DELTA) == eps[1]  # seed 0 by default
    # scores N(0,1) vs N(3,1) are a Gaussian mechanism with sensitivity/sigma = 3, true eps ~ 16.7 at
    # delta = 1e-5 (3-GDP): the bound stays below it
    assert eps[2] < 16.6
    # the optimistic same-data bound is at least the held-out one here
    assert empirical_epsilon(z + 3 * member, member, DELTA, split=False) >= eps[2] - 0.5


def test_empirical_epsilon_bad_parameters() -> None:
    s, m = [0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]
    for kw in (
        {"delta": -0.1},
        {"delta": 1.0},
        {"delta": DELTA, "confidence": 1.0},
        {"delta": DELTA, "confidence": 0.0},
    ):
        with pytest.raises(ValueError):
            empirical_epsilon(s, m, **kw)
    with pytest.raises(ValueError):
        empirical_epsilon([0.1, 0.2, 0.3], [1, 0, 0], DELTA)  # one member cannot be split
    assert empirical_epsilon([0.1, 0.2, 0.3], [1, 0, 0], DELTA, split=False) >= 0.0
