"""DSL's message exchange, one function per side, so every channel that leaves a site is explicit.

One DSL iteration between the central server (holding the generator ``G``) and site ``j``
(holding real images ``x``, masks ``m`` and its discriminators ``D_j``):

1. site → server: :class:`MaskRequest` — the masks ``m`` of a batch (:meth:`DSLSite.request`).
   **Leaks the masks.** The site keeps the batch's indices to itself.
2. server → site: :class:`SyntheticImages` — ``x̂ = G(m)`` (:meth:`DSLServer.synthesize`).
3. site → server: :class:`GradientReply` — ``g = ∂L_j/∂x̂`` (:meth:`DSLSite.respond`), where
   ``L_j = Σ_k [adv(D_jk(x̂_k, m)) + λ₁·mean|x̂_k − x_k| + λ₂·perc(x̂_k, x_k)]`` over the
   modalities ``k`` the site has. **Leaks about the real images**: the L1 term contributes
   ``λ₁·sign(x̂ − x)/numel`` per pixel, so the sign of ``g`` tells the server on which side of
   ``x̂`` each real pixel lies (:mod:`privfl.attacks.gradient_sign`). An optional site-side
   :class:`~privfl.sharing.dsl.defense.ClipAndNoise` transforms ``g`` before it is sent.
   The site then updates ``D_jk`` locally on ``(x_k, m)`` vs ``(x̂_k, m)``.
4. server: :func:`average_gradients` — backpropagates ``Σ_j w_jk·g_jk`` through ``G`` (``w`` from
   :func:`modality_weights`, proportional to site size among the sites holding modality ``k``)
   and takes an Adam step.

Threat model: the server is honest-but-curious (it runs the protocol and looks at what it
receives: masks, gradients, and the synthetic images it produced itself); a site sees only the
synthetic images of its own masks. Discriminators, real images and the batch indices never leave
their site. Masks are treated as shareable, as in the paper — they are not protected at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privfl.errors import PrivflError
from privfl.seeding import torch_seeded
from privfl.sharing.dsl.networks import MaskToImageGenerator, PatchDiscriminator

__all__ = [
    "DSLProtocolError",
    "DSLServer",
    "DSLSite",
    "GradientReply",
    "MaskRequest",
    "ReplyDefense",
    "SyntheticImages",
    "average_gradients",
    "message_bytes",
    "modality_weights",
]


class DSLProtocolError(PrivflError, ValueError):
    """A DSL message that does not fit the exchange (wrong site, shape or order, non-finite values);
    nothing was updated with it."""


def _check_tensor(what: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise DSLProtocolError(f"{what}: shape {tuple(tensor.shape)}, expected {shape}")
    if not torch.isfinite(tensor).all():
        raise DSLProtocolError(
            f"{what}: non-finite values ({int(torch.isnan(tensor).sum())} NaN, "
            f"{int(torch.isinf(tensor).sum())} Inf)"
        )


@dataclass(frozen=True)
class MaskRequest:
    """Site → server: the masks ``(B, H, W)`` (int64 labels) of one batch of site ``site``."""

    site: int
    masks: Tensor


@dataclass(frozen=True)
class SyntheticImages:
    """Server → site: ``G(masks)``, ``(B, 3·M, H, W)`` in [0, 1], detached from the server's graph."""

    site: int
    images: Tensor


@dataclass(frozen=True)
class GradientReply:
    """Site → server: ``∂L_site/∂x̂`` ``(B, 3·M, H, W)``; zero on the channels of modalities the site lacks."""

    site: int
    grad: Tensor


def message_bytes(message: MaskRequest | SyntheticImages | GradientReply) -> int:
    """Bytes of a message on the wire: masks as uint8 labels, images and gradients as float32."""
    if isinstance(message, MaskRequest):
        return int(message.masks.numel())
    tensor = message.images if isinstance(message, SyntheticImages) else message.grad
    return int(tensor.numel()) * 4


def modality_weights(sizes: Sequence[int], available: Sequence[Sequence[bool]]) -> Tensor:
    """``w[j, k] = n_j·a_jk / Σ_i n_i·a_ik``: site ``j``'s share of modality ``k``'s gradient.

    Args:
        sizes: training-set size ``n_j`` of each site.
        available: ``available[j][k]`` — whether site ``j`` has modality ``k``.

    Returns:
        float64 ``(S, M)``; each column sums to 1. ValueError when a modality has no site.
    """
    n = torch.as_tensor(list(sizes), dtype=torch.float64)
    a = torch.as_tensor([list(map(bool, row)) for row in available], dtype=torch.float64)
    if n.ndim != 1 or not len(n) or (n <= 0).any():
        raise ValueError(f"sizes must be positive, got {list(sizes)}")
    if a.ndim != 2 or a.shape[0] != len(n):
        raise ValueError(f"available must have one row per site ({len(n)}), got shape {tuple(a.shape)}")
    mass = n[:, None] * a
    totals = mass.sum(0)
    if (totals == 0).any():
        missing = torch.nonzero(totals == 0).flatten().tolist()
        raise ValueError(f"modalities {missing} are held by no site")
    return mass / totals


