"""Secure-aggregation primitives: ChaCha20 masks (block/thread independent), key derivation, AEAD,
signatures, and fixed-point quantization (no wrap, error bound, saturation)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.defenses.secagg import crypto
from privfl.defenses.secagg.crypto import U32, MaskTerm
from privfl.defenses.secagg.errors import OverflowRiskError, SecAggIntegrityError
from privfl.defenses.secagg.quantize import (
    INT32_MAX,
    check_no_wrap,
    choose_scale_bits,
    dequantize,
    quantize,
    quantize_into,
    scale_factor,
    sum_bound,
)

KEY = bytes(range(32))


def _reference_mask(key: bytes, n: int) -> np.ndarray:
    """The whole keystream from block 0 in one call: what every chunked computation must equal."""
    enc = Cipher(algorithms.ChaCha20(key, bytes(4) + b"privfl.mask1"), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * n)), dtype=U32)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 3000))
def test_keystream_any_range_matches_the_single_stream(start, n):
    ref = _reference_mask(KEY, start + n)
    out = np.empty(n, dtype=U32)
    crypto.keystream_into(KEY, start, out)
    np.testing.assert_array_equal(out, ref[start:])


@pytest.mark.parametrize("block_words,threads", [(16, 1), (48, 3), (1 << 18, 2), (4096, 2)])
def test_add_masks_independent_of_blocks_and_threads(block_words, threads):
    n = 10_007
    terms = [MaskTerm(os.urandom(32), s) for s in (1, -1, 1)]
    expected = np.zeros(n, dtype=np.int64)
    for key, sgn in terms:
        expected += sgn * _reference_mask(key, n).astype(np.int64)
    vec = np.zeros(n, dtype=U32)
    crypto.add_masks(vec, terms, block_words=block_words, threads=threads)
    np.testing.assert_array_equal(vec, (expected % 2**32).astype(U32))
    crypto.add_masks(vec, [MaskTerm(k, -s) for k, s in terms], block_words=block_words, threads=threads)
    assert not vec.any()


def test_run_blocks_reraises_worker_errors():
    def work(i, _):
        if i == 5:
            raise KeyError("boom")

    with pytest.raises(KeyError):
        crypto.run_blocks(20, work, lambda: None, threads=2)


def test_key_derivation_binds_pair_session_and_direction():
    a_sk, a_pk = crypto.new_x25519()
    b_sk, b_pk = crypto.new_x25519()
    shared = crypto.agree(a_sk, b_pk)
    assert shared == crypto.agree(b_sk, a_pk)
    assert crypto.public_x25519(a_sk) == a_pk
    s1, s2 = os.urandom(32), os.urandom(32)
    assert crypto.pair_mask_key(shared, s1, 3, 7) == crypto.pair_mask_key(shared, s1, 7, 3)
    assert crypto.pair_mask_key(shared, s1, 3, 7) != crypto.pair_mask_key(shared, s2, 3, 7)
    assert crypto.pair_mask_key(shared, s1, 3, 7) != crypto.pair_mask_key(shared, s1, 3, 8)
    assert crypto.share_key(shared, s1, 3, 7) != crypto.share_key(shared, s1, 7, 3)
    seed = os.urandom(32)
    assert crypto.self_mask_key(seed, s1, 3) != crypto.self_mask_key(seed, s1, 4)
    keys = {
        crypto.pair_mask_key(shared, s1, 3, 7),
        crypto.share_key(shared, s1, 3, 7),
        crypto.self_mask_key(shared, s1, 3),
    }
    assert len(keys) == 3  # domain separation


def test_low_order_public_key_refused():
    sk, _ = crypto.new_x25519()
    with pytest.raises(SecAggIntegrityError):
        crypto.agree(sk, bytes(32))


def test_aead_detects_tampering():
    key, ad = os.urandom(32), b"assoc"
    ct = crypto.aead_encrypt(key, b"secret shares", ad)
    assert crypto.aead_decrypt(key, ct, ad, "x") == b"secret shares"
    bad = bytearray(ct)
    bad[0] ^= 1
    with pytest.raises(SecAggIntegrityError, match="authentication tag"):
        crypto.aead_decrypt(key, bytes(bad), ad, "x")
    with pytest.raises(SecAggIntegrityError):
        crypto.aead_decrypt(key, ct, b"other", "x")


def test_signature_detects_tampering():
    k = crypto.new_signing_key()
    sig = crypto.sign(k, b"message")
    crypto.verify(crypto.signing_public(k), sig, b"message", "m")
    with pytest.raises(SecAggIntegrityError, match="invalid signature"):
        crypto.verify(crypto.signing_public(k), sig, b"messagE", "m")
    with pytest.raises(SecAggIntegrityError):
        crypto.verify(crypto.signing_public(crypto.new_signing_key()), sig, b"message", "m")


def test_tree_digest_depends_on_every_block():
    words = np.arange(100, dtype=U32)
    digests = [crypto.block_digest(words[i : i + 16]) for i in range(0, 100, 16)]
    base = crypto.tree_digest(b"h", digests)
    words[50] += 1
    digests2 = [crypto.block_digest(words[i : i + 16]) for i in range(0, 100, 16)]
    assert crypto.tree_digest(b"h", digests2) != base
    assert crypto.tree_digest(b"H", digests) != base


# ------------------------------------------------------------------------------ quantization

weights_st = st.lists(st.floats(0.01, 1.0), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(weights_st, st.floats(1e-4, 1e4))
def test_chosen_scale_is_the_finest_that_cannot_wrap(weights, r):
    k = choose_scale_bits(weights, r)
    check_no_wrap(weights, r, k)
    assert sum_bound(weights, r, k) <= INT32_MAX < sum_bound(weights, r, k + 1)
    with pytest.raises(OverflowRiskError, match="could sum to"):
        check_no_wrap(weights, r, k + 1)


def test_overflow_refused_is_a_value_error():
    with pytest.raises(ValueError):
        check_no_wrap([1.0] * 5, 1.0, 29)  # 5 unweighted clients at 2^29 per unit: 5·2^29 > 2^31
    check_no_wrap([1.0] * 3, 1.0, 29)  # 3·2^29 + 3 rounding < 2^31


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-3.0, 3.0, allow_subnormal=False), min_size=1, max_size=200),
    st.floats(0.05, 1.0),
    st.floats(0.1, 2.0),
    st.integers(4, 30),
)
def test_quantization_error_and_saturation(xs, w, r, k):
    x = np.array(xs, dtype=np.float64)
    q, saturated = quantize(x, w, r, k)
    scale = 2.0**k
    clipped = np.clip(x, -r, r)
    assert saturated == int(np.sum(np.abs(x) > r))
    err = np.abs(q / scale - w * clipped)
    assert np.all(err <= 0.5 / scale + 1e-15 * np.abs(w * clipped) + 1e-300)
    assert np.all(np.abs(q) <= round(r * scale_factor(w, k)))
    # the block routine gives the same words (two's complement in uint32)
    out = np.empty(x.size, dtype=U32)
    sat2 = quantize_into(
        x.astype(np.float32).astype(np.float64),
        out,
        scale_factor(w, k),
        r,
        np.empty(x.size),
        np.empty(x.size, np.int64),
    )
    q32, sat32 = quantize(x.astype(np.float32), w, r, k)
    assert sat2 == sat32
    np.testing.assert_array_equal(out.view(np.int32).astype(np.int64), q32)


def test_nan_cannot_be_quantized():
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([0.0, math.nan]), 1.0, 1.0, 10)
    with pytest.raises(ValueError, match="NaN"):
        quantize_into(np.array([np.inf]), np.empty(1, U32), 1.0, 1.0, np.empty(1), np.empty(1, np.int64))


def test_dequantize_is_float64_division():
    s = np.array([-(2**31) + 1, -5, 0, 7, 2**31 - 1], dtype=np.int32)
    out = dequantize(s, 20, 0.6, np.float64, block=2)
    np.testing.assert_array_equal(out, s.astype(np.float64) / (0.6 * 2.0**20))
    with pytest.raises(ValueError):
        dequantize(s, 20, 0.0)
