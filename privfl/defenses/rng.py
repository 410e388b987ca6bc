"""Noise sources for the DP mechanisms: a cryptographically secure default and a seeded one for tests.

Every mechanism in :mod:`privfl.defenses.dp` draws its noise from a :class:`NoiseSource`:

- :class:`SecureNoise` (the default, :func:`default_noise`): a ChaCha20 keystream from
  ``cryptography`` (OpenSSL), keyed with 32 bytes from ``os.urandom`` per instance. Its output cannot
  be predicted or replayed by anyone who does not hold that key, even after seeing any amount of
  earlier noise.
- :class:`SeededNoise`: ``torch.Generator`` (Mersenne Twister) seeded from ``(seed, *key)`` with
  :func:`~privfl.fl.seeding.derive_seed`. Reproducible, fast, and **not secure**.

Why ``torch.randn`` / the Mersenne Twister is not acceptable for real deployments
---------------------------------------------------------------------------------
DP's guarantee assumes the adversary does not know the noise. MT19937 is not a cryptographic
generator: its whole 19937-bit state can be recovered from 624 consecutive 32-bit outputs, and then
every past and future output is known. A federated update carries millions of noise draws, so one
noised update that leaks (or a noise-free probe the attacker can difference against) is enough to
reconstruct the generator state and subtract the noise from every other update noised from the same
stream — the privacy guarantee vanishes while the accountant still reports a finite ε. Seeds derived
from an experiment seed are worse still: anyone who knows or guesses the seed (default seeds such as
0 or 42, a timestamp) regenerates the noise outright. Use :class:`SeededNoise` only for experiments
that must replay exactly; the mechanisms warn when they are given a non-secure source.

Known limitation: floating-point attacks
----------------------------------------
Even with a perfect random source, adding noise in floating point is not exactly the mechanism the
proofs analyse. Mironov (2012, "On significance of the least significant bits for differential
privacy") showed that the set of representable values ``x + noise`` depends on ``x``, so an
attacker can sometimes tell neighbouring inputs apart from the low-order bits of a released value;
the fix is a *snapping* mechanism (or discrete Gaussian/Laplace noise on a fixed grid). privfl does
**not** implement snapping or discrete noise: its guarantees, like those of opacus and most DP
deep-learning libraries, hold for the idealised real-valued mechanism only. In addition, the uniforms
are finite-precision (31 bits for float32 requests, 53 bits for float64), which truncates the tails:
a float32 Gaussian never exceeds about 6.55 σ in magnitude (probability ≈ 6e-11 under the exact law),
a float32 Laplace never exceeds 21.5 b (probability 2⁻³¹).

Memory and speed
----------------
Large requests are produced in chunks of 256 Ki values (1 MiB of float32, cache-sized: measured
faster than 1–16 Mi chunks) with in-place numpy ufuncs, so apart from the result each worker thread
holds only two chunk-sized buffers (2 MiB for float32). On the 2-core development machine
:class:`SecureNoise` Gaussian noise for the 55.4 M parameters of DHU-Net takes about 0.6× the time of
``torch.randn`` of the same size with both cores free and about 1.15× with one core
(``python -m privfl.bench noise`` measures both side by side).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch import Tensor

from privfl.fl.seeding import derive_seed
from privfl.parallel import run_blocks

__all__ = ["NoiseSource", "SecureNoise", "SeededNoise", "default_noise"]

ShapeLike = int | Sequence[int] | torch.Size

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEFAULT_CHUNK = 1 << 18  # values per chunk: 256 Ki (1 MiB of float32)

# Fixed-point layout of the keystream words, per compute dtype:
# (word dtype, magnitude mask, 2^-magnitude bits, sign-bit value, 2π / 2^word bits).
_LAYOUT = {
    torch.float32: (np.int32, (1 << 31) - 1, 2.0**-31, -(1 << 31), 2 * math.pi * 2.0**-32),
    torch.float64: (np.int64, (1 << 53) - 1, 2.0**-53, -(1 << 63), 2 * math.pi * 2.0**-64),
}


def _check_scale(value: float, what: str) -> float:
    """``value`` as a float; ValueError unless it is finite and >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a real number, got {value!r}") from err
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {value!r}")
    return v


