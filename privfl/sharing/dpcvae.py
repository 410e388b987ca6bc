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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from privfl.defenses.accounting import ACCOUNTANTS, EpsilonReport
from privfl.defenses.dpsgd import DPSGD
from privfl.defenses.rng import NoiseSource, default_noise
from privfl.seeding import derive_seed
from privfl.sharing.cvae import CVAE
from privfl.sharing.dp_training import train_dp
from privfl.progress import progress_bar
from privfl.updates import weighted_mean

_M = TypeVar("_M", bound=nn.Module)

__all__ = ["DPCVAEConfig", "DPCVAEResult", "FederatedDPConfig", "FederatedDPResult", "fedavg_decoders", "sample",
           "train_federated_dpcvae"]


@dataclass
class FederatedDPConfig:
    """Settings shared by the federated DP generators (:func:`train_federated_dpcvae`,
    :func:`~privfl.sharing.dpcgan.train_federated_dpcgan`); defaults: Di Salvo et al.'s.

    Attributes:
        latent: latent (generator noise) dimension.
        hidden: hidden width.
        rounds: federated rounds.
        local_epochs: DP-SGD epochs per client and round.
        lr: SGD learning rate (no momentum).
        batch_size: expected (Poisson) batch size.
        epsilon: each client's target ε over the **whole run** (all rounds), at ``delta``.
        delta: δ of the guarantee.
        max_grad_norm: per-sample L2 clip norm, over the DP-trained parameters joined.
        seed: model initialisation, sampling, the model's own random draws and (with
            ``SeededNoise``) the DP noise.
        noise: where the DP-SGD noise comes from (default :class:`~privfl.defenses.rng.SecureNoise`;
            :class:`~privfl.defenses.rng.SeededNoise` makes a run reproducible and **not private**).
        dp_accountants: the accountants each client's ε is the tightest valid bound of (and
            calibrated to): a subset of ``("rdp", "prv", "pld")``, all by default.
    """

    latent: int = 16
    hidden: int = 128
    rounds: int = 50
    local_epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    epsilon: float = 1.0
    delta: float = 1e-4
    max_grad_norm: float = 1.5
    seed: int = 0
    noise: NoiseSource = field(default_factory=default_noise)
    dp_accountants: tuple[str, ...] = ACCOUNTANTS

    def dpsgd(self) -> DPSGD:
        """The DP-SGD settings every client trains with: ``DPSGD(target_epsilon=epsilon, …)``."""
        return DPSGD(max_grad_norm=self.max_grad_norm, target_epsilon=self.epsilon, delta=self.delta,
                     accountants=self.dp_accountants, noise=self.noise)


@dataclass
class DPCVAEConfig(FederatedDPConfig):
    """Settings of :func:`train_federated_dpcvae`: those of :class:`FederatedDPConfig` (clipping over
    encoder and decoder parameters joined), plus:

    Attributes:
        beta: weight of the KL term (:meth:`CVAE.per_sample_loss`).
    """

    beta: float = 1.0


@dataclass(kw_only=True)
class FederatedDPResult:
    """What the federated DP generators (:func:`train_federated_dpcvae`, DP-CGAN) return besides their model.

    Attributes:
        epsilons: per client, ε of its whole training (``epsilon_reports[c].epsilon``).
        accountant_states: per client, the ``state_dict()`` of its
            :class:`~privfl.defenses.accounting.PrivacyAccountant` (one DP-SGD event per round;
            JSON-able; ``DPSGD.make_accountant(state)`` restores it).
        epsilon_reports: per client, the :class:`~privfl.defenses.accounting.EpsilonReport` of its
            accountant (the tightest bound, every accountant's figure, the δ it holds at).
        sent: the keys of every message a client sent, one list per message, in the order sent
            (round 0 client 0, round 0 client 1, …, round 1 client 0, …).
        param_count: parameter counts of one model, by part, and ``"total"``.
        seconds: wall-clock time of the training.
        delta: δ the ``epsilons`` hold at (the largest over clients: the configured δ plus the
            floating-point δ floor of the noise).
        losses: ``losses[r][c]``, client ``c``'s mean training loss in round ``r`` (noise-free,
            not covered by the DP guarantee).
    """

    epsilons: list[float]
    accountant_states: list[dict[str, Any]]
    epsilon_reports: list[EpsilonReport]
    sent: list[list[str]]
    param_count: dict[str, int]
    seconds: float
    delta: float = 0.0
    losses: list[list[float]] = field(default_factory=list)


