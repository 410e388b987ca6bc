"""What the federated DP generators on embeddings share: the DP-CVAE (:mod:`privfl.sharing.dpcvae`)
and its DP-CGAN baseline (:mod:`privfl.sharing.dpcgan`); the method is described in docs/dpcvae.md.

Both train, per client, a model of which one part is shared (the CVAE's decoder, the GAN's
generator) and one stays on the client (encoder, discriminator), with sample-level DP-SGD
(:func:`~privfl.sharing.dp_training.train_dp`); the server averages the shared parts weighted by
the clients' training-set sizes. This module holds their common settings
(:class:`FederatedDPConfig`), result (:class:`FederatedDPResult`, :func:`finish_run`), input checks,
the copy and load of a model's shared part (:func:`part_state`, :func:`load_part_state`), the round
loop (:func:`train_rounds`, built on :func:`privfl.fl.rounds.fedavg_round`) and class-conditional
sampling (:func:`sample_embeddings`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from privfl.defenses.accounting import ACCOUNTANTS, EpsilonReport
from privfl.defenses.dpsgd import DPSGD
from privfl.defenses.rng import NoiseSource, default_noise
from privfl.fl.rounds import Average, fedavg_round
from privfl.progress import progress_bar
from privfl.seeding import seeded, torch_generator
from privfl.sharing.dp_training import DPTrainResult
from privfl.updates import weighted_mean

__all__ = [
    "FederatedDPConfig",
    "FederatedDPResult",
    "FederatedRounds",
    "LocalRound",
    "check_clients",
    "check_positive_ints",
    "check_schedule",
    "finish_run",
    "load_part_state",
    "param_count",
    "part_state",
    "privacy_fields",
    "sample_embeddings",
    "seeded_init",
    "size_weighted_mean",
    "train_rounds",
]

M = TypeVar("M", bound=nn.Module)


@dataclass
class FederatedDPConfig:
    """Settings shared by the federated DP generators (:func:`~privfl.sharing.dpcvae.train_federated_dpcvae`,
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
        return DPSGD(
            max_grad_norm=self.max_grad_norm,
            target_epsilon=self.epsilon,
            delta=self.delta,
            accountants=self.dp_accountants,
            noise=self.noise,
        )

    def schedule(self, dp: DPSGD) -> dict[str, Any]:
        """The keyword arguments of each client's round of :func:`~privfl.sharing.dp_training.train_dp`
        that the config sets: ``local_epochs`` epochs at ``lr`` and ``batch_size``, with ``dp``,
        out of ``rounds × local_epochs`` planned epochs."""
        return {
            "epochs": self.local_epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "dp": dp,
            "total_epochs": self.rounds * self.local_epochs,
        }


@dataclass(kw_only=True)
class FederatedDPResult:
    """What the federated DP generators (:func:`~privfl.sharing.dpcvae.train_federated_dpcvae`,
    DP-CGAN) return besides their model.

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


def size_weighted_mean(
    states: Sequence[Mapping[str, Tensor]], sizes: Sequence[float], prefix: str
) -> dict[str, Tensor]:
    """FedAvg of the shared parts: ``Σ_i n_i·θ_i / Σ_i n_i`` per entry, by
    :func:`privfl.updates.weighted_mean` (float64, one rounding to each entry's dtype).

    ``sizes`` must be positive integers (the clients' training-set sizes) and every key of every
    state must start with ``prefix`` (``ValueError`` otherwise: the server accepts nothing else).
    """
    if len(states) == 0 or len(states) != len(sizes):
        raise ValueError(
            f"need one size per state and at least one state, got {len(states)} states and {len(sizes)} sizes"
        )
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"sizes must be positive integers, got {n!r} for state {i}")
    for i, state in enumerate(states):
        foreign = sorted(k for k in state if not k.startswith(prefix))
        if foreign:
            raise ValueError(f"state {i} has keys outside {prefix}*: {foreign[:5]}")
    return weighted_mean(states, [float(n) for n in sizes])


def privacy_fields(
    dp: DPSGD, states: Sequence[dict[str, Any] | None], reports: Sequence[EpsilonReport | None]
) -> dict[str, Any]:
    """``epsilons``, ``accountant_states``, ``epsilon_reports`` and ``delta`` of a
    :class:`FederatedDPResult` from each client's last accountant state and report."""
    final_states, final_reports = [], []
    for state, report in zip(states, reports):
        if state is None or report is None:  # a client that never trained (no rounds): nothing spent
            acct = dp.make_accountant()
            state, report = acct.state_dict(), acct.epsilon()
        final_states.append(state)
        final_reports.append(report)
    return {
        "epsilons": [r.epsilon for r in final_reports],
        "accountant_states": final_states,
        "epsilon_reports": final_reports,
        "delta": max(r.delta for r in final_reports),
    }


def check_clients(clients: Sequence[tuple[Tensor, Tensor]], num_classes: int) -> int:
    """Validate the clients' ``(x (n, dim), y (n,))`` data (``ValueError``); return the embedding
    dimension."""
    if len(clients) == 0:
        raise ValueError("no clients")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    dims = set()
    for i, (x, y) in enumerate(clients):
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"client {i}: need x (n, dim) and y (n,) with n > 0, got {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        if not x.is_floating_point() or y.is_floating_point():
            raise ValueError(f"client {i}: x must be floating point and y integer labels")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"client {i}: labels must lie in [0, {num_classes})")
        dims.add(int(x.shape[1]))
    if len(dims) != 1:
        raise ValueError(f"clients' embeddings have different dimensions {sorted(dims)}")
    return dims.pop()


def check_positive_ints(**values: int) -> None:
    """``ValueError`` naming the first of ``values`` (in the order given) that is not a positive integer."""
    for name, v in values.items():
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_schedule(rounds: int, local_epochs: int) -> None:
    """``ValueError`` unless ``rounds`` and ``local_epochs`` are positive integers."""
    check_positive_ints(rounds=rounds, local_epochs=local_epochs)


def param_count(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def part_state(model: nn.Module, part: str) -> dict[str, Tensor]:
    """Detached copies of the ``<part>.*`` entries of ``model``'s ``state_dict`` (keys keep the prefix)."""
    prefix = part + "."
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def load_part_state(model: nn.Module, part: str, state: Mapping[str, Tensor]) -> None:
    """Load exactly the entries of ``model``'s sub-module ``part`` (``<part>.*`` keys, as
    :func:`part_state` gives); ``ValueError`` for missing, extra or foreign keys. The rest of
    ``model`` is untouched."""
    prefix = part + "."
    expected = {k for k in model.state_dict() if k.startswith(prefix)}
    given = set(state)
    if given != expected:
        raise ValueError(
            f"{part} state keys differ: unexpected {sorted(given - expected)}, "
            f"missing {sorted(expected - given)}"
        )
    getattr(model, part).load_state_dict({k[len(prefix) :]: v for k, v in state.items()})


def seeded_init(factory: Callable[[], M], *parts: int | str) -> M:
    """``factory()`` under :func:`privfl.seeding.seeded` ``(*parts)`` (the caller's RNG is restored)."""
    with seeded(*parts):
        return factory()


LocalRound = Callable[
    [int, int, Mapping[str, Tensor], dict[str, Any] | None], tuple[dict[str, Tensor], DPTrainResult]
]
"""``local_round(r, c, global_state, accountant_state) -> (message, result)``: client ``c``'s
training in round ``r`` from the global shared part, given the state of its accountant so far
(``None`` before its first round); ``message`` is what it sends, ``result`` its DP-SGD result."""


@dataclass
class FederatedRounds:
    """What :func:`train_rounds` returns.

    Attributes:
        global_state: the global shared part after the last round.
        accountant_states: per client, its accountant's last state (``None``: it never trained).
        epsilon_reports: per client, its last :class:`~privfl.defenses.accounting.EpsilonReport`.
        sent: the keys of every message, in the order sent (:attr:`FederatedDPResult.sent`).
        losses: ``losses[r][c]`` (:attr:`FederatedDPResult.losses`).
    """

    global_state: dict[str, Tensor]
    accountant_states: list[dict[str, Any] | None]
    epsilon_reports: list[EpsilonReport | None]
    sent: list[list[str]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)


def train_rounds(
    global_state: dict[str, Tensor],
    sizes: Sequence[int],
    rounds: int,
    local_round: LocalRound,
    average: Average,
    *,
    label: str,
    progress: bool = False,
) -> FederatedRounds:
    """``rounds`` FedAvg rounds (:func:`privfl.fl.rounds.fedavg_round`) over ``len(sizes)`` clients.

    Every round, clients ``0, 1, …`` in turn run ``local_round`` from the global state; the server
    sets the new global state to ``average(messages, sizes)``. Shows a rich progress bar labelled
    ``label`` (one step per client and round) when ``progress``.
    """
    n = len(sizes)
    run = FederatedRounds(global_state, [None] * n, [None] * n)
    with progress_bar(progress, label) as bar:
        task = bar.add_task(label, total=rounds * n, status="")

        def client_update(state: Mapping[str, Tensor], client: tuple[int, int]) -> dict[str, Tensor]:
            r, c = client
            message, res = local_round(r, c, state, run.accountant_states[c])
            run.accountant_states[c], run.epsilon_reports[c] = res.accountant_state, res.epsilon_report
            run.sent.append(list(message))  # what leaves the client
            run.losses[r].append(res.loss)
            bar.update(task, advance=1, status=f"round {r + 1}  ε {res.epsilon:.3g}")
            return message

        for r in range(rounds):
            run.losses.append([])
            clients = [(r, c) for c in range(n)]
            run.global_state = fedavg_round(run.global_state, clients, client_update, sizes, average=average)
    return run


def finish_run(
    model: nn.Module, shared: str, local: str, dp: DPSGD, run: FederatedRounds, t0: float
) -> dict[str, Any]:
    """Load the run's global ``shared`` part into ``model`` (the sampling model), put it in eval
    mode, and return the :class:`FederatedDPResult` fields of the run: the privacy fields
    (:func:`privacy_fields`), ``sent``, ``losses``, ``seconds`` since ``t0`` and ``param_count``
    ``{shared, local, "total"}`` of ``model``."""
    load_part_state(model, shared, run.global_state)
    model.eval()
    counts = {shared: param_count(getattr(model, shared)), local: param_count(getattr(model, local))}
    counts["total"] = counts[shared] + counts[local]
    return {
        **privacy_fields(dp, run.accountant_states, run.epsilon_reports),
        "sent": run.sent,
        "param_count": counts,
        "seconds": time.perf_counter() - t0,
        "losses": run.losses,
    }


def _class_distribution(class_probs: Sequence[float] | Tensor, num_classes: int) -> Tensor:
    probs = torch.as_tensor(class_probs, dtype=torch.float64).flatten()
    if probs.numel() != num_classes:
        raise ValueError(f"class_probs needs {num_classes} entries, got {probs.numel()}")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or float(probs.sum()) <= 0:
        raise ValueError("class_probs must be finite, non-negative and not all zero")
    return probs / probs.sum()


def _labels_and_noise(n: int, probs: Tensor, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    gen = torch_generator(seed, "sample")
    labels = (
        torch.multinomial(probs, int(n), replacement=True, generator=gen)
        if n > 0
        else torch.zeros(0, dtype=torch.long)
    )
    z = torch.randn(int(n), dim, generator=gen)
    return labels, z


def sample_embeddings(
    model: nn.Module,
    generate: Callable[[Tensor, Tensor], Tensor],
    n: int,
    class_probs: Sequence[float] | Tensor,
    *,
    num_classes: int,
    noise_dim: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """``n`` synthetic embeddings ``generate(z, labels)``: ``(x (n, dim), labels (n,))``.

    Labels are drawn i.i.d. from ``class_probs`` (``num_classes`` non-negative weights, normalised)
    and ``z ~ N(0, I)`` ``(n, noise_dim)``, both from a generator seeded with
    ``derive_seed(seed, "sample")`` (the global RNG is not used). ``model`` (which ``generate``
    belongs to) is put in eval mode; ``generate`` runs under ``torch.no_grad()`` on its device,
    where the results are.
    """
    probs = _class_distribution(class_probs, num_classes)
    labels, z = _labels_and_noise(n, probs, noise_dim, seed)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        x = generate(z.to(device), labels.to(device))
    return x, labels.to(device)
