"""Federated DP-CVAE: share a DP decoder, then data sampled from it (Di Salvo et al., MICCAI 2025).

Each client holds embeddings ``x`` (one per image) with class labels ``y`` and a personal
:class:`~privfl.sharing.cvae.CVAE`. Every round, each client loads the global decoder into its
CVAE, trains encoder and decoder together with sample-level DP-SGD
(:func:`~privfl.sharing.dp_training.train_dp`: opacus, privfl's noise source, per-sample clip
``max_grad_norm``) for ``local_epochs`` epochs and sends **only its decoder** to the server, which
averages the decoders weighted by the clients' training-set sizes (:func:`fedavg_decoders`).
After the last round every client can sample synthetic embeddings from the global decoder
(:func:`sample`, ``z ~ N(0, I)`` and labels from a class distribution it chooses) and train its
downstream models on them. Defaults are the paper's: ε = 1, δ = 1e-4, clip 1.5, SGD lr 1e-3,
50 rounds × 5 local epochs.

Threat model
------------
* **Unit of privacy:** one embedding (one image) of one client, with its label; neighbouring
  datasets differ by adding or removing one such row (opacus' add/remove adjacency). Embeddings
  of one patient or slide are correlated: a patient with ``k`` images has only group privacy
  (about ``k·ε``).
* **What is shared:** each client's decoder weights, once per round. They are the output of DP-SGD
  on that client's data, so the sequence of everything the client sends over the whole run is
  (ε, δ)-DP with the ε of :attr:`DPCVAEResult.epsilons` (the client's
  :class:`~privfl.defenses.accounting.PrivacyAccountant`, one DP-SGD event per round: the tightest
  valid bound among RDP, PRV and PLD). The adversary may be the server, the other clients or an
  eavesdropper, and may know the code, the hyper-parameters, the initial weights and all other
  rows. The global decoder, every embedding sampled from it and every model trained on those is
  post-processing and covered by the same ε; each client's guarantee holds whatever the others do.
* **Calibration:** the noise multiplier is calibrated (``DPSGD(target_epsilon=epsilon)``) for the
  whole planned run, ``rounds × local_epochs`` epochs, so a completed run ends at ε ≤ ``epsilon``
  (within calibrate's tolerance) and an interrupted one below it.
* **What is not shared:** the encoder never leaves its client (:attr:`DPCVAEResult.sent` lists the
  keys of every message, for tests to check); nor do the real embeddings. The encoder is trained
  by the same DP-SGD, but it is kept local because the method says so, not because DP needs it.
* **Assumed public:** the training-set sizes ``n_i`` (the FedAvg weights; they also set the
  sampling rate and the number of steps, as everywhere in opacus), the number of classes, and the
  label distribution each client chooses for sampling (a choice, not a statistic of its data —
  sampling with the client's own class frequencies would release them outside the guarantee).
* **Not covered:** the training losses in :attr:`DPCVAEResult.losses` (computed on the private
  data without noise); ``SeededNoise`` runs (predictable noise: experiments only); floating-point
  attacks on the Gaussian noise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from privfl.seeding import derive_seed
from privfl.sharing.cvae import CVAE
from privfl.sharing.dp_training import DPTrainResult, train_dp
from privfl.sharing.federated_generator import (
    FederatedDPConfig,
    FederatedDPResult,
    check_clients,
    check_schedule,
    finish_run,
    sample_embeddings,
    seeded_init,
    size_weighted_mean,
    train_rounds,
)

__all__ = [
    "DPCVAEConfig",
    "DPCVAEResult",
    "FederatedDPConfig",
    "FederatedDPResult",
    "fedavg_decoders",
    "sample",
    "train_federated_dpcvae",
]


@dataclass
class DPCVAEConfig(FederatedDPConfig):
    """Settings of :func:`train_federated_dpcvae`: those of
    :class:`~privfl.sharing.federated_generator.FederatedDPConfig` (clipping over encoder and
    decoder parameters joined), plus:

    Attributes:
        beta: weight of the KL term (:meth:`CVAE.per_sample_loss`).
    """

    beta: float = 1.0


@dataclass(kw_only=True)
class DPCVAEResult(FederatedDPResult):
    """What :func:`train_federated_dpcvae` returns: the fields of
    :class:`~privfl.sharing.federated_generator.FederatedDPResult` (``param_count`` has
    ``{"decoder", "encoder", "total"}``), plus:

    Attributes:
        global_decoder: the final global decoder state (``decoder.*`` keys).
        model: a :class:`CVAE` in eval mode with the global decoder and a fresh (untrained,
            seeded) encoder, for :func:`sample`; no client's encoder is in it.
    """

    global_decoder: dict[str, Tensor]
    model: CVAE


def fedavg_decoders(states: Sequence[Mapping[str, Tensor]], sizes: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg of client decoders: ``Σ_i n_i·θ_i / Σ_i n_i`` per entry.

    ``states`` are decoder states (every key must start with ``decoder.``, ``ValueError``
    otherwise: the server never accepts an encoder entry); ``sizes`` the clients' training-set
    sizes (positive integers). Computed by :func:`privfl.updates.weighted_mean` (float64, one
    rounding to each entry's dtype).
    """
    return size_weighted_mean(states, sizes, "decoder.")