def _check_shape(shape: ShapeLike) -> tuple[int, ...]:
    """Normalise an int / sequence / ``torch.Size`` to a tuple of non-negative ints (``()`` = scalar)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        dims: tuple[int, ...] = (int(shape),)
    else:
        try:
            dims = tuple(int(d) for d in shape)  # type: ignore[union-attr]
        except TypeError as err:
            raise ValueError(f"shape must be an int or a sequence of ints, got {shape!r}") from err
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative dimensions, got {dims}")
    return dims


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"noise dtype must be a floating-point dtype {_FLOAT_DTYPES}, got {dtype}")
    return dtype


class NoiseSource(ABC):
    """Where a DP mechanism's noise comes from.

    ``gaussian`` and ``laplace`` validate their arguments here and delegate to ``_gaussian`` /
    ``_laplace``, which return a flat CPU tensor of ``n`` values in the compute dtype (float32, or
    float64 for float64 requests); the result is then reshaped, cast to ``dtype`` (float16 and
    bfloat16 are drawn in float32 and rounded) and moved to ``device``.

    ``key`` names the draw (for example ``("GaussianMechanism", round, client)``). Reproducible
    sources derive their stream from it; secure sources ignore it.
    """

    name: str
    """Shown in logs and results."""
    secure: bool
    """Whether the noise is unpredictable to an adversary (cryptographically secure)."""

    def gaussian(self, shape: ShapeLike, std: float, *, key: tuple = (), dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Tensor:
        """I.i.d. ``N(0, std²)`` noise of ``shape``; ``std`` in the units of the tensor it is added to.

        ``std == 0`` gives zeros; a negative, infinite or NaN ``std`` raises ValueError.
        """
        return self._draw(self._gaussian, shape, _check_scale(std, "std"), key, dtype, device)

    def laplace(self, shape: ShapeLike, scale: float, *, key: tuple = (), dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Tensor:
        """I.i.d. Laplace(0, ``scale``) noise of ``shape`` (density ``exp(-|x|/b) / 2b``, so
        ``E|X| = b`` and std ``√2·b``); ``scale`` in the units of the tensor it is added to.

        ``scale == 0`` gives zeros; a negative, infinite or NaN ``scale`` raises ValueError.
        """
        return self._draw(self._laplace, shape, _check_scale(scale, "scale"), key, dtype, device)

    def _draw(self, fill: Any, shape: ShapeLike, scale: float, key: tuple, dtype: torch.dtype,
              device: torch.device | str) -> Tensor:
        dims = _check_shape(shape)
        dtype = _check_dtype(dtype)
        key = tuple(key)
        n = math.prod(dims)
        if scale == 0.0 or n == 0:
            return torch.zeros(dims, dtype=dtype, device=device)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        flat = fill(n, scale, key, compute)
        return flat.view(dims).to(dtype=dtype, device=device)

    @abstractmethod
    def _gaussian(self, n: int, std: float, key: tuple, dtype: torch.dtype) -> Tensor:
        """``n`` values of ``N(0, std²)`` as a flat contiguous CPU tensor of ``dtype``."""

    @abstractmethod
    def _laplace(self, n: int, scale: float, key: tuple, dtype: torch.dtype) -> Tensor:
        """``n`` values of Laplace(0, ``scale``) as a flat contiguous CPU tensor of ``dtype``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SecureNoise(NoiseSource):
    """Cryptographically secure noise from a ChaCha20 keystream (the default source).

    Keying: 32 bytes from ``os.urandom`` per instance (and again in a forked child, detected by
    PID, so parent and child never share a stream). Nonces: every call takes a fresh call number
    from a per-instance counter and every chunk of a call its own 16-byte ChaCha20 nonce
    ``(block counter 0 [4 bytes] ‖ call number [8 bytes] ‖ chunk number [4 bytes])``, so no
    keystream byte is ever used twice by one key. A chunk is far below the 256 GiB a 32-bit block
    counter covers. The ``key`` argument is ignored: the output is never
    reproducible.

    Uniforms: for float32 the keystream is read as int32 words; 31 bits give ``u = (v+1)·2⁻³¹`` in
    ``(0, 1]`` (never 0), the remaining sign bit is the Laplace sign. For float64, int64 words give
    53-bit uniforms ``(v+1)·2⁻⁵³``.

    - Gaussian: Box–Muller, both outputs used: ``r = std·√(−2 ln u₁)``, ``θ`` uniform in ``[−π, π)``
      from a full word, ``z₁ = r·sin θ`` (first half of a chunk), ``z₂ = r·cos θ`` (second half).
    - Laplace: inverse CDF, ``|X| = −b·ln u`` (exactly Exp(b)), sign from the independent sign bit.

    Speed: chunks are shared out to ``threads`` worker threads (the caller's thread is one of them)
    that take the next chunk when they finish one, each with its own reused buffers. Both the
    keystream (OpenSSL) and the in-place numpy ufuncs release the GIL, so the threads run in
    parallel, writing straight into the result's memory (a torch tensor viewed as numpy, no copies).
    This is deliberately not done with torch's intra-op (OpenMP) threads: every torch op is a
    parallel region that waits for its slowest thread, and on a shared machine where another
    process holds one core that made the same work about 5× slower; work-sharing threads
    degrade gracefully to one core's speed instead.
    """

    name = "chacha20 (secure)"
    secure = True

    def __init__(self, *, chunk_size: int = _DEFAULT_CHUNK, threads: int | None = None) -> None:
        """``chunk_size``: values per chunk (scratch memory is two chunk-sized integer buffers per
        thread, 8 bytes per value for float32); ``threads``: worker threads, default
        ``torch.get_num_threads()`` at call time."""
        if not 2 <= int(chunk_size) <= 1 << 30:
            raise ValueError(f"chunk_size must be in [2, 2**30], got {chunk_size}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.chunk_size = int(chunk_size) & ~1  # even, so Gaussian pairs never straddle chunks
        self.threads = None if threads is None else int(threads)
        self._lock = threading.Lock()
        self._rekey()

    def _rekey(self) -> None:
        self._key = os.urandom(32)
        self._pid = os.getpid()
        self._calls = itertools.count()

    def _new_call(self) -> tuple[bytes, int]:
        """(key, call number) for one call; re-keys in a forked child."""
        with self._lock:
            if os.getpid() != self._pid:
                self._rekey()
            return self._key, next(self._calls)

    def _run(self, n: int, dtype: torch.dtype, chunk_fn: Callable[..., None]) -> np.ndarray:
        """Fill ``n`` values (rounded up to even) chunk by chunk: ``chunk_fn(out, words, scratch)`` gets
        the chunk's output slice, its keystream as integer words and a scratch array of the same size."""
        word = _LAYOUT[dtype][0]
        m = n + (n & 1)
        c = min(self.chunk_size, m)
        n_chunks = -(-m // c)
        out = torch.empty(m, dtype=dtype).numpy()
        key, call = self._new_call()
        zeros = bytes(c * np.dtype(word).itemsize)  # calloc'd zero pages: costs no real memory
        def work(i: int, bufs: tuple[np.ndarray, np.ndarray]) -> None:
            words, scratch = bufs
            raw = words.view(np.uint8)
            start = i * c
            size = min(c, m - start)
            nonce = bytes(4) + call.to_bytes(8, "little") + i.to_bytes(4, "little")
            enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
            enc.update_into(memoryview(zeros)[: size * words.itemsize], raw[: size * words.itemsize].data)
            chunk_fn(out[start:start + size], words[:size], scratch[:size])

        run_blocks(n_chunks, work, lambda: (np.empty(c, dtype=word), np.empty(c, dtype=word)), self.threads)
        return out

    def _gaussian(self, n: int, std: float, key: tuple, dtype: torch.dtype) -> Tensor:
        _word, mask, unit, _sign, angle = _LAYOUT[dtype]
        # fold std into the log step when -2·std² is comfortably representable in float32
        factor = -2.0 * std * std if 1e-30 < 2.0 * std * std < 1e30 else -2.0

        def chunk(o: np.ndarray, w: np.ndarray, scratch: np.ndarray) -> None:
            p = w.size // 2
            k1, k2 = w[:p], w[p:]
            r, z, s = o[:p], o[p:], scratch[:p].view(o.dtype)
            np.bitwise_and(k1, mask, out=k1)
            np.copyto(r, k1, casting="unsafe")
            r += 1.0
            r *= unit  # u in (0, 1]: exact scaling by a power of two
            np.log(r, out=r)
            r *= factor
            np.sqrt(r, out=r)
            if factor == -2.0:
                r *= std
            np.copyto(z, k2, casting="unsafe")
            z *= angle  # θ in [-π, π)
            np.sin(z, out=s)
            np.cos(z, out=z)
            z *= r
            r *= s

        return torch.from_numpy(self._run(n, dtype, chunk))[:n]

    def _laplace(self, n: int, scale: float, key: tuple, dtype: torch.dtype) -> Tensor:
        _word, mask, unit, sign_bit, _angle = _LAYOUT[dtype]

        def chunk(o: np.ndarray, w: np.ndarray, signs: np.ndarray) -> None:
            np.bitwise_and(w, sign_bit, out=signs)
            np.bitwise_and(w, mask, out=w)
            np.copyto(o, w, casting="unsafe")
            o += 1.0
            o *= unit
            np.log(o, out=o)
            o *= -scale  # |X| = -b ln u >= 0
            bits = o.view(w.dtype)
            np.bitwise_or(bits, signs, out=bits)

        return torch.from_numpy(self._run(n, dtype, chunk))[:n]

    def __repr__(self) -> str:
        return f"SecureNoise(chunk_size={self.chunk_size}, threads={self.threads})"


def _seed_part(part: Any) -> int | str:
    """A key element as :func:`derive_seed` takes it: non-negative ints as themselves, all else as str."""
    if isinstance(part, (int, np.integer)) and not isinstance(part, bool) and part >= 0:
        return int(part)
    return str(part)


class SeededNoise(NoiseSource):
    """Reproducible noise from ``torch.Generator`` (Mersenne Twister) — **not secure**.

    Each call seeds a fresh CPU generator with ``derive_seed(seed, *key)``: the same ``(seed, key)``
    always gives the same noise (on any device, since it is drawn on the CPU and moved), different
    keys give independent streams, and nothing depends on global RNG state or call order. A Gaussian
    and a Laplace draw under the same key share a stream, so give them different keys. Key elements
    that are not non-negative ints are hashed as ``str``.

    See the module docstring for why this must not be used where privacy actually matters.
    """

    name = "seeded torch (reproducible, NOT secure)"
    secure = False

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def _generator(self, key: tuple) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, *(_seed_part(k) for k in key)))

    def _gaussian(self, n: int, std: float, key: tuple, dtype: torch.dtype) -> Tensor:
        return torch.randn(n, generator=self._generator(key), dtype=dtype).mul_(std)

    def _laplace(self, n: int, scale: float, key: tuple, dtype: torch.dtype) -> Tensor:
        # inverse CDF on x = u - 1/2 + half an ulp: torch.rand gives u on the grid k·2⁻ᵖ in [0, 1)
        # (p = 24 for float32, 53 for float64), so x lies on a grid symmetric about 0 that avoids
        # 0 and ±1/2 (the shift is exact); then X = -b·sign(x)·ln(1 - 2|x|) is finite and symmetric.
        p = 53 if dtype == torch.float64 else 24
        x = torch.rand(n, generator=self._generator(key), dtype=dtype)
        x.sub_(0.5).add_(2.0 ** -(p + 1))
        out = torch.abs(x)
        out.mul_(-2.0).add_(1.0).log_().mul_(-scale)
        return out.copysign_(x)

    def __repr__(self) -> str:
        return f"SeededNoise(seed={self.seed})"


def default_noise() -> NoiseSource:
    """The noise source mechanisms use when given none: a fresh :class:`SecureNoise`."""
    return SecureNoise()
