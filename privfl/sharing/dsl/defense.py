"""A site-side defense of DSL's gradient channel: per-image clipping and Gaussian noise.

:class:`ClipAndNoise` turns the gradient a site returns, ``g = ∂L/∂x̂`` of its batch-mean loss, into
``(clip_C(B·g_i) + N(0, σ²C²·I)) / B`` for each image ``i`` of the batch — the gradient of the
image's own loss clipped to L2 norm ``C``, Gaussian noise of std ``σ·C`` per coordinate, scaled
back to the batch mean: the Gaussian mechanism, applied to each image's slot of the reply.

Threat model: protects what the honest-but-curious server learns from the returned gradients about
each real image; masks and synthetic images are not affected. **No (ε, δ) is claimed**: the
returned gradient also depends on the site's discriminator, which is trained on all of the site's
real images without DP, so every message depends on every image, not only on its own — the
per-message sensitivity argument of the Gaussian mechanism does not bound the whole release. The
protection is measured instead, by the gradient-sign reconstruction attack
(:mod:`privfl.attacks.gradient_sign`) with and without it. Noise comes from privfl's secure source
unless a seeded one is passed (reproducible experiments only).
"""

from __future__ import annotations

import math

from torch import Tensor

from privfl.defenses.rng import NoiseSource, default_noise

__all__ = ["ClipAndNoise"]


class ClipAndNoise:
    """Per-image L2 clipping to ``clip`` and Gaussian noise of std ``noise_multiplier·clip`` on a returned
    gradient.

    Args:
        clip: L2 bound ``C`` of each image's gradient (units of the loss per unit of pixel intensity).
        noise_multiplier: ``σ``; 0 clips without noise.
        noise: noise source (default: privfl's cryptographically secure one).
    """

    def __init__(self, clip: float, noise_multiplier: float, noise: NoiseSource | None = None) -> None:
        if not 0 < clip < math.inf:
            raise ValueError(f"clip must be a positive finite number, got {clip}")
        if not 0 <= noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be a non-negative finite number, got {noise_multiplier}")
        self.clip, self.noise_multiplier = float(clip), float(noise_multiplier)
        self.noise = noise or default_noise()

    def __call__(self, grad: Tensor, key: tuple = ()) -> Tensor:
        """The defended gradient for ``grad`` ``(B, C, H, W)`` of a batch-mean loss; ``key`` names the noise
        draw."""
        b = grad.shape[0]
        per_image = grad * b
        norms = per_image.flatten(1).norm(dim=1).clamp_min(1e-12)
        clipped = per_image * (self.clip / norms).clamp(max=1.0).view(-1, *[1] * (grad.ndim - 1))
        noise = self.noise.gaussian(
            grad.shape,
            self.noise_multiplier * self.clip,
            key=("dsl-reply", *key),
            dtype=grad.dtype,
            device=grad.device,
        )
        return (clipped + noise) / b

    def __repr__(self) -> str:
        return (
            f"ClipAndNoise(clip={self.clip}, noise_multiplier={self.noise_multiplier}, noise={self.noise!r})"
        )
