"""Tests for privfl.metrics: DHUnet segmentation conventions, aggregation, streaming meter."""

from __future__ import annotations

import json
import math

import pytest
import torch

from privfl.metrics import SegmentationMeter, SegmentationResult, segmentation_scores, summarize


def _t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).unsqueeze(0)


def _isnan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


# ---------------------------------------------------------------------------------------------
# the four per-image conventions (3 classes, 2x2 images; class 2 is the one under test)
# ---------------------------------------------------------------------------------------------


def test_both_empty_scores_one_and_accuracy_is_skipped() -> None:
    s = segmentation_scores(_t([[0, 1], [1, 0]]), _t([[0, 1], [0, 0]]), num_classes=3)
    assert s["dice"][0, 1].item() == 1.0
    assert s["jaccard"][0, 1].item() == 1.0
    assert math.isnan(s["accuracy"][0, 1].item())


def test_prediction_empty_truth_present_scores_zero() -> None:
    s = segmentation_scores(_t([[0, 1], [1, 0]]), _t([[2, 1], [1, 0]]), num_classes=3)
    assert s["dice"][0, 1].item() == 0.0
    assert s["jaccard"][0, 1].item() == 0.0
    assert s["accuracy"][0, 1].item() == 0.0
    assert s["dice"][0, 0].item() == 1.0  # class 1 is perfect


def test_prediction_present_truth_empty_is_skipped() -> None:
    s = segmentation_scores(_t([[2, 1], [1, 0]]), _t([[0, 1], [1, 0]]), num_classes=3)
    for name in ("dice", "jaccard", "accuracy"):
        assert math.isnan(s[name][0, 1].item()), name
    r = summarize(s)
    assert _isnan(r.per_class["dice"][1]) and r.dice == 1.0  # class 2 excluded from the mean


def test_both_present_uses_usual_formulas() -> None:
    # class 2: TP=1, FP=1, FN=1
    s = segmentation_scores(_t([[2, 2], [0, 0]]), _t([[2, 0], [2, 0]]), num_classes=3)
    assert s["dice"][0, 1].item() == pytest.approx(2 / 4)
    assert s["jaccard"][0, 1].item() == pytest.approx(1 / 3)
    assert s["accuracy"][0, 1].item() == pytest.approx(1 / 2)
    assert (s["tp"][0, 1].item(), s["fp"][0, 1].item(), s["fn"][0, 1].item()) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# worked examples
# ---------------------------------------------------------------------------------------------


def test_perfect_prediction_gives_one() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 16, 16), generator=g)
    r = summarize(segmentation_scores(target.clone(), target, 4))
    assert (r.dice, r.jaccard, r.accuracy) == (1.0, 1.0, 1.0)
    assert r.per_class == {"dice": [1.0] * 3, "jaccard": [1.0] * 3, "accuracy": [1.0] * 3}
    assert r.num_images == 3


def test_hand_computed_4x4_example() -> None:
    target = _t([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 0, 0]])
    pred = _t([[0, 1, 1, 1], [0, 0, 1, 0], [2, 2, 1, 2], [2, 0, 0, 0]])
    # class 1: TP=3 FP=2 FN=1 ; class 2: TP=4 FP=0 FN=2
    s = segmentation_scores(pred, target, 3)
    assert s["tp"].tolist() == [[3, 4]] and s["fp"].tolist() == [[2, 0]] and s["fn"].tolist() == [[1, 2]]
    assert s["dice"][0].tolist() == pytest.approx([6 / 9, 8 / 10])
    assert s["jaccard"][0].tolist() == pytest.approx([3 / 6, 4 / 6])
    assert s["accuracy"][0].tolist() == pytest.approx([3 / 4, 4 / 6])
    r = summarize(s)
    assert r.dice == pytest.approx((6 / 9 + 8 / 10) / 2)
    assert r.jaccard == pytest.approx((3 / 6 + 4 / 6) / 2)
    assert r.accuracy == pytest.approx((3 / 4 + 4 / 6) / 2)


def test_aggregation_nanmean_over_images_then_classes() -> None:
    # image 0: class 1 dice 2/3 (TP1 FP0 FN1); class 2 predicted but absent (skipped)
    # image 1: class 1 dice 1; class 2 absent everywhere -> 1 ; class 3 never present -> 1 / NaN acc
    pred = torch.stack([_t([[1, 0], [2, 0]])[0], _t([[1, 1], [0, 0]])[0]])
    target = torch.stack([_t([[1, 1], [0, 0]])[0], _t([[1, 1], [0, 0]])[0]])
    r = summarize(segmentation_scores(pred, target, 4))
    assert r.per_class["dice"] == pytest.approx([(2 / 3 + 1) / 2, 1.0, 1.0])
    assert r.per_class["accuracy"][0] == pytest.approx(0.75)
    assert _isnan(r.per_class["accuracy"][1]) and _isnan(r.per_class["accuracy"][2])
    assert r.accuracy == pytest.approx(0.75)  # NaN classes excluded
    assert r.dice == pytest.approx(((2 / 3 + 1) / 2 + 1 + 1) / 3)


