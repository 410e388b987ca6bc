"""Federated DP-CGAN: the baseline of the DP-CVAE comparison (Di Salvo et al., MICCAI 2025).

A conditional GAN (:class:`CGAN`) in place of the CVAE, with the same shape of API as
:mod:`privfl.sharing.dpcvae`: :class:`DPCGANConfig`, :func:`train_federated_dpcgan`,
:func:`sample`. Each client keeps a personal discriminator; every round it loads the global
generator, trains for ``local_epochs`` epochs — each step one DP-SGD step of the discriminator on
a Poisson batch of its real embeddings (:mod:`privfl.sharing.dp_training`), then one ordinary step
of the generator against the discriminator — and sends **only its generator**, which the server
averages weighted by the clients' training-set sizes.

Why this is DP (the argument kept simple)
-----------------------------------------
Only the discriminator ever touches private data, and only through DP-SGD: its per-sample loss for
real row ``i`` is ``softplus(−D(x_i, y_i)) + softplus(D(G(z_i), y'_i))`` — the real term plus one
fake paired with it (``z_i ~ N(0, I)``, ``y'_i`` uniform, the generator frozen for this step) —
so removing row ``i`` removes one clipped per-sample gradient and the sensitivity of the summed
gradient is the clip norm, as in plain DP-SGD. The generator's step uses only the current
discriminator weights and fresh public randomness (latents, uniform labels): it is
post-processing of the discriminator's DP-SGD outputs so far, and the next discriminator step's
dependence on the generator is adaptive composition, which the accountant already covers. Hence
the whole trajectory — and the generator a client sends each round — is (ε, δ)-DP with the ε of
the discriminator's accountant (:attr:`DPCGANResult.epsilons`). The discriminator could be shared too
at no extra cost, but it is kept local, mirroring the DP-CVAE's encoder; only ``generator.*`` keys
leave a client (:attr:`DPCGANResult.sent`). Fake labels are uniform rather than the client's class
frequencies, which would be a statistic of its data outside the guarantee.

Threat model
------------
As for the DP-CVAE (:mod:`privfl.sharing.dpcvae`): unit of privacy one embedding (one image) of
one client; shared: the generator weights each round (DP as above; all synthetic data sampled from
the global generator is post-processing); local: the discriminator and the real embeddings;
public: training-set sizes (FedAvg weights, sampling rate, step count), the number of classes and
the label distribution chosen for sampling; not covered: the noise-free training losses in
:attr:`DPCGANResult.losses` and ``SeededNoise`` runs.

Architecture and size
---------------------
Generator ``(noise_dim + C) → hidden → 2·hidden → dim``, discriminator ``(dim + C) → 2·hidden →
hidden → 1``, LeakyReLU(0.2), Linear layers only (opacus-compatible). ``noise_dim`` defaults to
the config's ``latent``, so the generator and the CVAE decoder map the same ``(z, y)`` to an
embedding. The generator widens towards its output and the discriminator mirrors it, the usual
MLP-GAN layout; at the same ``hidden`` this comes to roughly twice the CVAE's parameters
(:attr:`DPCGANResult.param_count` reports it — the paper's ~5× is for its own, unpublished sizes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privfl.defenses.dpsgd import DPSGD
from privfl.seeding import derive_seed
from privfl.sharing.dp_training import OPTIMIZERS, DPTrainResult, train_dp
from privfl.sharing.federated_generator import (
    FederatedDPConfig,
    FederatedDPResult,
    check_clients,
    check_positive_ints,
    check_schedule,
    finish_run,
    load_part_state,
    part_state,
    sample_embeddings,
    seeded_init,
    size_weighted_mean,
    train_rounds,
)

__all__ = ["CGAN", "DPCGANConfig", "DPCGANResult", "sample", "train_federated_dpcgan"]


class CGAN(nn.Module):
    """Conditional GAN on embeddings: ``generator(z ‖ onehot(y)) → x``,
    ``discriminator(x ‖ onehot(y)) → logit``.

    Args:
        dim: embedding dimension.
        num_classes: number of classes ``C``.
        noise_dim: dimension of the generator's input noise ``z ~ N(0, I)``.
        hidden: base width (see the module docstring for the layout).
    """

    def __init__(self, dim: int, num_classes: int, *, noise_dim: int = 16, hidden: int = 128) -> None:
        super().__init__()
        check_positive_ints(dim=dim, num_classes=num_classes, noise_dim=noise_dim, hidden=hidden)
        self.dim, self.num_classes = int(dim), int(num_classes)
        self.noise_dim, self.hidden = int(noise_dim), int(hidden)
        h, c = self.hidden, self.num_classes
        self.generator = nn.Sequential(
            nn.Linear(self.noise_dim + c, h),
            nn.LeakyReLU(0.2),
            nn.Linear(h, 2 * h),
            nn.LeakyReLU(0.2),
            nn.Linear(2 * h, self.dim),
        )
        self.discriminator = nn.Sequential(
            nn.Linear(self.dim + c, 2 * h),
            nn.LeakyReLU(0.2),
            nn.Linear(2 * h, h),
            nn.LeakyReLU(0.2),
            nn.Linear(h, 1),
        )

    def _onehot(self, y: Tensor, like: Tensor) -> Tensor:
        return F.one_hot(y.long(), self.num_classes).to(dtype=like.dtype, device=like.device)

    def generate(self, z: Tensor, y: Tensor) -> Tensor:
        """Embeddings ``(B, dim)`` for noise ``z`` ``(B, noise_dim)`` and labels ``y`` ``(B,)``."""
        return self.generator(torch.cat([z, self._onehot(y, z)], dim=1))

    def discriminate(self, x: Tensor, y: Tensor) -> Tensor:
        """Logits ``(B,)`` that ``(x, y)`` is real."""
        return self.discriminator(torch.cat([x, self._onehot(y, x)], dim=1)).squeeze(1)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        """Same as :meth:`generate`."""
        return self.generate(z, y)

    def generator_state(self) -> dict[str, Tensor]:
        """Detached copies of the ``generator.*`` entries of the ``state_dict`` (keys keep the prefix)."""
        return part_state(self, "generator")

    def load_generator_state(self, state: Mapping[str, Tensor]) -> None:
        """Load exactly the generator's entries; ``ValueError`` for missing, extra or foreign keys."""
        load_part_state(self, "generator", state)


