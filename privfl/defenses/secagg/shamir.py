"""t-of-n Shamir secret sharing over the prime field GF(2^127 - 1).

A secret ``s`` (an integer ``0 <= s < p``) is the constant term of a random polynomial
``f(X) = s + a_1 X + ... + a_{t-1} X^{t-1}`` over GF(p) with coefficients drawn uniformly (from
:mod:`secrets`); party ``i`` receives the point ``(x_i, f(x_i))`` for a distinct non-zero ``x_i``.
Any ``t`` points determine ``f`` and hence ``s`` (Lagrange interpolation at 0); any ``t - 1`` points
are consistent with every secret, each with the same number of polynomials, so they reveal nothing
(perfect secrecy).

Byte secrets (32-byte X25519 keys and mask seeds in :mod:`privfl.defenses.secagg`) are cut into
15-byte big-endian limbs, each below ``2^120 < p``, and every limb is shared with its own
independent polynomial; a :class:`Share` carries one y value per limb.

When more than ``t`` shares are given, reconstruction also checks that the extra ones lie on the
polynomial the first ``t`` define, so a corrupted share is detected rather than silently producing a
wrong secret (it cannot be detected with exactly ``t`` shares).

The prime 2^127 - 1 is a Mersenne prime; field arithmetic uses Python integers. The functions take a
``prime=`` argument so that tests can enumerate a small field exhaustively.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from privfl.errors import PrivflError

__all__ = [
    "LIMB_BYTES",
    "PRIME",
    "ShamirError",
    "Share",
    "interpolate",
    "reconstruct_bytes",
    "reconstruct_int",
    "split_bytes",
    "split_int",
]

PRIME = (1 << 127) - 1
"""The field modulus: the Mersenne prime 2^127 - 1."""
LIMB_BYTES = 15
"""Bytes of a byte secret per field element (120 bits < 127)."""
_FIELD_BYTES = 16


class ShamirError(PrivflError, ValueError):
    """Invalid sharing parameters, too few shares, or shares that are not consistent."""


def _check_prime(prime: int) -> None:
    if not isinstance(prime, int) or prime < 3:
        raise ShamirError(f"prime must be an int >= 3, got {prime!r}")


def _check_threshold(threshold: int, n: int, prime: int) -> None:
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise ShamirError(f"threshold must be an int >= 1, got {threshold!r}")
    if threshold > n:
        raise ShamirError(f"threshold {threshold} exceeds the number of shares {n}")
    if n >= prime:
        raise ShamirError(f"{n} shares need distinct non-zero x values below the prime {prime}")


def _check_xs(xs: Sequence[int], prime: int) -> None:
    for x in xs:
        if not isinstance(x, int) or isinstance(x, bool):
            raise ShamirError(f"share x values must be ints, got {x!r}")
        if not 0 < x < prime:
            # x = 0 would hand out the secret itself
            raise ShamirError(f"share x values must be in [1, prime), got {x}")
    if len(set(xs)) != len(xs):
        raise ShamirError(f"share x values must be distinct, got {list(xs)}")


def split_int(
    secret: int,
    threshold: int,
    xs: Sequence[int],
    *,
    prime: int = PRIME,
    coefficients: Sequence[int] | None = None,
) -> list[int]:
    """Shares ``f(x)`` for each ``x`` in ``xs`` of the secret ``secret`` (``0 <= secret < prime``).

    ``coefficients`` (``a_1 .. a_{t-1}``, each in ``[0, prime)``) fixes the polynomial; by default
    they are drawn uniformly with :func:`secrets.randbelow`. Fixing them is only for tests.
    """
    _check_prime(prime)
    _check_threshold(threshold, len(xs), prime)
    _check_xs(xs, prime)
    if not isinstance(secret, int) or isinstance(secret, bool) or not 0 <= secret < prime:
        raise ShamirError(f"secret must be an int in [0, prime), got {secret!r}")
    if coefficients is None:
        coeffs = [secrets.randbelow(prime) for _ in range(threshold - 1)]
    else:
        coeffs = [int(c) for c in coefficients]
        if len(coeffs) != threshold - 1 or any(not 0 <= c < prime for c in coeffs):
            raise ShamirError(f"need {threshold - 1} coefficients in [0, prime), got {list(coefficients)}")
    poly = [secret, *coeffs]
    out = []
    for x in xs:
        y = 0
        for c in reversed(poly):  # Horner
            y = (y * x + c) % prime
        out.append(y)
    return out


def interpolate(points: Sequence[tuple[int, int]], x: int, *, prime: int = PRIME) -> int:
    """Value at ``x`` of the unique polynomial of degree ``< len(points)`` through ``points``."""
    _check_prime(prime)
    xs = [p[0] for p in points]
    _check_xs(xs, prime)
    total = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (x - xm) % prime
                den = den * (xj - xm) % prime
        total = (total + yj * num * pow(den, -1, prime)) % prime
    return total


def reconstruct_int(points: Sequence[tuple[int, int]], threshold: int, *, prime: int = PRIME) -> int:
    """The secret from at least ``threshold`` points ``(x, f(x))``.

    The first ``threshold`` points determine the polynomial; every further point must lie on it,
    else :class:`ShamirError` (a corrupted or mismatched share).
    """
    _check_prime(prime)
    if not isinstance(threshold, int) or threshold < 1:
        raise ShamirError(f"threshold must be an int >= 1, got {threshold!r}")
    if len(points) < threshold:
        raise ShamirError(f"need at least {threshold} shares to reconstruct, got {len(points)}")
    _check_xs([p[0] for p in points], prime)
    for _, y in points:
        if not isinstance(y, int) or not 0 <= y < prime:
            raise ShamirError(f"share y values must be ints in [0, prime), got {y!r}")
    base = list(points[:threshold])
    for x, y in points[threshold:]:
        if interpolate(base, x, prime=prime) != y:
            raise ShamirError(f"share at x={x} is not consistent with the others (corrupted share?)")
    return interpolate(base, 0, prime=prime)


@dataclass(frozen=True)
class Share:
    """One party's share of a byte secret: x and one field element per 15-byte limb.

    Wire format: ``x`` (16 bytes big-endian), the secret's length in bytes (u16), then one
    16-byte big-endian field element per limb.
    """

    x: int
    ys: tuple[int, ...]
    secret_len: int

    def to_bytes(self) -> bytes:
        """The wire encoding described in the class docstring."""
        return (
            self.x.to_bytes(_FIELD_BYTES, "big")
            + struct.pack(">H", self.secret_len)
            + b"".join(y.to_bytes(_FIELD_BYTES, "big") for y in self.ys)
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        data = bytes(data)
        head = _FIELD_BYTES + 2
        if len(data) < head or (len(data) - head) % _FIELD_BYTES:
            raise ShamirError(f"malformed share: {len(data)} bytes")
        x = int.from_bytes(data[:_FIELD_BYTES], "big")
        (secret_len,) = struct.unpack(">H", data[_FIELD_BYTES:head])
        ys = tuple(
            int.from_bytes(data[i : i + _FIELD_BYTES], "big") for i in range(head, len(data), _FIELD_BYTES)
        )
        if len(ys) != _limbs(secret_len):
            raise ShamirError(f"malformed share: {len(ys)} limbs for a {secret_len}-byte secret")
        if not 0 < x < PRIME or any(y >= PRIME for y in ys):
            raise ShamirError("malformed share: value outside the field")
        return cls(x, ys, secret_len)


def _limbs(n_bytes: int) -> int:
    return -(-n_bytes // LIMB_BYTES)


def split_bytes(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Share a byte string (up to 65535 bytes) t-of-n: one :class:`Share` per ``x`` in ``xs``."""
    secret = bytes(secret)
    if not 1 <= len(secret) <= 0xFFFF:
        raise ShamirError(f"byte secret must be 1..65535 bytes, got {len(secret)}")
    limbs = [int.from_bytes(secret[i : i + LIMB_BYTES], "big") for i in range(0, len(secret), LIMB_BYTES)]
    per_limb = [split_int(limb, threshold, xs) for limb in limbs]
    return [Share(x, tuple(col[i] for col in per_limb), len(secret)) for i, x in enumerate(xs)]


def reconstruct_bytes(shares: Sequence[Share], threshold: int) -> bytes:
    """The byte secret from at least ``threshold`` shares (extra shares are checked for consistency)."""
    if len(shares) < threshold:
        raise ShamirError(f"need at least {threshold} shares to reconstruct, got {len(shares)}")
    lengths = {s.secret_len for s in shares}
    if len(lengths) != 1:
        raise ShamirError(f"shares of different secrets (lengths {sorted(lengths)})")
    n_bytes = lengths.pop()
    n_limbs = _limbs(n_bytes)
    if any(len(s.ys) != n_limbs for s in shares):
        raise ShamirError("shares have the wrong number of limbs")
    out = bytearray()
    for i in range(n_limbs):
        limb = reconstruct_int([(s.x, s.ys[i]) for s in shares], threshold)
        size = min(LIMB_BYTES, n_bytes - i * LIMB_BYTES)
        if limb >= 1 << (8 * size):
            raise ShamirError("reconstructed value does not fit the secret's length (inconsistent shares)")
        out += limb.to_bytes(size, "big")
    return bytes(out)