def average_gradients(outputs: Sequence[Tensor], grads: Sequence[Tensor], weights: Tensor) -> None:
    """Backpropagate the weighted average of the sites' image gradients into the generator.

    Accumulates into ``.grad`` of the generator's parameters the gradient of
    ``Σ_j Σ_k w[j, k]·L_jk`` given ``grads[j] = ∂L_j/∂outputs[j]`` — without ever seeing ``L``.

    Args:
        outputs: per site, the generator's output ``(B_j, 3·M, H, W)`` still attached to its graph.
        grads: per site, the returned gradient (same shape).
        weights: ``(S, M)`` from :func:`modality_weights`.
    """
    if not (len(outputs) == len(grads) == weights.shape[0]):
        raise ValueError(
            f"need one output and one gradient per site: {len(outputs)} outputs, {len(grads)} "
            f"gradients, {weights.shape[0]} weight rows"
        )
    scaled = []
    for out, g, w in zip(outputs, grads, weights):
        if g.shape != out.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} differs from the output's {tuple(out.shape)}")
        per_channel = w.to(device=g.device, dtype=g.dtype).repeat_interleave(3)
        scaled.append(g * per_channel[None, :, None, None])
    torch.autograd.backward(list(outputs), scaled)


ReplyDefense = Callable[[Tensor, tuple], Tensor]
"""A site-side transform of DSL's gradient reply: ``defense(grad, key) -> grad`` before it is sent
(e.g. :class:`~privfl.sharing.dsl.defense.ClipAndNoise`); ``key`` is ``(site, reply number)``, to
name the noise draw.

Not a :class:`privfl.defenses.base.Defense`: that protects a client's *model update* in FedAvg
(it sees state-dict updates and can aggregate them at the server); this one sees one tensor, the
gradient of a site's loss with respect to the synthetic images it was sent, and acts on the site
alone."""


@dataclass
class SiteLosses:
    """A site's running sums of its (local, never sent) losses, for diagnostics."""

    generator: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    discriminator: list[float] = field(default_factory=list)


