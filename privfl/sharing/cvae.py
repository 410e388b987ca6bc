"""A conditional VAE on embeddings (Di Salvo, Nguyen, Ledig, MICCAI 2025; docs/dpcvae.md).

:class:`CVAE` models ``p(x | y)`` for an embedding ``x`` and its class ``y``: an encoder
``q(z | x, y)`` and a decoder ``p(x | z, y)``, three linear layers each, conditioned by
concatenating a one-hot label to their input. It contains only ``nn.Linear`` and ``nn.ReLU``
(no BatchNorm, no dropout), so opacus computes exact per-sample gradients for it
(:func:`privfl.sharing.dp_training.train_dp`). In the federated DP-CVAE
(:mod:`privfl.sharing.dpcvae`) only the decoder leaves a client:
:meth:`CVAE.decoder_state` / :meth:`CVAE.load_decoder_state` carry exactly the ``decoder.*``
entries of the ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privfl.sharing.federated_generator import check_positive_ints, load_part_state, part_state

__all__ = ["CVAE"]


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out)
    )


class CVAE(nn.Module):
    """Conditional VAE: ``encoder(x ‖ onehot(y)) → (μ, log σ²)``, ``decoder(z ‖ onehot(y)) → x̂``.

    Args:
        dim: embedding dimension.
        num_classes: number of classes (labels are integers in ``[0, num_classes)``).
        latent: latent dimension of ``z``.
        hidden: width of the two hidden layers of the encoder and of the decoder.

    Attributes:
        encoder: ``Linear(dim + C, hidden) → ReLU → Linear(hidden, hidden) → ReLU →
            Linear(hidden, 2·latent)`` (the first ``latent`` outputs are μ, the rest log σ²).
        decoder: ``Linear(latent + C, hidden) → ReLU → Linear(hidden, hidden) → ReLU →
            Linear(hidden, dim)``.
    """

    def __init__(self, dim: int, num_classes: int, *, latent: int = 16, hidden: int = 128) -> None:
        super().__init__()
        check_positive_ints(dim=dim, num_classes=num_classes, latent=latent, hidden=hidden)
        self.dim, self.num_classes, self.latent, self.hidden = (
            int(dim),
            int(num_classes),
            int(latent),
            int(hidden),
        )
        self.encoder = _mlp(self.dim + self.num_classes, self.hidden, 2 * self.latent)
        self.decoder = _mlp(self.latent + self.num_classes, self.hidden, self.dim)

    def _onehot(self, y: Tensor, like: Tensor) -> Tensor:
        return F.one_hot(y.long(), self.num_classes).to(dtype=like.dtype, device=like.device)

    def encode(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, log σ²)`` of ``q(z | x, y)``, each ``(B, latent)``."""
        h = self.encoder(torch.cat([x, self._onehot(y, x)], dim=1))
        return h[:, : self.latent], h[:, self.latent :]

    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        """The reconstruction / sample ``x̂`` of shape ``(B, dim)`` for latents ``z`` ``(B, latent)``."""
        return self.decoder(torch.cat([z, self._onehot(y, z)], dim=1))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x̂, μ, log σ²)``: encode, draw ``z = μ + σ·ε`` with ``ε ~ N(0, I)`` from torch's global
        RNG (the reparameterisation trick), decode."""
        mu, logvar = self.encode(x, y)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decode(z, y), mu, logvar

    def per_sample_loss(self, x: Tensor, y: Tensor, *, beta: float = 1.0) -> Tensor:
        """Negative ELBO per sample, shape ``(B,)``: ``Σ_d (x̂_d − x_d)² + β·KL(N(μ, σ²) ‖ N(0, I))``.

        The squared error is **summed** over the ``dim`` embedding dimensions (a Gaussian decoder
        with fixed variance ½, up to a constant), and the KL is summed over the latent dimensions,
        ``½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)``; each sample's loss depends only on that sample, as
        per-sample clipping needs. One reparameterised draw per sample (torch's global RNG).
        """
        x_hat, mu, logvar = self(x, y)
        mse = ((x_hat - x) ** 2).sum(dim=1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return mse + beta * kl

    def decoder_state(self) -> dict[str, Tensor]:
        """Detached copies of the ``decoder.*`` entries of the ``state_dict`` (keys keep the prefix)."""
        return part_state(self, "decoder")

    def load_decoder_state(self, state: Mapping[str, Tensor]) -> None:
        """Load exactly the decoder's entries (``decoder.*`` keys, as :meth:`decoder_state` gives);
        ``ValueError`` for missing, extra or non-decoder keys. The encoder is untouched."""
        load_part_state(self, "decoder", state)
