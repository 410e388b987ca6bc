"""The distance-to-closest-record attack and the sliced Wasserstein fidelity, against direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from privfl.attacks import attack_summary, distance_to_closest_record
from privfl.sharing.fidelity import sliced_wasserstein


def test_dcr_scores_are_minus_the_distance_to_the_closest_record_of_the_class():
    synthetic = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 1])
    cand = torch.tensor([[1.0, 0.0], [9.0, 0.0]])
    np.testing.assert_allclose(distance_to_closest_record(cand, synthetic), [-1.0, -1.0])
    # by class: the first candidate (class 1) must reach (0, 3) or (10, 0)
    np.testing.assert_allclose(
        distance_to_closest_record(cand, synthetic, torch.tensor([1, 0]), labels), [-np.sqrt(10.0), -9.0]
    )
    with pytest.raises(ValueError, match="no synthetic record of class"):
        distance_to_closest_record(cand, synthetic, torch.tensor([2, 0]), labels)
    with pytest.raises(ValueError, match="both label tensors"):
        distance_to_closest_record(cand, synthetic, torch.tensor([1, 0]))


def test_dcr_finds_memorised_records_and_not_fresh_ones():
    g = torch.Generator().manual_seed(0)
    members, others = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    leaky = members + 0.01 * torch.randn(50, 8, generator=g)  # a generator that copies its training data
    fresh = torch.randn(200, 8, generator=g)  # one that learnt the distribution only
    is_member = torch.cat([torch.ones(50), torch.zeros(50)]).bool()
    cand = torch.cat([members, others])
    assert attack_summary(distance_to_closest_record(cand, leaky), is_member)["auc"] == 1.0
    assert 0.3 < attack_summary(distance_to_closest_record(cand, fresh), is_member)["auc"] < 0.7


def test_sliced_wasserstein_matches_the_exact_1d_distance_and_is_a_distance():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 1, generator=g), torch.randn(200, 1, generator=g) + 2.0
    # in one dimension every direction is ±1: the sliced W1 is the exact W1
    assert sliced_wasserstein(a, b, projections=4) == pytest.approx(
        wasserstein_distance(a[:, 0], b[:, 0]), rel=1e-9
    )
    x = torch.randn(100, 16, generator=g)
    assert sliced_wasserstein(x, x) == 0.0
    near, far = x + 0.1, x + 1.0
    assert 0 < sliced_wasserstein(x, near) < sliced_wasserstein(x, far)
    assert sliced_wasserstein(x, far, seed=3) == sliced_wasserstein(x, far, seed=3)
    with pytest.raises(ValueError):
        sliced_wasserstein(x, torch.randn(5, 3))