@dataclass(kw_only=True)
class DPCVAEResult(FederatedDPResult):
    """What :func:`train_federated_dpcvae` returns: the fields of :class:`FederatedDPResult`
    (``param_count`` has ``{"decoder", "encoder", "total"}``), plus:

    Attributes:
        global_decoder: the final global decoder state (``decoder.*`` keys).
        model: a :class:`CVAE` in eval mode with the global decoder and a fresh (untrained,
            seeded) encoder, for :func:`sample`; no client's encoder is in it.
    """

    global_decoder: dict[str, Tensor]
    model: CVAE


def _size_weighted(states: Sequence[dict[str, Tensor]], sizes: Sequence[int], prefix: str) -> dict[str, Tensor]:
    """Size-weighted mean of states whose keys must all start with ``prefix``."""
    if len(states) == 0 or len(states) != len(sizes):
        raise ValueError(f"need one size per state and at least one state, got {len(states)} states "
                         f"and {len(sizes)} sizes")
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"sizes must be positive integers, got {n!r} for state {i}")
    for i, state in enumerate(states):
        foreign = sorted(k for k in state if not k.startswith(prefix))
        if foreign:
            raise ValueError(f"state {i} has keys outside {prefix}*: {foreign[:5]}")
    return weighted_mean(states, [float(n) for n in sizes])


def fedavg_decoders(states: Sequence[dict[str, Tensor]], sizes: Sequence[int]) -> dict[str, Tensor]:
    """FedAvg of client decoders: ``Σ_i n_i·θ_i / Σ_i n_i`` per entry.

    ``states`` are decoder states (every key must start with ``decoder.``, ``ValueError``
    otherwise: the server never accepts an encoder entry); ``sizes`` the clients' training-set
    sizes (positive integers). Computed by :func:`privfl.updates.weighted_mean` (float64, one
    rounding to each entry's dtype).
    """
    return _size_weighted(states, sizes, "decoder.")


def _privacy_fields(dp: DPSGD, states: Sequence[dict[str, Any] | None],
                    reports: Sequence[EpsilonReport | None]) -> dict[str, Any]:
    """``epsilons``, ``accountant_states``, ``epsilon_reports`` and ``delta`` of a
    :class:`FederatedDPResult` from each client's last accountant state and report."""
    final_states, final_reports = [], []
    for state, report in zip(states, reports):
        if state is None or report is None:  # a client that never trained (no rounds): nothing spent
            acct = dp.make_accountant()
            state, report = acct.state_dict(), acct.epsilon()
        final_states.append(state)
        final_reports.append(report)
    return {"epsilons": [r.epsilon for r in final_reports], "accountant_states": final_states,
            "epsilon_reports": final_reports, "delta": max(r.delta for r in final_reports)}


def _check_clients(clients: Sequence[tuple[Tensor, Tensor]], num_classes: int) -> int:
    """Validate the clients' data; return the embedding dimension."""
    if len(clients) == 0:
        raise ValueError("no clients")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    dims = set()
    for i, (x, y) in enumerate(clients):
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"client {i}: need x (n, dim) and y (n,) with n > 0, got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        if not x.is_floating_point() or y.is_floating_point():
            raise ValueError(f"client {i}: x must be floating point and y integer labels")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"client {i}: labels must lie in [0, {num_classes})")
        dims.add(int(x.shape[1]))
    if len(dims) != 1:
        raise ValueError(f"clients' embeddings have different dimensions {sorted(dims)}")
    return dims.pop()