def train_federated_dpcvae(
    clients: Sequence[tuple[Tensor, Tensor]],
    num_classes: int,
    config: DPCVAEConfig,
    *,
    progress: bool = False,
) -> DPCVAEResult:
    """Train the federated DP-CVAE (module docstring) and return the global decoder and each client's ε.

    Args:
        clients: per client, its training embeddings ``x`` ``(n_i, dim)`` (floating point) and
            labels ``y`` ``(n_i,)`` in ``[0, num_classes)``; ``n_i`` are the FedAvg weights.
        num_classes: number of classes.
        config: sizes, schedule and DP settings.
        progress: show a rich progress bar (one step per client and round).

    Every client starts from the same global decoder (seeded) and its own seeded encoder, which it
    keeps across rounds and never sends. Runs on the device of the input tensors (CPU usually).
    """
    dim = check_clients(clients, num_classes)
    check_schedule(config.rounds, config.local_epochs)
    dp = config.dpsgd()
    t0 = time.perf_counter()
    device = clients[0][0].device

    def new_model() -> CVAE:
        return CVAE(dim, num_classes, latent=config.latent, hidden=config.hidden).to(device)

    global_decoder = seeded_init(new_model, config.seed, "dpcvae-global").decoder_state()
    models = [seeded_init(new_model, config.seed, "dpcvae-client", c) for c in range(len(clients))]
    beta = float(config.beta)

    def loss_fn(m: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        assert isinstance(m, CVAE)
        return m.per_sample_loss(xb, yb, beta=beta)

    def local_round(
        r: int, c: int, global_state: Mapping[str, Tensor], accountant_state: dict[str, Any] | None
    ) -> tuple[dict[str, Tensor], DPTrainResult]:
        # --- on client c: only the global decoder comes in, only the decoder goes out ---
        (x, y), model = clients[c], models[c]
        model.load_decoder_state(global_state)
        res = train_dp(
            model,
            x,
            y,
            loss_fn,
            **config.schedule(dp),
            seed=derive_seed(config.seed, "dpcvae", r, c),
            accountant_state=accountant_state,
        )
        return model.decoder_state(), res

    sizes = [int(x.shape[0]) for x, _ in clients]
    run = train_rounds(
        global_decoder, sizes, config.rounds, local_round, fedavg_decoders, label="DP-CVAE", progress=progress
    )

    final = seeded_init(new_model, config.seed, "dpcvae-sampling-model")
    fields = finish_run(final, "decoder", "encoder", dp, run, t0)
    return DPCVAEResult(global_decoder=run.global_state, model=final, **fields)


def sample(
    decoder_model: CVAE, n: int, class_probs: Sequence[float] | Tensor, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``n`` synthetic embeddings from ``decoder_model``'s decoder: ``(x̂ (n, dim), labels (n,))``.

    Labels are drawn i.i.d. from ``class_probs`` (``num_classes`` non-negative weights, normalised),
    ``z ~ N(0, I)``, and ``x̂ = decoder(z, label)`` (the decoder's mean, no output noise). Seeded:
    the same model, ``n``, ``class_probs`` and ``seed`` give the same samples; the global RNG is
    not used. The model is put in eval mode; results are on its device.
    """
    return sample_embeddings(
        decoder_model,
        decoder_model.decode,
        n,
        class_probs,
        num_classes=decoder_model.num_classes,
        noise_dim=decoder_model.latent,
        seed=seed,
    )