@dataclass
class DPCGANConfig(FederatedDPConfig):
    """Settings of :func:`train_federated_dpcgan`: those of
    :class:`~privfl.sharing.federated_generator.FederatedDPConfig` (ε is each client's target over the whole
    run, clipping over the discriminator's parameters; ``latent`` is the generator's noise dimension unless
    ``noise_dim`` is given; ``lr`` for both networks), plus:

    Attributes:
        noise_dim: generator input dimension (default ``latent``).
        optimizer: ``"sgd"`` (the paper's setting for the CVAE) or ``"adam"``, for both networks.
    """

    noise_dim: int | None = None
    optimizer: str = "sgd"

    @property
    def generator_noise_dim(self) -> int:
        """``noise_dim``, or ``latent`` when it is not given."""
        return int(self.latent if self.noise_dim is None else self.noise_dim)


@dataclass(kw_only=True)
class DPCGANResult(FederatedDPResult):
    """What :func:`train_federated_dpcgan` returns: the fields of
    :class:`~privfl.sharing.federated_generator.FederatedDPResult` (``losses``: the discriminator's mean
    training loss; ``param_count``: ``{"generator", "discriminator", "total"}``), plus:

    Attributes:
        global_generator: the final global generator state (``generator.*`` keys).
        model: a :class:`CGAN` in eval mode with the global generator and a fresh discriminator,
            for :func:`sample`; no client's discriminator is in it.
    """

    global_generator: dict[str, Tensor]
    model: CGAN


