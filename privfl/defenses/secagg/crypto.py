"""Cryptographic building blocks of secure aggregation, all from ``cryptography`` (OpenSSL).

* Key agreement: X25519 (:func:`agree`), raw 32-byte keys.
* Key derivation: HKDF-SHA256 (:func:`hkdf`), salted with the round's 32-byte session id and with
  the parties' ids in ``info``, so every derived key is bound to one round and one purpose:
  :func:`pair_mask_key` (pairwise mask seed s_{u,v}), :func:`self_mask_key` (self mask from b_u),
  :func:`share_key` (AEAD key for the shares u sends to v — directional).
* Masks: the ChaCha20 keystream (RFC 7539: 32-bit block counter, 96-bit nonce) under a mask key,
  read as little-endian uint32 words, is the mask vector in Z_2^32. Word ``i`` of the mask is word
  ``i mod 16`` of keystream block ``i // 16``, so any range of the mask can be produced on its own
  (:func:`keystream_into`): a vector is masked block by block, in parallel, and the result does not
  depend on the block size or the number of threads. The block counter limits a mask to 2^36 words.
* Share encryption: ChaCha20-Poly1305 AEAD (:func:`aead_encrypt` / :func:`aead_decrypt`).
* Signatures: Ed25519 (:func:`sign` / :func:`verify`). Large messages are signed through a tree
  digest (:func:`block_digest` per block, then :func:`tree_digest`), which blocks hash in parallel.

Speed: ``python -m privfl.bench secagg`` times ChaCha20 masks against the same number of words from
numpy's ``RandomState`` (MT19937); the figures are in ``benchmarks/RESULTS.md``, section "Secure
aggregation".
Work is shared out like :class:`~privfl.defenses.rng.SecureNoise`: worker threads take the next block
when they finish one (OpenSSL and numpy release the GIL), each with its own scratch buffers, so
memory beyond the vector itself is a few block-sized buffers per thread.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privfl.defenses.secagg.errors import SecAggIntegrityError
from privfl.parallel import default_threads, run_blocks

__all__ = [
    "U32",
    "MaskTerm",
    "add_masks",
    "aead_decrypt",
    "aead_encrypt",
    "agree",
    "block_digest",
    "default_threads",
    "hkdf",
    "keystream_into",
    "mask_block",
    "new_signing_key",
    "new_x25519",
    "pair_mask_key",
    "public_x25519",
    "run_blocks",
    "self_mask_key",
    "share_key",
    "sign",
    "signing_public",
    "tree_digest",
    "verify",
]

U32 = np.dtype("<u4")
"""Mask and masked-input words: little-endian uint32 (the wire byte order)."""
KEY_BYTES = 32
_MASK_NONCE = b"privfl.mask1"  # 12 bytes; the key is unique per round and pair, the nonce is constant
_MAX_BLOCKS = 1 << 32  # ChaCha20's 32-bit block counter
_INFO = b"privfl/secagg/v1/"


# ------------------------------------------------------------------------------ key agreement, KDF


def new_x25519() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair ``(secret key, public key)``, 32 raw bytes each."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def public_x25519(secret_key: bytes) -> bytes:
    """The public key of a raw X25519 secret key."""
    return X25519PrivateKey.from_private_bytes(secret_key).public_key().public_bytes_raw()


def agree(secret_key: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret (32 bytes). A low-order peer key (all-zero result) raises
    :class:`SecAggIntegrityError`."""
    try:
        return X25519PrivateKey.from_private_bytes(secret_key).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as err:
        raise SecAggIntegrityError(f"X25519 key agreement failed (invalid peer key): {err}") from err


def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``ikm``: ``length`` bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _ids(*ids: int) -> bytes:
    return struct.pack(f"<{len(ids)}Q", *ids)


def pair_mask_key(shared: bytes, session_id: bytes, u: int, v: int) -> bytes:
    """Pairwise mask key s_{u,v} = HKDF(X25519(s_u^SK, s_v^PK)); symmetric in ``u, v``."""
    return hkdf(shared, salt=session_id, info=_INFO + b"pair-mask" + _ids(min(u, v), max(u, v)))


def self_mask_key(seed: bytes, session_id: bytes, u: int) -> bytes:
    """Self-mask key of client ``u`` from its 32-byte seed b_u."""
    return hkdf(seed, salt=session_id, info=_INFO + b"self-mask" + _ids(u))


def share_key(shared: bytes, session_id: bytes, sender: int, recipient: int) -> bytes:
    """AEAD key for the shares ``sender`` encrypts to ``recipient`` (from X25519 of their c-keys);
    directional, so the two directions of a pair never share a key."""
    return hkdf(shared, salt=session_id, info=_INFO + b"share-enc" + _ids(sender, recipient))


# ------------------------------------------------------------------------------ AEAD, signatures