class DSLSite:
    """One site: its real data, its discriminators (one per modality it has) and their optimizers.

    Args:
        site: site id.
        images: ``(N, 3·M, H, W)`` real images in [0, 1] (channels of missing modalities are ignored).
        masks: ``(N, H, W)`` int64 labels.
        available: per modality, whether the site has it.
        num_classes: mask classes.
        ndf: discriminator width.
        d_layers: discriminator depth (3 = 70×70 PatchGAN).
        lr: Adam learning rate of the discriminators.
        beta1: Adam β₁.
        lambda_l1: weight of the L1 term.
        lambda_perceptual: weight of the perceptual term (needs ``perceptual``).
        perceptual: a frozen feature extractor ``(B, 3, H, W) → features`` (public, same at every site).
        defense: applied to the gradient before it is sent, called as ``defense(grad, key)``.
        seed: the site's batch order and discriminator initialisation.
    """

    def __init__(
        self,
        site: int,
        images: Tensor,
        masks: Tensor,
        available: Sequence[bool],
        *,
        num_classes: int = 4,
        ndf: int = 64,
        d_layers: int = 3,
        lr: float = 2e-4,
        beta1: float = 0.5,
        lambda_l1: float = 100.0,
        lambda_perceptual: float = 0.0,
        perceptual: nn.Module | None = None,
        defense: ReplyDefense | None = None,
        seed: int = 0,
    ) -> None:
        if (
            images.ndim != 4
            or images.shape[1] != 3 * len(available)
            or masks.shape != (images.shape[0], *images.shape[2:])
        ):
            raise ValueError(
                f"site {site}: images must be (N, 3·{len(available)}, H, W) and masks (N, H, W), got "
                f"{tuple(images.shape)} and {tuple(masks.shape)}"
            )
        if not len(images):
            raise ValueError(f"site {site} has no images")
        if not any(available):
            raise ValueError(f"site {site} has no modality")
        if lambda_perceptual and perceptual is None:
            raise ValueError("lambda_perceptual > 0 needs a perceptual feature extractor")
        self.site, self.images, self.masks = int(site), images, masks.long()
        self.available = tuple(bool(a) for a in available)
        self.lambda_l1, self.lambda_perceptual, self.perceptual = (
            float(lambda_l1),
            float(lambda_perceptual),
            perceptual,
        )
        self.defense = defense
        gen = torch.Generator().manual_seed(seed)
        with torch_seeded(seed):
            self.discriminators = nn.ModuleDict(
                {
                    str(k): PatchDiscriminator(num_classes, 3, ndf=ndf, n_layers=d_layers).to(images.device)
                    for k, has in enumerate(self.available)
                    if has
                }
            )
        self.optimizer = torch.optim.Adam(self.discriminators.parameters(), lr=lr, betas=(beta1, 0.999))
        self._gen = gen
        self._order: list[int] = []
        self._pending: Tensor | None = None
        self._replies = 0
        self.losses = SiteLosses()

    @property
    def size(self) -> int:
        """Number of training images ``n_j``."""
        return int(self.images.shape[0])

    def request(self, batch_size: int) -> MaskRequest:
        """Draw the next batch (a fresh permutation each pass over the data) and send its masks."""
        idx: list[int] = []
        while len(idx) < min(batch_size, self.size):
            if not self._order:
                self._order = torch.randperm(self.size, generator=self._gen).tolist()
            idx.append(self._order.pop())
        self._pending = torch.tensor(idx, device=self.masks.device)
        return MaskRequest(self.site, self.masks[self._pending].clone())

    def _generator_loss(self, fake: Tensor, real: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        total = fake.new_zeros(())
        l1_total = fake.new_zeros(())
        for key, disc in self.discriminators.items():
            c = slice(3 * int(key), 3 * int(key) + 3)
            logits = disc(fake[:, c], masks)
            adv = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            l1 = (fake[:, c] - real[:, c]).abs().mean()
            total = total + adv + self.lambda_l1 * l1
            l1_total = l1_total + l1.detach()
            if self.lambda_perceptual:
                assert self.perceptual is not None
                total = (
                    total
                    + self.lambda_perceptual
                    * (self.perceptual(fake[:, c]) - self.perceptual(real[:, c])).abs().mean()
                )
        return total, l1_total

    def _update_discriminators(self, fake: Tensor, real: Tensor, masks: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = fake.new_zeros(())
        for key, disc in self.discriminators.items():
            c = slice(3 * int(key), 3 * int(key) + 3)
            lr_, lf = disc(real[:, c], masks), disc(fake[:, c], masks)
            loss = loss + 0.5 * (
                F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_))
                + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
            )
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def respond(self, synthetic: SyntheticImages) -> GradientReply:
        """Update the discriminators on this batch, then return ``∂L/∂x̂`` (defended if configured)."""
        if self._pending is None:
            raise DSLProtocolError(f"site {self.site} got synthetic images without a pending request")
        if synthetic.site != self.site:
            raise DSLProtocolError(f"site {self.site} got synthetic images meant for site {synthetic.site}")
        real, masks = self.images[self._pending], self.masks[self._pending]
        _check_tensor(f"site {self.site}: synthetic images", synthetic.images, tuple(real.shape))
        self._pending = None
        fake = synthetic.images.detach().to(real.dtype)
        self.discriminators.train()
        d_loss = self._update_discriminators(fake, real, masks)
        leaf = fake.clone().requires_grad_(True)
        for p in self.discriminators.parameters():
            p.requires_grad_(False)
        try:
            g_loss, l1 = self._generator_loss(leaf, real, masks)
            (grad,) = torch.autograd.grad(g_loss, leaf)
        finally:
            for p in self.discriminators.parameters():
                p.requires_grad_(True)
        self.losses.generator.append(float(g_loss.detach()))
        self.losses.l1.append(float(l1))
        self.losses.discriminator.append(d_loss)
        if self.defense is not None:
            grad = self.defense(grad, (self.site, self._replies))
        self._replies += 1
        return GradientReply(self.site, grad.detach())


class DSLServer:
    """The central server: the generator, its optimizer and the sites' gradient weights.

    Args:
        generator: the central :class:`~privfl.sharing.dsl.networks.MaskToImageGenerator`.
        weights: ``(S, M)`` from :func:`modality_weights`.
        lr: Adam learning rate.
        beta1: Adam β₁.
    """

    def __init__(
        self, generator: MaskToImageGenerator, weights: Tensor, *, lr: float = 2e-4, beta1: float = 0.5
    ) -> None:
        self.generator = generator
        self.weights = weights
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=(beta1, 0.999))

    def synthesize(self, request: MaskRequest) -> tuple[SyntheticImages, Tensor]:
        """``G(masks)``: the message for the site and the output kept (with its graph) for :meth:`step`."""
        self.generator.train()
        out = self.generator(request.masks)
        return SyntheticImages(request.site, out.detach()), out

    def step(
        self, outputs: Sequence[Tensor], replies: Sequence[GradientReply], extra_loss: Tensor | None = None
    ) -> None:
        """One generator update from the sites' replies (in site order), plus an optional server-side loss.

        Every reply is checked (shape of its output, finite values) before anything is applied.
        """
        if len(outputs) != len(replies):
            raise DSLProtocolError(f"{len(replies)} replies for {len(outputs)} synthetic batches")
        for out, reply in zip(outputs, replies):
            _check_tensor(f"gradient from site {reply.site}", reply.grad, tuple(out.shape))
        self.optimizer.zero_grad(set_to_none=True)
        weights = self.weights[[r.site for r in replies]]
        average_gradients(outputs, [r.grad for r in replies], weights)
        if extra_loss is not None:
            extra_loss.backward()
        self.optimizer.step()