def train_federated_dpcgan(
    clients: Sequence[tuple[Tensor, Tensor]],
    num_classes: int,
    config: DPCGANConfig,
    *,
    progress: bool = False,
) -> DPCGANResult:
    """Train the federated DP-CGAN (module docstring) and return the global generator and each client's ε.

    Args:
        clients: per client, training embeddings ``(n_i, dim)`` and labels ``(n_i,)``.
        num_classes: number of classes.
        config: sizes, schedule and DP settings.
        progress: show a rich progress bar.
    """
    dim = check_clients(clients, num_classes)
    check_schedule(config.rounds, config.local_epochs)
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    dp = config.dpsgd()
    t0 = time.perf_counter()
    device = clients[0][0].device
    nz = config.generator_noise_dim

    def new_model() -> CGAN:
        return CGAN(dim, num_classes, noise_dim=nz, hidden=config.hidden).to(device)

    global_generator = seeded_init(new_model, config.seed, "dpcgan-global").generator_state()
    models = [seeded_init(new_model, config.seed, "dpcgan-client", c) for c in range(len(clients))]

    def local_round(
        r: int, c: int, global_state: Mapping[str, Tensor], accountant_state: dict[str, Any] | None
    ) -> tuple[dict[str, Tensor], DPTrainResult]:
        # --- on client c: only the global generator comes in, only the generator goes out ---
        (x, y), gan = clients[c], models[c]
        gan.load_generator_state(global_state)
        res = _client_round(
            gan,
            x,
            y,
            config,
            dp,
            seed=derive_seed(config.seed, "dpcgan", r, c),
            accountant_state=accountant_state,
        )
        return gan.generator_state(), res

    sizes = [int(x.shape[0]) for x, _ in clients]
    run = train_rounds(
        global_generator,
        sizes,
        config.rounds,
        local_round,
        _fedavg_generators,
        label="DP-CGAN",
        progress=progress,
    )

    final = seeded_init(new_model, config.seed, "dpcgan-sampling-model")
    fields = finish_run(final, "generator", "discriminator", dp, run, t0)
    return DPCGANResult(global_generator=run.global_state, model=final, **fields)


def _fedavg_generators(states: Sequence[Mapping[str, Tensor]], sizes: Sequence[float]) -> dict[str, Tensor]:
    """The server's FedAvg of the clients' generators (``generator.*`` keys only), size-weighted."""
    return size_weighted_mean(states, sizes, "generator.")


def _client_round(
    gan: CGAN,
    x: Tensor,
    y: Tensor,
    config: DPCGANConfig,
    dp: DPSGD,
    *,
    seed: int,
    accountant_state: Mapping[str, Any] | None,
) -> DPTrainResult:
    """One client's local training: DP-SGD on the discriminator, a generator step after each."""
    gen_params = list(gan.generator.parameters())
    g_opt = (
        torch.optim.SGD(gen_params, lr=config.lr)
        if config.optimizer == "sgd"
        else torch.optim.Adam(gen_params, lr=config.lr)
    )
    nz, c, b = gan.noise_dim, gan.num_classes, int(config.batch_size)

    def fake(k: int, like: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.randn(k, nz, device=like.device, dtype=like.dtype)
        return z, torch.randint(0, c, (k,), device=like.device)

    def d_loss(_disc: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        z, yf = fake(xb.shape[0], xb)
        with torch.no_grad():
            xf = gan.generate(z, yf)
        # per sample: its real term plus one fake paired with it (module docstring)
        return F.softplus(-gan.discriminate(xb, yb)) + F.softplus(gan.discriminate(xf, yf))

    def g_step() -> None:
        z, yf = fake(b, x)
        loss = F.softplus(-gan.discriminate(gan.generate(z, yf), yf)).mean()  # non-saturating
        grads = torch.autograd.grad(loss, gen_params)  # the discriminator's .grad is left alone
        for p, g in zip(gen_params, grads):
            p.grad = g
        g_opt.step()
        g_opt.zero_grad(set_to_none=True)

    gan.train()
    return train_dp(
        gan.discriminator,
        x,
        y,
        d_loss,
        **config.schedule(dp),
        seed=seed,
        accountant_state=accountant_state,
        optimizer=config.optimizer,
        between_steps=g_step,
    )


def sample(
    generator_model: CGAN, n: int, class_probs: Sequence[float] | Tensor, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``n`` synthetic embeddings from ``generator_model``'s generator: ``(x (n, dim), labels (n,))``.

    Labels i.i.d. from ``class_probs`` (normalised), ``z ~ N(0, I)`` from a generator seeded with
    ``seed`` (the global RNG is not used); the model is put in eval mode; results on its device.
    """
    return sample_embeddings(
        generator_model,
        generator_model.generate,
        n,
        class_probs,
        num_classes=generator_model.num_classes,
        noise_dim=generator_model.noise_dim,
        seed=seed,
    )