def test_all_classes_skipped_gives_nan() -> None:
    r = summarize(segmentation_scores(_t([[1, 1]]), _t([[0, 0]]), 2))
    assert _isnan(r.dice) and _isnan(r.jaccard) and _isnan(r.accuracy)
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))["dice"] is None


# ---------------------------------------------------------------------------------------------
# streaming meter
# ---------------------------------------------------------------------------------------------


def _batches(seed: int, n: int, c: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b = 1 + i % 3
        target = torch.randint(0, c, (b, 12, 10), generator=g)
        target[0, :, :] = torch.where(target[0] == c - 1, 0, target[0])  # class c-1 absent in some images
        noise = torch.randint(0, c, target.shape, generator=g)
        pred = torch.where(torch.rand(target.shape, generator=g) < 0.7, target, noise)
        out.append((pred, target))
    return out


def test_meter_equals_one_shot_over_concatenated_batches() -> None:
    c = 4
    batches = _batches(1, 5, c)
    meter = SegmentationMeter(c)
    for pred, target in batches:
        meter.update(pred, target)
    streamed = meter.compute()
    one_shot = summarize(
        segmentation_scores(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]), c)
    )
    assert streamed.num_images == one_shot.num_images == sum(t.shape[0] for _, t in batches)
    for name in ("dice", "jaccard", "accuracy"):
        assert getattr(streamed, name) == pytest.approx(getattr(one_shot, name), rel=1e-12)
        assert streamed.per_class[name] == pytest.approx(one_shot.per_class[name], rel=1e-12)
    meter.reset()
    empty = meter.compute()
    assert _isnan(empty.dice) and empty.num_images == 0


def test_logits_input_equals_argmax_input() -> None:
    c = 3
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, c, 8, 8, generator=g)
    target = torch.randint(0, c, (4, 8, 8), generator=g)
    a, b = SegmentationMeter(c), SegmentationMeter(c)
    a.update(logits, target)
    b.update(logits.argmax(dim=1), target)
    assert a.compute() == b.compute()


def test_uint8_masks_and_result_to_dict() -> None:
    target = _t([[0, 1], [2, 2]]).to(torch.uint8)
    meter = SegmentationMeter(3)
    meter.update(target.clone(), target)
    r = meter.compute()
    assert isinstance(r, SegmentationResult)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d == {
        "dice": 1.0,
        "jaccard": 1.0,
        "accuracy": 1.0,
        "per_class": {"dice": [1.0, 1.0], "jaccard": [1.0, 1.0], "accuracy": [1.0, 1.0]},
        "num_images": 1,
    }


def test_agrees_with_torchmetrics_where_conventions_coincide() -> None:
    tm = pytest.importorskip("torchmetrics.functional.segmentation")
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 3, (4, 16, 16), generator=g)
    pred = torch.randint(0, 3, (4, 16, 16), generator=g)  # every class present in both, all images
    s = segmentation_scores(pred, target, 3)
    ref_dice = tm.dice_score(
        pred, target, num_classes=3, include_background=False, average="none", input_format="index"
    )
    ref_iou = tm.mean_iou(
        pred, target, num_classes=3, include_background=False, per_class=True, input_format="index"
    )
    torch.testing.assert_close(s["dice"].float(), ref_dice.float())
    torch.testing.assert_close(s["jaccard"].float(), ref_iou.float())


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_errors() -> None:
    t = torch.zeros(2, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(t, torch.zeros(2, 4, 5, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="num_classes"):
        segmentation_scores(t, t, 1)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMeter(1)
    bad = t.clone()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        segmentation_scores(bad, t, 3)
    with pytest.raises(ValueError, match="target"):
        segmentation_scores(t, bad, 3)
    neg = t.clone()
    neg[1, 2, 3] = -1
    with pytest.raises(ValueError, match="outside"):
        segmentation_scores(t, neg, 3)
    with pytest.raises(ValueError, match="integer"):
        segmentation_scores(t.float(), t, 3)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        segmentation_scores(t[0], t[0], 3)
    meter = SegmentationMeter(3)
    with pytest.raises(ValueError, match="channels"):
        meter.update(torch.randn(2, 4, 4, 4), t)
    with pytest.raises(ValueError, match="shape"):
        meter.update(torch.randn(2, 3, 4, 5), t)
    with pytest.raises(ValueError):
        meter.update(torch.zeros(4, 4, dtype=torch.int64), t)
    assert meter.compute().num_images == 0  # failed updates leave no trace
