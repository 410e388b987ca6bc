"""Homomorphically encrypted aggregation with CKKS (TenSEAL): the server adds ciphertexts it cannot read.

Three roles, three objects, and the bytes that travel between them::

    keys = CKKSKeys.generate("precise")           # once, by the clients (e.g. one of them)
    client = CKKSClient(keys.client_context)      # every client: holds the SECRET key
    server = CKKSServer(keys.server_context)      # the server: encryption parameters only

    payload = client.encrypt(update, weight=w_i, bound=B)          # bytes, on each client
    aggregate = server.aggregate([payload_0, None, payload_2], weights=w)  # bytes; None = dropped
    mean_update = client.decrypt(aggregate)       # a key holder (a client) decrypts the mean

:class:`CKKSAggregation` wraps the three into a :class:`~privfl.defenses.base.Defense` for in-process
simulation (``protect`` encrypts, ``aggregate`` sums on the server side and lets its ``keyholder``
client decrypt).

How an update is encoded
------------------------
* The update is flattened to one float32 (float64 if any entry is float64) vector
  (:func:`privfl.updates.flatten`), and each client multiplies it by ``weight / bound``: its own
  aggregation weight ``w_i`` (public, from ``RoundContext.weights``) and one public bound ``B`` on
  ``|value|`` shared by all clients, so the encoded values lie in ``[-2**h, 2**h]`` (``h`` = the
  preset's ``headroom_bits``: values up to ``2**h · B`` are accepted, larger ones raise).
* The vector is packed densely: ``N/2`` values per ciphertext (``N`` = poly modulus degree), all
  layers joined, ``chunk_ciphertexts`` ciphertexts per TenSEAL ``CKKSTensor`` (one chunk), so a
  client sends ``ceil(numel / (N/2))`` ciphertexts. TenSEAL encrypts, adds and decrypts the
  ciphertexts of a chunk on ``n_threads`` threads.
* Encryption is symmetric (with the secret key, which every client holds anyway): smaller noise and
  faster than public-key encryption; the server needs no key at all to add ciphertexts.
* Ciphertexts live at a single 44- or 60-bit prime (plus a special prime that never leaves the key
  generator) and are serialized with SEAL's built-in zstd compression.

Weights: applied by the clients, not the server
-----------------------------------------------
Each client multiplies its own update by its aggregation weight before encryption; the server only
adds ciphertexts; the key holder divides the decrypted sum by the sum of the weights of the clients
that sent (``weight_sum`` in the aggregate's header). This gives exactly the weighted mean over the
survivors, ``sum_i w_i u_i / sum_i w_i`` (dropped clients skipped, weights renormalised), the same
as :func:`privfl.updates.weighted_mean` of the survivors. A server-side multiplication by a plain
scalar was measured and rejected: TenSEAL encodes the scalar at the ciphertext's scale, so the product
has scale Δ² and needs about twice the modulus bits — two data primes for the ``precise`` error,
41–45 bytes/parameter instead of 32, and slower encryption (the figures: ``docs/ckks.md``, section
"Encoding"). The weights are public (``RoundContext.weights``); each payload's header states the
weight its client used and the server checks it against the round's.

Modules
-------
* :mod:`~privfl.defenses.ckks.presets` — :class:`CKKSPreset`, :data:`PRESETS` (the recipes and their
  error bounds).
* :mod:`~privfl.defenses.ckks.wire` — the byte format of payloads and contexts (frames, JSON
  headers, :func:`payload_header`, :func:`aggregate_head`) and :class:`CKKSPayloadError`.
* :mod:`~privfl.defenses.ckks.keys` — :class:`CKKSKeys`.
* :mod:`~privfl.defenses.ckks.parties` — :class:`CKKSClient` and :class:`CKKSServer`.
* :mod:`~privfl.defenses.ckks.defense` — :class:`CKKSAggregation` and :class:`CKKSReport`.

Threat model: see :class:`CKKSAggregation` and ``docs/ckks.md``.
"""

from privfl.defenses.ckks.defense import CKKSAggregation, CKKSReport
from privfl.defenses.ckks.keys import CKKSKeys
from privfl.defenses.ckks.parties import CKKSClient, CKKSServer
from privfl.defenses.ckks.presets import PRESETS, CKKSPreset
from privfl.defenses.ckks.presets import get_preset as get_preset
from privfl.defenses.ckks.wire import CKKSPayloadError
from privfl.defenses.ckks.wire import aggregate_head as aggregate_head
from privfl.defenses.ckks.wire import payload_header as payload_header

__all__ = [
    "PRESETS",
    "CKKSPreset",
    "CKKSKeys",
    "CKKSClient",
    "CKKSServer",
    "CKKSAggregation",
    "CKKSReport",
    "CKKSPayloadError",
]
