"""Secure aggregation (Bonawitz et al., CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), semi-honest protocol with authenticated messages.

Explicit message rounds between a :class:`SecAggServer` and :class:`SecAggClient` objects; every
message is a dataclass with ``to_bytes()`` / ``from_bytes()``, so the same code runs in one process
(:class:`~privfl.defenses.secagg.defense.SecureAggregation`) or over a network (send the bytes).

Rounds (U1 ⊇ U2 ⊇ U3 ⊇ U5 are the clients still present at each step, ``t`` the threshold):

0. **Setup / advertise keys.** The server sends :class:`SecAggConfig` (session id, clients, public
   weights, threshold, clip range, scale). Each client ``u`` makes two fresh X25519 key pairs
   ``(c_u, s_u)`` and an Ed25519 signing key, and sends :class:`AdvertiseKeys` (signed). The
   server needs >= t of them (U1) and broadcasts them as a :class:`KeyList`.
1. **Share keys.** Client ``u`` draws a 32-byte self-mask seed ``b_u``, splits ``b_u`` and
   ``s_u^SK`` t-of-|U1| with Shamir (:mod:`~privfl.defenses.secagg.shamir`, x = id + 1), and
   encrypts ``v``'s two shares with ChaCha20-Poly1305 under ``HKDF(X25519(c_u^SK, c_v^PK))``
   (:class:`ShareKeys`, signed, with a hash commitment to ``b_u``). The server needs >= t (U2) and
   forwards to each ``v`` the ciphertexts addressed to it (:class:`ShareDelivery`); ``v`` checks
   every AEAD tag at once.
2. **Masked input.** Client ``u`` quantizes its weighted update into Z_2^32
   (:mod:`~privfl.defenses.secagg.quantize`) and adds the self mask ``PRG(b_u)`` and, for every
   ``v`` in U2 \\ {u}, the pairwise mask ``±PRG(s_{u,v})`` with ``s_{u,v} = HKDF(X25519(s_u^SK,
   s_v^PK))``: ``+`` if ``u > v``, ``-`` if ``u < v``, so pairs cancel in the sum. PRG = ChaCha20
   keystream (:mod:`~privfl.defenses.secagg.crypto`). It sends :class:`MaskedInput`, signed over a
   per-block SHA-256 tree digest. The server adds each input into a running sum as it arrives
   (one vector of memory, whatever the number of clients) and needs >= t of them (U3).
3. (Consistency check of the active protocol — **not implemented**, see the threat model.)
4. **Unmask.** The server sends :class:`UnmaskRequest` (the list U3). Client ``u`` answers with
   the ``b``-shares of U3 and the ``s``-shares of the dropped U2 \\ U3 (:class:`UnmaskResponse`),
   and never reveals both kinds of share for one peer, over all requests of the round. With >= t
   answers (U5) the server reconstructs ``b_v`` (v in U3, checked against the commitment) and
   ``s_v^SK`` (v dropped, checked against ``s_v^PK``), subtracts the self masks of U3 and the
   dropped clients' pairwise masks with U3, checks that every coordinate is in the range the
   configuration allows, and returns the integer sum of U3's quantized inputs (:class:`AggregateResult`).

Dropouts: a client that leaves after sharing keys but before sending its input (U2 \\ U3) is not in
the sum; its pairwise masks are removed through its reconstructed ``s^SK``. A client that leaves
after sending its input but before unmasking (U3 \\ U5) is in the sum; its ``b`` is reconstructed from
the others' shares. Fewer than t clients at any step raises :class:`InsufficientClientsError`:
nothing is reconstructed and no partial sum is returned.

Authentication. Every client-to-server message after the setup is signed with the client's Ed25519
key advertised in round 0; share ciphertexts are authenticated by AEAD under keys only the two
clients know; reconstructed secrets are checked against the public key / commitment sent earlier;
and the unmasked sum is range-checked. Tampering with a share, a masked input or an unmask response
raises :class:`SecAggIntegrityError`. The round-0 signing key is only as trustworthy as the channel it
arrived on, unless ``known_signing_keys`` (a PKI: long-term keys registered out of band) is given.

Threat model
------------
* Honest-but-curious server, and up to ``t - 1`` clients colluding with it (or each other): they
  learn nothing about the honest clients' inputs beyond the sum of the >= t inputs in U3 (for
  ``t - 1`` clients, Shamir shares are perfectly hiding; masks are ChaCha20 keystreams under keys
  from X25519 + HKDF, computationally hiding).
* The sum itself is revealed: combine with differential privacy (distributed noise) to protect
  individuals from what the sum shows. The quantization error is stated in
  :mod:`~privfl.defenses.secagg.quantize`.
* Semi-honest only. The consistency-check round (round 3 of Bonawitz's active protocol) is not
  implemented and the server is not prevented from creating Sybil clients. A malicious server may
  claim that a client dropped: it then obtains that client's ``s^SK`` shares; if the client's input
  also arrived, the server still cannot unmask it unless it also gets ``t`` shares of that client's
  ``b``. Each honest client reveals at most one kind of share per peer (enforced), so with
  ``t > n/2`` the server cannot collect ``t`` of both kinds from honest clients; with ``t <= n/2``
  it can (by telling two disjoint groups different stories) — use ``t > n/2`` where the server might
  be malicious. Dropouts of honest clients are not authenticated beyond this.
* Fresh keys every round (forward secrecy): client secrets are deleted after use, and nothing
  secret survives the round in any object's state.

Modules
-------
This module is the protocol's description and its public face; the code lives in three modules:

* :mod:`~privfl.defenses.secagg.messages` — the messages and their byte encoding (:func:`decode`).
* :mod:`~privfl.defenses.secagg.client` — :class:`SecAggClient` (and its saved state).
* :mod:`~privfl.defenses.secagg.server` — :class:`SecAggServer` and :class:`AggregateResult`.
"""

from privfl.defenses.secagg.client import CLIENT_STEPS, SecAggClient
from privfl.defenses.secagg.messages import (
    DEFAULT_BLOCK_WORDS,
    AdvertiseKeys,
    EncryptedShare,
    KeyList,
    MaskedInput,
    Message,
    SecAggConfig,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    decode,
)
from privfl.defenses.secagg.server import AggregateResult, SecAggServer

__all__ = [
    "CLIENT_STEPS",
    "DEFAULT_BLOCK_WORDS",
    "AdvertiseKeys",
    "AggregateResult",
    "EncryptedShare",
    "KeyList",
    "MaskedInput",
    "Message",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "ShareDelivery",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
]