def _check_schedule(rounds: int, local_epochs: int) -> None:
    for name, v in (("rounds", rounds), ("local_epochs", local_epochs)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _seeded(factory: Callable[[], _M], *parts: int | str) -> _M:
    """``factory()`` with torch's global RNG seeded from ``parts`` (the caller's RNG is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*parts))
        return factory()


_progress = progress_bar


def train_federated_dpcvae(clients: Sequence[tuple[Tensor, Tensor]], num_classes: int, config: DPCVAEConfig, *,
                           progress: bool = False) -> DPCVAEResult:
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
    dim = _check_clients(clients, num_classes)
    _check_schedule(config.rounds, config.local_epochs)
    dp = config.dpsgd()
    t0 = time.perf_counter()
    device = clients[0][0].device

    def new_model() -> CVAE:
        return CVAE(dim, num_classes, latent=config.latent, hidden=config.hidden).to(device)

    global_decoder = _seeded(new_model, config.seed, "dpcvae-global").decoder_state()
    models = [_seeded(new_model, config.seed, "dpcvae-client", c) for c in range(len(clients))]
    sizes = [int(x.shape[0]) for x, _ in clients]
    states: list[dict[str, Any] | None] = [None for _ in clients]
    reports: list[EpsilonReport | None] = [None for _ in clients]
    sent: list[list[str]] = []
    losses: list[list[float]] = []
    beta = float(config.beta)

    def loss_fn(m: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        assert isinstance(m, CVAE)
        return m.per_sample_loss(xb, yb, beta=beta)

    with _progress(progress, "DP-CVAE") as bar:
        task = bar.add_task("DP-CVAE", total=config.rounds * len(clients), status="")
        for r in range(config.rounds):
            messages: list[dict[str, Tensor]] = []
            round_losses = []
            for c, ((x, y), model) in enumerate(zip(clients, models)):
                # --- on client c: only the global decoder comes in, only the decoder goes out ---
                model.load_decoder_state(global_decoder)
                res = train_dp(model, x, y, loss_fn, epochs=config.local_epochs, lr=config.lr,
                               batch_size=config.batch_size, dp=dp,
                               total_epochs=config.rounds * config.local_epochs,
                               seed=derive_seed(config.seed, "dpcvae", r, c), accountant_state=states[c])
                states[c], reports[c] = res.accountant_state, res.epsilon_report
                message = model.decoder_state()
                # --- what leaves the client ---
                sent.append(list(message))
                messages.append(message)
                round_losses.append(res.loss)
                bar.update(task, advance=1, status=f"round {r + 1}  ε {res.epsilon:.3g}")
            losses.append(round_losses)
            global_decoder = fedavg_decoders(messages, sizes)  # on the server

    final = _seeded(new_model, config.seed, "dpcvae-sampling-model")
    final.load_decoder_state(global_decoder)
    final.eval()
    counts = {"decoder": _param_count(final.decoder), "encoder": _param_count(final.encoder)}
    counts["total"] = counts["decoder"] + counts["encoder"]
    return DPCVAEResult(global_decoder=global_decoder, model=final, **_privacy_fields(dp, states, reports),
                        sent=sent, param_count=counts, seconds=time.perf_counter() - t0, losses=losses)


def _class_probs(class_probs: Sequence[float] | Tensor, num_classes: int) -> Tensor:
    probs = torch.as_tensor(class_probs, dtype=torch.float64).flatten()
    if probs.numel() != num_classes:
        raise ValueError(f"class_probs needs {num_classes} entries, got {probs.numel()}")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or float(probs.sum()) <= 0:
        raise ValueError("class_probs must be finite, non-negative and not all zero")
    return probs / probs.sum()


def _labels_and_noise(n: int, probs: Tensor, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    gen = torch.Generator().manual_seed(derive_seed(seed, "sample"))
    labels = (torch.multinomial(probs, int(n), replacement=True, generator=gen) if n > 0
              else torch.zeros(0, dtype=torch.long))
    z = torch.randn(int(n), dim, generator=gen)
    return labels, z


def sample(decoder_model: CVAE, n: int, class_probs: Sequence[float] | Tensor, *, seed: int = 0
           ) -> tuple[Tensor, Tensor]:
    """``n`` synthetic embeddings from ``decoder_model``'s decoder: ``(x̂ (n, dim), labels (n,))``.

    Labels are drawn i.i.d. from ``class_probs`` (``num_classes`` non-negative weights, normalised),
    ``z ~ N(0, I)``, and ``x̂ = decoder(z, label)`` (the decoder's mean, no output noise). Seeded:
    the same model, ``n``, ``class_probs`` and ``seed`` give the same samples; the global RNG is
    not used. The model is put in eval mode; results are on its device.
    """
    probs = _class_probs(class_probs, decoder_model.num_classes)
    labels, z = _labels_and_noise(n, probs, decoder_model.latent, seed)
    device = next(decoder_model.parameters()).device
    decoder_model.eval()
    with torch.no_grad():
        x = decoder_model.decode(z.to(device), labels.to(device))
    return x, labels.to(device)