_AEAD_NONCE = bytes(12)  # every share key encrypts exactly one message


def aead_encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption (ciphertext ‖ 16-byte tag). ``key`` must encrypt only this message."""
    return ChaCha20Poly1305(key).encrypt(_AEAD_NONCE, plaintext, associated)


def aead_decrypt(key: bytes, ciphertext: bytes, associated: bytes, what: str) -> bytes:
    """Decrypt and authenticate; a wrong tag (tampered ciphertext or associated data) raises
    :class:`SecAggIntegrityError` naming ``what``."""
    try:
        return ChaCha20Poly1305(key).decrypt(_AEAD_NONCE, bytes(ciphertext), associated)
    except InvalidTag as err:
        raise SecAggIntegrityError(f"{what}: authentication tag mismatch (tampered or misdirected)") from err


def new_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key (from the OS's secure random source)."""
    return Ed25519PrivateKey.generate()


def signing_public(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte Ed25519 verification key of ``key``."""
    return key.public_key().public_bytes_raw()


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes)."""
    return key.sign(message)


def verify(public: bytes, signature: bytes, message: bytes, what: str) -> None:
    """Check an Ed25519 signature; a bad one raises :class:`SecAggIntegrityError` naming ``what``."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(signature), message)
    except (InvalidSignature, ValueError) as err:
        raise SecAggIntegrityError(f"{what}: invalid signature (tampered or forged)") from err


def block_digest(words: np.ndarray) -> bytes:
    """SHA-256 of one block of a word vector, in its wire (little-endian) byte order."""
    return hashlib.sha256(np.ascontiguousarray(words, dtype=U32).data.cast("B")).digest()


def tree_digest(header: bytes, digests: Sequence[bytes]) -> bytes:
    """SHA-256 over a header and the per-block digests: what a large message's signature covers."""
    h = hashlib.sha256(_INFO + b"tree")
    h.update(struct.pack("<Q", len(header)))
    h.update(header)
    h.update(struct.pack("<Q", len(digests)))
    for d in digests:
        h.update(d)
    return h.digest()


# ------------------------------------------------------------------------------ masks


class MaskTerm(NamedTuple):
    """One mask to add (``sign = +1``) or subtract (``sign = -1``) modulo 2^32."""

    key: bytes
    sign: int


def keystream_into(key: bytes, start_word: int, out: np.ndarray, zeros: bytes | None = None) -> None:
    """Fill ``out`` (uint32, contiguous) with words ``start_word .. start_word + len(out)`` of the mask
    under ``key``. ``zeros``: an all-zero buffer of at least ``4·len(out)`` bytes to reuse."""
    n = out.size
    if n == 0:
        return
    if start_word < 0 or (start_word + n + 15) // 16 > _MAX_BLOCKS:
        raise ValueError(f"mask words {start_word}..{start_word + n} exceed ChaCha20's 2^36-word range")
    skip = start_word % 16
    block = start_word // 16
    nbytes = 4 * (n + skip)
    if zeros is None or len(zeros) < nbytes:
        zeros = bytes(nbytes)
    enc = Cipher(algorithms.ChaCha20(key, block.to_bytes(4, "little") + _MASK_NONCE), mode=None).encryptor()
    if skip == 0:
        enc.update_into(memoryview(zeros)[:nbytes], out.data.cast("B"))
        return
    tmp = np.empty(n + skip, dtype=U32)
    enc.update_into(memoryview(zeros)[:nbytes], tmp.data.cast("B"))
    out[:] = tmp[skip:]


def mask_block(
    out: np.ndarray,
    start_word: int,
    terms: Sequence[MaskTerm],
    scratch: np.ndarray,
    zeros: bytes | None = None,
) -> None:
    """Add (or subtract) every mask in ``terms`` to ``out`` (words ``start_word ..``), modulo 2^32,
    using ``scratch`` (uint32, at least ``len(out)`` words) for the keystream."""
    buf = scratch[: out.size]
    for key, sgn in terms:
        keystream_into(key, start_word, buf, zeros)
        if sgn > 0:
            np.add(out, buf, out=out)
        else:
            np.subtract(out, buf, out=out)


def add_masks(
    vec: np.ndarray, terms: Sequence[MaskTerm], *, block_words: int = 1 << 18, threads: int | None = None
) -> None:
    """Add every mask in ``terms`` to the uint32 vector ``vec`` in place, modulo 2^32 (block-parallel)."""
    n = vec.size
    n_blocks = -(-n // block_words)

    def work(i: int, scratch: tuple[np.ndarray, bytes]) -> None:
        a = i * block_words
        mask_block(vec[a : a + block_words], a, terms, scratch[0], scratch[1])

    run_blocks(
        n_blocks,
        work,
        lambda: (np.empty(min(block_words, n), dtype=U32), bytes(4 * min(block_words, n))),
        threads,
    )
