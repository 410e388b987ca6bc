"""Noise sources for the DP mechanisms: a cryptographically secure default and a seeded one for tests.

Every mechanism in :mod:`privfl.defenses.dp` draws its noise from a :class:`NoiseSource`:

- :class:`SecureNoise` (the default, :func:`default_noise`): a ChaCha20 keystream from
  ``cryptography`` (OpenSSL), keyed with 32 bytes from ``os.urandom`` per instance. Its output cannot
  be predicted or replayed by anyone who does not hold that key, even after seeing any amount of
  earlier noise.
- :class:`SeededNoise`: ``torch.Generator`` (Mersenne Twister) seeded from ``(seed, *key)`` with
  :func:`~privfl.seeding.derive_seed`. Reproducible, fast, and **not secure**.

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
**not** implement snapping or discrete noise, so this rounding attack is **not** mitigated: its
guarantees, like those of opacus and most DP deep-learning libraries, hold for the idealised
real-valued mechanism only.

What privfl does control is the tail. Finite-precision uniforms truncate it, and a truncated tail
is a δ of its own. :class:`SecureNoise` therefore draws every uniform that sets a tail from a full
64-bit keystream word and transforms it in float64 (for float32 requests too), casting at the end:
the Gaussian radius ``√(−2 ln u)`` with ``u = (v+1)·2⁻⁶⁴`` reaches at most
:data:`GAUSSIAN_MAX_RADIUS` ``= √(128 ln 2) ≈ 9.419`` σ, the Laplace magnitude ``−ln u`` with
``u = (v₆₃+1)·2⁻⁶³`` at most :data:`LAPLACE_MAX_MAGNITUDE` ``= 63 ln 2 ≈ 43.668`` b (both measured
by feeding the extreme keystream words, ``tests/test_rng_tails.py``).

Tail floor: the δ the truncation costs
--------------------------------------
The ideal distribution's mass beyond those maxima — what one draw can never produce — is exactly the
smallest uniform: ``2⁻⁶⁴`` per Box–Muller pair (``P(R > r) = exp(−r²/2σ²)``) and ``2⁻⁶³`` per
Laplace value. :meth:`NoiseSource.tail_floor` returns it union-bounded over one draw of ``n``
values, ``ceil(n/2)·2⁻⁶⁴`` (Gaussian) or ``n·2⁻⁶³`` (Laplace), independent of the scale;
:class:`SeededNoise` reports the same floor as :class:`SecureNoise`. The privacy accountant
(:mod:`privfl.defenses.accounting`) adds ``releases × floor`` to the δ it reports and refuses when
that exceeds 1% of the target δ. For the 55.4 M parameters of DHU-Net the Gaussian floor is
≈ 1.5e-12 per release.

Memory and speed
----------------
Large requests are produced in chunks of 256 Ki values (1 MiB of float32, cache-sized) with in-place
numpy ufuncs, so apart from the result each worker thread holds only one chunk's keystream and
scratch buffers (12 bytes per value for Gaussian noise, 16 for Laplace noise: 3 and 4 MiB).
``python -m privfl.bench noise`` times :class:`SecureNoise` against ``torch.randn`` of the same size,
with both cores free and with one (under ``taskset -c 0``); the figures are in
``benchmarks/RESULTS.md``, section "DP noise source".
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch import Tensor

from privfl.parallel import run_blocks
from privfl.seeding import derive_seed

__all__ = [
    "GAUSSIAN_MAX_RADIUS",
    "LAPLACE_MAX_MAGNITUDE",
    "NoiseSource",
    "SecureNoise",
    "SeededNoise",
    "default_noise",
]

ShapeLike = int | Sequence[int] | torch.Size

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEFAULT_CHUNK = 1 << 18  # values per chunk: 256 Ki (1 MiB of float32)

GAUSSIAN_MAX_RADIUS = math.sqrt(128 * math.log(2))
"""Largest magnitude :class:`SecureNoise` Gaussian noise can reach, in units of std (≈ 9.4193):
``√(−2 ln 2⁻⁶⁴)``, the Box–Muller radius at the smallest 64-bit uniform."""
LAPLACE_MAX_MAGNITUDE = 63 * math.log(2)
"""Largest magnitude :class:`SecureNoise` Laplace noise can reach, in units of b (≈ 43.668):
``−ln 2⁻⁶³``, at the smallest 63-bit uniform."""

_U64 = 2.0**-64  # (v + 1)·2⁻⁶⁴: 64-bit uniform in (0, 1]
_U63 = 2.0**-63  # (v + 1)·2⁻⁶³: 63-bit uniform in (0, 1]
_SIGN64 = np.int64(-(1 << 63))  # the top bit of a word read as int64
_LOW63 = np.int64((1 << 63) - 1)
_TWO64_BITS = np.float64(2.0**64).view(np.int64)  # bit pattern of the float64 2⁶⁴
_ANGLE32 = np.float32(2 * math.pi * 2.0**-32)  # int32 word -> θ in [-π, π)
_ANGLE64 = 2 * math.pi * 2.0**-64  # int64 word -> θ in [-π, π)


def _uniform64(words: np.ndarray, out: np.ndarray) -> None:
    """``out = (v + 1)·2⁻⁶⁴`` in float64 for the 64-bit words ``v`` (an int64 array, overwritten).

    numpy converts int64 to float64 with SIMD but uint64 an element at a time (much slower), so the
    words are converted as signed ints and ``2⁶⁴`` is added back where the top bit is set. Each
    step rounds to nearest (``u`` is within about one float64 ulp of the exact value, and exact
    below 2⁻¹¹), so ``u`` lies in ``(0, 1]``: the smallest is ``2⁻⁶⁴`` exactly (v = 0) and no
    intermediate passes ``2⁶⁴`` (rounding is monotone and ``2⁶⁴`` is representable), so ``u <= 1``.
    """
    np.copyto(out, words, casting="unsafe")  # v, or v - 2⁶⁴ where the top bit is set
    np.right_shift(words, 63, out=words)  # -1 where the top bit is set, else 0
    np.bitwise_and(words, _TWO64_BITS, out=words)  # 2⁶⁴ there, +0.0 elsewhere (as float64 bits)
    out += words.view(np.float64)
    out += 1.0
    out *= _U64  # exact: a power of two


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


def _check_count(n: int) -> int:
    """``n`` as an int; ValueError unless it is an int (not a bool) >= 0."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return int(n)


