"""Shamir t-of-n sharing: any t shares reconstruct, t - 1 shares say nothing, bad inputs are refused."""

from __future__ import annotations

import itertools
import os
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.defenses.secagg.shamir import (
    PRIME,
    ShamirError,
    Share,
    interpolate,
    reconstruct_bytes,
    reconstruct_int,
    split_bytes,
    split_int,
)


@st.composite
def sharing(draw):
    n = draw(st.integers(1, 8))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 2**64), min_size=n, max_size=n, unique=True))
    secret = draw(st.integers(0, PRIME - 1))
    return secret, t, xs


@settings(max_examples=60, deadline=None)
@given(sharing(), st.randoms(use_true_random=False))
def test_any_t_shares_reconstruct(case, rnd):
    secret, t, xs = case
    ys = split_int(secret, t, xs)
    points = list(zip(xs, ys))
    for size in {t, len(xs)}:
        subset = rnd.sample(points, size)
        assert reconstruct_int(subset, t) == secret


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=70), st.integers(1, 6), st.data())
def test_byte_secrets_roundtrip_through_share_bytes(secret, n, data):
    t = data.draw(st.integers(1, n))
    xs = list(range(1, n + 1))
    shares = [Share.from_bytes(s.to_bytes()) for s in split_bytes(secret, t, xs)]
    subset = data.draw(st.lists(st.sampled_from(shares), min_size=t, max_size=n, unique_by=lambda s: s.x))
    assert reconstruct_bytes(subset, t) == secret


def test_t_minus_1_shares_are_perfectly_hiding_small_field():
    """Over GF(11), t = 3: for every secret, the 2 shares held by any two parties take every value pair
    exactly once over the random coefficients — their distribution does not depend on the secret."""
    p, t, xs = 11, 3, [1, 2, 5, 10]
    for a, b in itertools.combinations(range(len(xs)), 2):
        for secret in range(p):
            seen = Counter(
                tuple(split_int(secret, t, xs, prime=p, coefficients=c)[i] for i in (a, b))
                for c in itertools.product(range(p), repeat=t - 1)
            )
            assert len(seen) == p * p and set(seen.values()) == {1}


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 6), st.integers(0, PRIME - 1), st.integers(0, PRIME - 1), st.randoms(use_true_random=False)
)
def test_every_secret_is_consistent_with_t_minus_1_shares(t, secret, candidate, rnd):
    """Given t - 1 shares of ``secret``, every ``candidate`` secret is obtained by some value of one
    more share: the t - 1 shares do not determine (or narrow down) the secret."""
    xs = rnd.sample(range(1, 1000), t)
    ys = split_int(secret, t, xs)
    known, x_new = list(zip(xs[:-1], ys[:-1])), xs[-1]
    c0 = reconstruct_int(known + [(x_new, 0)], t)
    lam = (reconstruct_int(known + [(x_new, 1)], t) - c0) % PRIME
    assert lam != 0
    y_new = (candidate - c0) * pow(lam, -1, PRIME) % PRIME
    assert reconstruct_int(known + [(x_new, y_new)], t) == candidate


def test_fewer_than_t_shares_refused():
    ys = split_int(42, 3, [1, 2, 3])
    with pytest.raises(ShamirError, match="at least 3"):
        reconstruct_int([(1, ys[0]), (2, ys[1])], 3)
    shares = split_bytes(os.urandom(32), 3, [1, 2, 3])
    with pytest.raises(ShamirError):
        reconstruct_bytes(shares[:2], 3)


def test_inconsistent_extra_share_detected():
    xs = [1, 2, 3, 4]
    ys = split_int(123456789, 2, xs)
    points = list(zip(xs, ys))
    points[3] = (4, (ys[3] + 1) % PRIME)
    with pytest.raises(ShamirError, match="not consistent"):
        reconstruct_int(points, 2)
    shares = split_bytes(b"k" * 32, 2, xs)
    bad = Share(shares[2].x, (shares[2].ys[0] ^ 1, *shares[2].ys[1:]), 32)
    with pytest.raises(ShamirError):
        reconstruct_bytes([shares[0], shares[1], bad], 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda: split_int(1, 0, [1, 2]),  # threshold < 1
        lambda: split_int(1, 3, [1, 2]),  # threshold > n
        lambda: split_int(1, 2, [1, 1]),  # duplicate x
        lambda: split_int(1, 2, [0, 1]),  # x = 0 would be the secret
        lambda: split_int(1, 2, [1, PRIME]),  # x outside the field
        lambda: split_int(PRIME, 2, [1, 2]),  # secret outside the field
        lambda: split_int(-1, 2, [1, 2]),
        lambda: split_int(1, 2, [1, 2], coefficients=[]),  # wrong number of coefficients
        lambda: split_int(1, 2, [1, 2, 3], prime=3),  # too many parties for the field
        lambda: split_bytes(b"", 1, [1]),
        lambda: reconstruct_int([(1, 5), (1, 6)], 2),  # duplicate x
        lambda: reconstruct_int([(1, PRIME), (2, 0)], 2),  # y outside the field
        lambda: interpolate([(0, 1)], 3),
        lambda: Share.from_bytes(b"\x00" * 17),
        lambda: Share.from_bytes(bytes(16) + b"\x00\x20" + bytes(48)),  # x = 0
        lambda: reconstruct_bytes([Share(1, (1,), 1), Share(2, (1, 2), 20)], 2),  # different secrets
    ],
)
def test_bad_inputs_raise(call):
    with pytest.raises(ShamirError):
        call()


def test_threshold_one_and_full_threshold():
    secret = random.Random(0).randrange(PRIME)
    assert split_int(secret, 1, [1, 2, 3]) == [secret] * 3  # t = 1: every share is the secret
    ys = split_int(secret, 3, [7, 8, 9])
    assert reconstruct_int(list(zip([7, 8, 9], ys)), 3) == secret
