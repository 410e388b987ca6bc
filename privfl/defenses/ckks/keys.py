"""CKKS key generation: :class:`CKKSKeys`, the clients' secret context and the server's keyless one."""

from __future__ import annotations

import os
import secrets

import tenseal as ts

from privfl.defenses.ckks.presets import CKKSPreset, get_preset
from privfl.defenses.ckks.wire import CKKSPayloadError, _context_envelope, _open_context

__all__ = ["CKKSKeys"]


class CKKSKeys:
    """A fresh CKKS key set: the clients' context (with the secret key) and the server's (without).

    Attributes:
        preset: the CKKS parameters.
        key_id: random public identifier of this key set (hex); every payload carries it, so
            ciphertexts under different keys are refused instead of decrypting to garbage.
        client_context: serialized context **with the secret key**. Give it to the clients only —
            whoever holds it can decrypt every payload and the aggregate.
        server_context: serialized encryption parameters without any key (symmetric CKKS needs
            none to add ciphertexts). Safe to give to the server.
    """

    __slots__ = ("preset", "key_id", "client_context", "server_context")

    # a plain class, not a dataclass: pretty-printers (pytest, hypothesis, rich) must never show the secret
    def __init__(self, preset: CKKSPreset, key_id: str, client_context: bytes, server_context: bytes):
        self.preset = preset
        self.key_id = key_id
        self.client_context = client_context
        self.server_context = server_context

    @classmethod
    def generate(cls, preset: str | CKKSPreset = "precise", n_threads: int | None = None) -> CKKSKeys:
        """Generate a secret key for ``preset`` (cheap: see ``benchmarks/RESULTS.md``, section "CKKS
        aggregation vs the per-layer TenSEAL recipe"). Run it on a client, never on the server."""
        p = get_preset(preset)
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            p.poly_modulus_degree,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
            n_threads=_threads(n_threads),
        )
        # sums of ciphertexts and nothing else: no relinearisation, no rescaling (both would need keys/levels)
        ctx.auto_relin = False
        ctx.auto_rescale = False
        ctx.global_scale = 2.0**p.scale_bits
        key_id = secrets.token_hex(16)
        client_raw = ctx.serialize(
            save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
        server_raw = ctx.serialize(
            save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        return cls(
            p,
            key_id,
            _context_envelope(p, key_id, True, client_raw),
            _context_envelope(p, key_id, False, server_raw),
        )

    @classmethod
    def from_contexts(cls, client_context: bytes, server_context: bytes) -> CKKSKeys:
        """Keys from the two serialized contexts (e.g. files distributed out of band to a client).

        Raises:
            CKKSPayloadError: a context is malformed, the first has no secret key, the second has
                one, or they belong to different keys.
        """
        ch, preset, _ = _open_context(client_context, "client context")
        sh, _, _ = _open_context(server_context, "server context")
        if not ch["secret"] or sh["secret"]:
            raise CKKSPayloadError(
                "from_contexts: the client context must hold the secret key and the server context must not"
            )
        if ch["key_id"] != sh["key_id"]:
            raise CKKSPayloadError(
                f"from_contexts: contexts of different keys ({str(ch['key_id'])[:8]}… vs "
                f"{str(sh['key_id'])[:8]}…)"
            )
        return cls(preset, str(ch["key_id"]), bytes(client_context), bytes(server_context))

    def __repr__(self) -> str:  # never print the secret context
        return (
            f"CKKSKeys(preset={self.preset.name!r}, key_id={self.key_id[:8]}…, "
            f"client_context=<{len(self.client_context)} bytes, secret>, "
            f"server_context=<{len(self.server_context)} bytes>)"
        )


def _threads(n_threads: int | None) -> int:
    n = (os.cpu_count() or 1) if n_threads is None else int(n_threads)
    if n < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return n
