"""CKKS parameter recipes: :class:`CKKSPreset` and the two :data:`PRESETS`.

Presets (sizes and errors measured, see ``docs/ckks.md``, section "Presets")
----------------------------------------------------------------------------
* ``precise``: N = 4096, one 60-bit prime, scale Δ = 2**53, headroom 2**5. About 32 bytes per
  parameter. Max abs error of one client's values ≤ 2**-42 · B (measured 2**-43.3 · B), of the
  mean of K clients whose weights sum to W ≤ ``2**-42 · B · sqrt(K) / W``: ≤ 1e-7 × the largest
  |value| of the clients' updates whenever that is ≥ 2.3e-6 · B · sqrt(K) / W.
* ``compact``: N = 4096, one 44-bit prime, Δ = 2**37, headroom 2**5. About 26.7 bytes per
  parameter. Max abs error ≤ ``2**-26 · B · sqrt(K) / W`` (one client measured: 2**-27.4 · B):
  ≤ 1e-4 × the largest |value| whenever that is ≥ 1.5e-4 · B · sqrt(K) / W.

The error bound is absolute, in units of ``B``: CKKS is fixed-point. Keep ``B`` tight (a clip norm
``C`` bounds every coordinate, ``|u_j| <= ||u||_2 <= C``); inside :class:`~privfl.defenses.base.Compose`
``CKKSAggregation`` takes ``B`` from the closest preceding clipping stage. float64 entries are
encoded with the same precision as float32 ones (``≈ 2**-42 · B`` for ``precise``), not float64's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "CKKSPreset", "get_preset"]


@dataclass(frozen=True)
class CKKSPreset:
    """CKKS parameters of one recipe.

    Attributes:
        name: preset name.
        poly_modulus_degree: N; a ciphertext holds ``N/2`` values (slots).
        coeff_mod_bit_sizes: bit sizes of the primes: the data prime(s), then the special prime
            (which only the key generator uses; ciphertexts on the wire carry the data primes only).
        scale_bits: log2 of the CKKS scale Δ a value is encoded with.
        headroom_bits: encoded values (``u · w / B``) may reach ``2**headroom_bits``; a client whose
            update exceeds ``2**headroom_bits · B`` raises instead of overflowing.
        error_target: the max abs error, relative to the largest |value| of the clients' updates,
            this preset is designed for (1e-7 ``precise``, 1e-4 ``compact``).
        error_bound_bits: documented bound on the max abs error of one client's decrypted values,
            ``2**error_bound_bits · B`` (about 2.5× the largest error measured over 55 M values); see
            :meth:`max_abs_error` for the mean of several clients.
        chunk_ciphertexts: ciphertexts per TenSEAL tensor (one chunk of the payload); bounds the
            memory of a streaming aggregation.
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    headroom_bits: int
    error_target: float
    error_bound_bits: int
    chunk_ciphertexts: int = 128

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n < 1024 or n & (n - 1):
            raise ValueError(
                f"CKKSPreset {self.name!r}: poly_modulus_degree must be a power of two >= 1024, got {n}"
            )
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ValueError(f"CKKSPreset {self.name!r}: need at least one data prime and the special prime")
        if self.scale_bits + self.headroom_bits + 2 > self.data_bits:
            raise ValueError(
                f"CKKSPreset {self.name!r}: scale 2**{self.scale_bits} with headroom "
                f"2**{self.headroom_bits} does not fit {self.data_bits} data bits (need 2 spare bits)"
            )
        if self.chunk_ciphertexts < 1:
            raise ValueError(f"CKKSPreset {self.name!r}: chunk_ciphertexts must be >= 1")

    @property
    def slots(self) -> int:
        """Values per ciphertext, ``N/2``."""
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        """Bits of the ciphertext modulus on the wire (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def chunk_values(self) -> int:
        """Values per chunk (one TenSEAL tensor)."""
        return self.slots * self.chunk_ciphertexts

    def max_abs_error(self, bound: float, clients: int = 1, weight_sum: float = 1.0) -> float:
        """Documented bound on the max abs error of the decrypted mean, in the update's units:
        ``2**error_bound_bits · bound · sqrt(clients) / weight_sum``.

        Every ciphertext carries its own encryption noise (independent, about ``2**9.5 / Δ`` at most per
        value in units of ``bound``); the clients' weights scale their values but not their noise, so
        the sum of ``clients`` payloads has ``sqrt(clients)`` times the noise, and dividing by the
        survivors' ``weight_sum`` (< 1 after dropouts) scales it up once more."""
        if clients < 1 or not weight_sum > 0:
            raise ValueError(
                f"max_abs_error: need clients >= 1 and weight_sum > 0, got {clients}, {weight_sum}"
            )
        return math.ldexp(float(bound), self.error_bound_bits) * math.sqrt(clients) / float(weight_sum)

    def ciphertexts(self, numel: int) -> int:
        """Ciphertexts one client sends for an update of ``numel`` values."""
        return -(-int(numel) // self.slots)


PRESETS: dict[str, CKKSPreset] = {
    "precise": CKKSPreset(
        "precise", 4096, (60, 30), scale_bits=53, headroom_bits=5, error_target=1e-7, error_bound_bits=-42
    ),
    "compact": CKKSPreset(
        "compact", 4096, (44, 30), scale_bits=37, headroom_bits=5, error_target=1e-4, error_bound_bits=-26
    ),
}
"""The two recipes, for K clients with weight sum W: ``precise``: error ≤ 1e-7 × max |value| when
max |value| ≥ 2.3e-6 · bound · sqrt(K)/W; ``compact``: fewest bytes at error ≤ 1e-4 × max |value| when
max |value| ≥ 1.5e-4 · bound · sqrt(K)/W."""


def get_preset(preset: str | CKKSPreset) -> CKKSPreset:
    """A preset by name (``"precise"``, ``"compact"``), or a :class:`CKKSPreset` unchanged."""
    if isinstance(preset, CKKSPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown CKKS preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def _preset_from_json(d: dict[str, Any]) -> CKKSPreset:
    d = dict(d)
    d["coeff_mod_bit_sizes"] = tuple(d["coeff_mod_bit_sizes"])
    return CKKSPreset(**d)