def _check_probability(p: float) -> float:
    """``p`` as a float; ValueError unless it is a real number in [0, 1]."""
    try:
        q = float(p)
    except (TypeError, ValueError) as err:
        raise ValueError(f"p must be a real number, got {p!r}") from err
    if not 0.0 <= q <= 1.0:  # also rejects NaN
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    return q


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

    :meth:`bernoulli` draws coin flips (DP-SGD's Poisson sampling) from the same source, and
    :meth:`tail_floor` gives the δ a draw's bounded tails cost (module docstring, "Tail floor").
    """

    name: str
    """Shown in logs and results."""
    secure: bool
    """Whether the noise is unpredictable to an adversary (cryptographically secure)."""

    def gaussian(
        self,
        shape: ShapeLike,
        std: float,
        *,
        key: tuple = (),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """I.i.d. ``N(0, std²)`` noise of ``shape``; ``std`` in the units of the tensor it is added to.

        ``std == 0`` gives zeros; a negative, infinite or NaN ``std`` raises ValueError.
        """
        return self._draw(self._gaussian, shape, _check_scale(std, "std"), key, dtype, device)

    def laplace(
        self,
        shape: ShapeLike,
        scale: float,
        *,
        key: tuple = (),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """I.i.d. Laplace(0, ``scale``) noise of ``shape`` (density ``exp(-|x|/b) / 2b``, so
        ``E|X| = b`` and std ``√2·b``); ``scale`` in the units of the tensor it is added to.

        ``scale == 0`` gives zeros; a negative, infinite or NaN ``scale`` raises ValueError.
        """
        return self._draw(self._laplace, shape, _check_scale(scale, "scale"), key, dtype, device)

    def tail_floor(self, kind: Literal["gaussian", "laplace"], n: int) -> float:
        """Probability mass of the ideal (real-valued) distribution's tail that one draw of ``n``
        values can never produce, union-bounded over the draw: a δ to add per release.

        :class:`SecureNoise` builds every tail from a 64-bit uniform ``u >= u_min``:

        - ``"gaussian"``: one Box–Muller pair per two values, radius ``R = σ·√(−2 ln u)`` at most
          ``R_max = GAUSSIAN_MAX_RADIUS·σ``; under the exact law ``P(R > r) = exp(−r²/2σ²)``, so
          ``P(R > R_max) = u_min = 2⁻⁶⁴`` per pair and the floor is ``ceil(n/2)·2⁻⁶⁴``.
        - ``"laplace"``: ``|X| = −b ln u`` at most ``LAPLACE_MAX_MAGNITUDE·b`` with
          ``P(|X| > M_max) = u_min = 2⁻⁶³`` per value, so the floor is ``n·2⁻⁶³``.

        It does not depend on the scale (std or b), only on the number of values. ``kind`` must be
        ``"gaussian"`` or ``"laplace"`` and ``n`` an int >= 0 (ValueError otherwise).
        """
        n = _check_count(n)
        if kind == "gaussian":
            return -(-n // 2) * 2.0**-64
        if kind == "laplace":
            return n * 2.0**-63
        raise ValueError(f"kind must be 'gaussian' or 'laplace', got {kind!r}")

    def bernoulli(self, n: int, p: float, *, key: tuple = ()) -> Tensor:
        """``n`` independent Bernoulli(``p``) draws as a flat bool CPU tensor (True with probability
        ``p``), e.g. Poisson sampling's per-example coin flips.

        ``p == 0`` gives all False and ``p == 1`` all True, exactly. ``n`` must be an int >= 0 and
        ``p`` a real number in ``[0, 1]`` (ValueError otherwise). ``key`` names the draw, as for
        :meth:`gaussian`.
        """
        n = _check_count(n)
        q = _check_probability(p)
        if n == 0 or q == 0.0:
            return torch.zeros(n, dtype=torch.bool)
        if q == 1.0:
            return torch.ones(n, dtype=torch.bool)
        return self._bernoulli(n, q, tuple(key))

    def _draw(
        self,
        fill: Any,
        shape: ShapeLike,
        scale: float,
        key: tuple,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> Tensor:
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

    @abstractmethod
    def _bernoulli(self, n: int, p: float, key: tuple) -> Tensor:
        """``n >= 1`` Bernoulli(``p``) draws, ``0 < p < 1``, as a flat bool CPU tensor."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SecureNoise(NoiseSource):
    """Cryptographically secure noise from a ChaCha20 keystream (the default source).

    Keying: 32 bytes from ``os.urandom`` per instance (and again in a forked child, detected by
    PID, so parent and child never share a stream). Nonces: every call takes a fresh call number
    from a per-instance counter and every chunk of a call its own 16-byte ChaCha20 nonce
    ``(block counter 0 [4 bytes] ‖ call number [8 bytes] ‖ chunk number [4 bytes])``, so no
    keystream byte is ever used twice by one key. A chunk takes at most 8 bytes of keystream per
    value (at most 8 GiB at the largest ``chunk_size``), far below the 256 GiB a 32-bit block
    counter covers, so chunks never overlap. The ``key`` argument is ignored: the output is never
    reproducible.

    Uniforms: every uniform that sets a tail comes from a full 64-bit keystream word ``v`` and is
    transformed in float64, whatever the requested dtype; the result is cast at the end (float16
    and bfloat16 are drawn as float32 and rounded).

    - Gaussian: Box–Muller, both outputs used. Per pair one 64-bit word gives
      ``u = (v+1)·2⁻⁶⁴`` in ``(0, 1]`` (never 0: at least ``2⁻⁶⁴``) and the radius
      ``r = std·√(−2 ln u)`` in float64, at most ``GAUSSIAN_MAX_RADIUS·std ≈ 9.419·std``. The angle
      ``θ``, uniform in ``[−π, π)``, sets no tail: for float32 requests it comes from a 32-bit word
      and ``sin θ``, ``cos θ`` are computed in float32 (``r`` is rounded to float32 before the
      product); for float64 requests from a 64-bit word in float64. ``z₁ = r·sin θ`` fills the
      first half of a chunk and ``z₂ = r·cos θ`` the second. Keystream per pair: 12 bytes
      (float32) or 16 (float64).
    - Laplace: inverse CDF. Per value one 64-bit word: its top bit is the sign and the other 63
      bits give ``u = (v₆₃+1)·2⁻⁶³`` in ``(0, 1]``; ``|X| = −b·ln u`` (exactly Exp(b) up to the
      uniform's resolution) in float64, at most ``LAPLACE_MAX_MAGNITUDE·b ≈ 43.668·b``.
    - Bernoulli(p): per draw one 64-bit word, True when ``v < round(p·2⁶⁴)``.

    See :meth:`NoiseSource.tail_floor` for the δ the bounded tails cost.

    Speed: chunks are shared out to ``threads`` worker threads (the caller's thread is one of them)
    that take the next chunk when they finish one, each with its own reused buffers. Both the
    keystream (OpenSSL) and the in-place numpy ufuncs release the GIL, so the threads run in
    parallel, writing straight into the result's memory (a torch tensor viewed as numpy, no copies).
    This is deliberately not done with torch's intra-op (OpenMP) threads: every torch op is a
    parallel region that waits for its slowest thread, and on a shared machine where another
    process holds one core that made the same work several times slower (``benchmarks/RESULTS.md``,
    section "DP noise source"); work-sharing threads degrade gracefully to one core's speed instead.
    """

    name = "chacha20 (secure)"
    secure = True

    def __init__(self, *, chunk_size: int = _DEFAULT_CHUNK, threads: int | None = None) -> None:
        """``chunk_size``: values per chunk (scratch memory per thread, keystream included: 12 bytes
        per value for Gaussian noise, 16 for Laplace noise, 8 for Bernoulli draws); ``threads``:
        worker threads, default ``torch.get_num_threads()`` at call time."""
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

    def _keystream(self, key: bytes, call: int, chunk: int, zeros: memoryview, out: np.ndarray) -> None:
        """Write the ChaCha20 keystream of chunk ``chunk`` of call ``call`` into ``out`` (a contiguous
        uint8 array; ``zeros``: as many zero bytes, the plaintext). Nonce ``(block counter 0 ‖ call ‖
        chunk)``. Tests replace this to feed chosen words."""
        nonce = bytes(4) + call.to_bytes(8, "little") + chunk.to_bytes(4, "little")
        enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        enc.update_into(zeros, out.data)

    def _run(
        self,
        m: int,
        out_dtype: torch.dtype,
        value_bytes: int,
        chunk_fn: Callable[[np.ndarray, np.ndarray, tuple], None],
        make_scratch: Callable[[int], tuple] = lambda c: (),
    ) -> np.ndarray:
        """Fill ``m`` values of ``out_dtype`` chunk by chunk (chunks of ``chunk_size`` values, even):
        ``chunk_fn(out, raw, scratch)`` gets the chunk's output slice, its ``value_bytes`` bytes of
        keystream per value as a uint8 array, and this thread's ``make_scratch(chunk_size)``."""
        c = min(self.chunk_size, m)
        n_chunks = -(-m // c)
        out = torch.empty(m, dtype=out_dtype).numpy()
        key, call = self._new_call()
        zeros = memoryview(bytes(c * value_bytes))  # calloc'd zero pages: costs no real memory

        def work(i: int, scratch: tuple) -> None:
            start = i * c
            size = min(c, m - start)
            nbytes = size * value_bytes
            raw = scratch[0][:nbytes]
            self._keystream(key, call, i, zeros[:nbytes], raw)
            chunk_fn(out[start : start + size], raw, scratch[1:])

        run_blocks(
            n_chunks,
            work,
            lambda: (np.empty(c * value_bytes, dtype=np.uint8), *make_scratch(c)),
            self.threads,
        )
        return out

    def _gaussian(self, n: int, std: float, key: tuple, dtype: torch.dtype) -> Tensor:
        f64 = dtype == torch.float64
        # fold std into the log step when -2·std² is comfortably representable in float64
        factor = -2.0 * std * std if 1e-300 < 2.0 * std * std < 1e300 else -2.0

        def chunk(o: np.ndarray, raw: np.ndarray, scratch: tuple) -> None:
            p = o.size // 2
            r = o[:p] if f64 else scratch[0][:p]  # radius, float64
            z = o[p:]
            s = scratch[-1][:p]
            _uniform64(raw[: 8 * p].view(np.int64), r)  # u in (0, 1]
            np.log(r, out=r)
            r *= factor
            np.sqrt(r, out=r)
            if factor == -2.0:
                r *= std
            if f64:
                np.copyto(z, raw[8 * p :].view(np.int64), casting="unsafe")
                z *= _ANGLE64  # θ in [-π, π)
            else:
                np.copyto(z, raw[8 * p :].view(np.int32), casting="unsafe")
                z *= _ANGLE32
            np.sin(z, out=s)
            np.cos(z, out=z)
            if f64:
                z *= r
                r *= s
            else:
                r32 = o[:p]
                np.copyto(r32, r, casting="unsafe")
                z *= r32
                r32 *= s

        if f64:
            out = self._run(n + (n & 1), torch.float64, 8, chunk, lambda c: (np.empty(c // 2),))
        else:
            out = self._run(
                n + (n & 1),
                torch.float32,
                6,
                chunk,
                lambda c: (np.empty(c // 2), np.empty(c // 2, dtype=np.float32)),
            )
        return torch.from_numpy(out)[:n]

    def _laplace(self, n: int, scale: float, key: tuple, dtype: torch.dtype) -> Tensor:
        f64 = dtype == torch.float64

        def chunk(o: np.ndarray, raw: np.ndarray, scratch: tuple) -> None:
            w = raw.view(np.int64)
            signs = scratch[0][: o.size]
            mag = o if f64 else w.view(np.float64)  # float64; for float32 in place of the words
            np.bitwise_and(w, _SIGN64, out=signs)
            np.bitwise_and(w, _LOW63, out=w)  # v63 >= 0
            np.copyto(mag, w, casting="unsafe")
            mag += 1.0
            mag *= _U63  # u in (0, 1]
            np.log(mag, out=mag)
            mag *= -scale  # |X| = -b ln u >= 0
            mag += 0.0  # -0.0 (u = 1) -> +0.0, so that the sign bit alone sets the sign
            bits = mag.view(np.int64)
            np.bitwise_or(bits, signs, out=bits)
            if not f64:
                np.copyto(o, mag, casting="unsafe")

        out = self._run(n, dtype, 8, chunk, lambda c: (np.empty(c, dtype=np.int64),))
        return torch.from_numpy(out)

    def _bernoulli(self, n: int, p: float, key: tuple) -> Tensor:
        threshold = np.uint64(round(Fraction(p) * 2**64))  # 0 < p < 1 -> threshold < 2⁶⁴

        def chunk(o: np.ndarray, raw: np.ndarray, _scratch: tuple) -> None:
            np.less(raw.view(np.uint64), threshold, out=o)

        return torch.from_numpy(self._run(n, torch.bool, 8, chunk))

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
    and a Laplace draw under the same key share a stream, so give them different keys (the same goes
    for :meth:`bernoulli`, ``torch.rand(n, dtype=float64) < p``). Key elements that are not
    non-negative ints are hashed as ``str``.

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

    def tail_floor(self, kind: Literal["gaussian", "laplace"], n: int) -> float:
        """The same floor as :class:`SecureNoise` for the same request (see
        :meth:`NoiseSource.tail_floor`), although this source's own tails are set by ``torch``'s
        samplers: a seeded run is an experiment whose (ε, δ) describes the same configuration
        deployed with :class:`SecureNoise`, so it reports that deployment's δ. The seeded noise itself
        is predictable and protects nothing (module docstring), whatever δ says."""
        return super().tail_floor(kind, n)

    def _bernoulli(self, n: int, p: float, key: tuple) -> Tensor:
        return torch.rand(n, generator=self._generator(key), dtype=torch.float64) < p

    def __repr__(self) -> str:
        return f"SeededNoise(seed={self.seed})"


def default_noise() -> NoiseSource:
    """The noise source mechanisms use when given none: a fresh :class:`SecureNoise`."""
    return SecureNoise()
