"""Reconstructing real images from the gradients DSL sites return (an attack beyond Chang et al. 2023).

In Distributed Synthetic Learning (:mod:`privfl.sharing.dsl`) a site returns ``g = ∂L/∂x̂`` for the
synthetic images ``x̂ = G(m)`` the server sent. Its L1 term ``λ₁·mean|x̂ − x|`` contributes
``λ₁·sign(x̂ − x)/numel`` to every pixel, and with pix2pix's ``λ₁ = 100`` it dominates: the sign of
each returned pixel gradient says whether the real pixel ``x`` lies below (``+``) or above (``−``)
the probe ``x̂``. Every image is requested once per epoch with the same mask, so the server can link
the observations of one image by its mask and narrow down each pixel.

Threat model:

* :class:`GradientSignAttack` — **honest-but-curious server**: it runs the protocol unchanged and
  keeps ``(x̂, sign g)`` of every image (an ``observer`` of :func:`~privfl.sharing.dsl.train.train_dsl`).
  Per pixel it estimates ``x`` as the value most consistent with all observations
  (:func:`sign_vote_estimate`), robust to the signs the adversarial term or a defense's noise flips:
  its recent synthetic images (averaged) moved into the range the signs allow.
* :func:`bisect_site` — **malicious server**: instead of ``G(m)`` it sends, for each image, the
  midpoint of the interval its pixels are known to lie in, and halves it with every reply — ``k``
  passes over the data give ``k`` bits per pixel. Sites cannot tell a probe from a synthetic image.

Reconstructions are compared with the real images by PSNR (:func:`privfl.attacks.metrics.psnr`).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from privfl.sharing.dsl.protocol import DSLSite, GradientReply, MaskRequest, SyntheticImages

__all__ = ["GradientSignAttack", "bisect_site", "mask_key", "sign_vote_estimate"]


def mask_key(mask: Tensor) -> str:
    """The server's handle on an image: a hash of its mask (identical masks are one image to the attacker)."""
    m = mask.detach().to("cpu", torch.uint8).contiguous()
    return hashlib.blake2b(
        m.numpy().tobytes() + bytes(str(tuple(m.shape)), "ascii"), digest_size=16
    ).hexdigest()


def sign_vote_estimate(
    probes: Tensor, signs: Tensor, low: float = 0.0, high: float = 1.0, prior: Tensor | None = None
) -> Tensor:
    """Per element, the value most consistent with observations "``x`` is below / above probe".

    Args:
        probes: ``(K, ...)`` the values the server sent (``x̂``).
        signs: ``(K, ...)`` sign of the returned gradient: ``+1`` says ``x < x̂``, ``−1`` says
            ``x > x̂``, ``0`` says nothing.
        low: smallest possible value of ``x``.
        high: largest possible value of ``x``.
        prior: ``(...)`` the attacker's best guess without the signs (e.g. its recent synthetic
            images averaged).

    Returns:
        ``(...)``: per element, the span ``[lo, hi]`` of the intervals between sorted probes that
        contradict the fewest observations is computed; the estimate is ``prior`` projected onto
        it — never farther from ``x`` than ``prior`` when the span holds ``x`` — or, without a
        ``prior``, the span's midpoint. Same dtype as ``probes``.
    """
    if probes.shape != signs.shape or probes.ndim < 1 or probes.shape[0] < 1:
        raise ValueError(
            f"probes and signs must have the same shape (K, ...), got {tuple(probes.shape)} and "
            f"{tuple(signs.shape)}"
        )
    if not low < high:
        raise ValueError(f"need low < high, got {low}, {high}")
    p = probes.detach().float().clamp(low, high).flatten(1)
    s = signs.detach().float().flatten(1).sign()
    order = torch.argsort(p, dim=0)
    p, s = torch.gather(p, 0, order), torch.gather(s, 0, order)
    zero = torch.zeros(1, p.shape[1])
    above = torch.cat([zero, torch.cumsum((s > 0).float(), 0)])  # "x < probe" among the i smallest probes
    below_total = (s < 0).float().sum(0, keepdim=True)
    below = torch.cat([zero, torch.cumsum((s < 0).float(), 0)])
    cost = above + (below_total - below)  # (K+1, P): contradictions if x lies in interval i
    edges = torch.cat([torch.full((1, p.shape[1]), low), p, torch.full((1, p.shape[1]), high)])
    best = cost == cost.min(0, keepdim=True).values
    inf = torch.tensor(float("inf"))
    lo = torch.where(best, edges[:-1], inf).amin(0)
    hi = torch.where(best, edges[1:], -inf).amax(0)
    est = (lo + hi) / 2
    if prior is not None:
        if prior.shape != probes.shape[1:]:
            raise ValueError(f"prior must have shape {tuple(probes.shape[1:])}, got {tuple(prior.shape)}")
        est = torch.minimum(torch.maximum(prior.detach().float().flatten(), lo), hi)
    return est.view(probes.shape[1:]).to(probes.dtype)


class GradientSignAttack:
    """Passive reconstruction by an honest-but-curious server (module docstring); use as an observer.

    Args:
        site: attack only this site's images (default: all sites).
        max_images: keep observations of at most this many distinct images (first seen first).
        low: smallest pixel value.
        high: largest pixel value.
        prior_window: the prior is the mean of the image's last ``prior_window`` probes (the
            server's recent synthetic images of its mask, averaged over the generator's dropout).

    Memory: one probe (float16) and one sign (int8) per pixel per observation of each kept image.
    """

    def __init__(
        self,
        site: int | None = None,
        max_images: int | None = None,
        low: float = 0.0,
        high: float = 1.0,
        prior_window: int = 5,
    ) -> None:
        if prior_window < 1:
            raise ValueError(f"prior_window must be >= 1, got {prior_window}")
        self.site, self.max_images, self.low, self.high = site, max_images, float(low), float(high)
        self.prior_window = int(prior_window)
        self.probes: dict[str, list[Tensor]] = {}
        self.signs: dict[str, list[Tensor]] = {}

    def __call__(self, request: MaskRequest, synthetic: SyntheticImages, reply: GradientReply) -> None:
        """Keep what the server saw in one exchange."""
        if self.site is not None and request.site != self.site:
            return
        for mask, probe, grad in zip(request.masks, synthetic.images, reply.grad):
            key = mask_key(mask)
            if key not in self.probes:
                if self.max_images is not None and len(self.probes) >= self.max_images:
                    continue
                self.probes[key], self.signs[key] = [], []
            self.probes[key].append(probe.detach().to("cpu", torch.float16))
            self.signs[key].append(grad.detach().sign().to("cpu", torch.int8))

    def observations(self, key: str) -> int:
        """Number of observations of the image with mask hash ``key``."""
        return len(self.probes.get(key, []))

    def reconstruct(self, masks: Tensor, *, use_signs: bool = True) -> tuple[Tensor, Tensor]:
        """Reconstructions ``(N, C, H, W)`` of the images with these masks and a bool ``(N,)`` of which were
        seen.

        The prior (mean of the last ``prior_window`` probes) goes into :func:`sign_vote_estimate`;
        ``use_signs=False`` returns the prior alone — what the server has without the gradients.
        Unseen images get the mid-range value.
        """
        out: list[Tensor | None] = []
        seen: list[bool] = []
        for mask in masks:
            key = mask_key(mask)
            if key in self.probes:
                probes = torch.stack(self.probes[key]).float()
                prior = probes[-self.prior_window :].mean(0)
                est = (
                    sign_vote_estimate(
                        probes, torch.stack(self.signs[key]).float(), self.low, self.high, prior=prior
                    )
                    if use_signs
                    else prior
                )
                out.append(est)
                seen.append(True)
            else:
                out.append(None)
                seen.append(False)
        shape = next((o.shape for o in out if o is not None), None)
        if shape is None:
            raise ValueError("none of these masks was observed")
        filled = [o if o is not None else torch.full(shape, (self.low + self.high) / 2) for o in out]
        return torch.stack(filled), torch.tensor(seen)


def bisect_site(
    site: DSLSite, passes: int, *, batch_size: int = 4, low: float = 0.0, high: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Active reconstruction by a malicious server: bisect every pixel of every image of ``site``.

    Sends probes instead of synthetic images for ``passes`` passes over the site's data (each pass
    ``⌈n / batch_size⌉`` requests; images are linked by their masks) and returns
    ``(masks (N, H, W), reconstructions (N, C, H, W))`` of the distinct images it saw, reconstructions
    being the final interval midpoints. The site's discriminators are updated on the probes as on
    any synthetic image (the attack also spoils its training).
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")

    lo: dict[str, Tensor] = {}
    hi: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    channels = site.images.shape[1]
    requests = passes * -(-site.size // batch_size)
    for _ in range(requests):
        request = site.request(batch_size)
        keys = [mask_key(m) for m in request.masks]
        for key, m in zip(keys, request.masks):
            if key not in lo:
                shape = (channels, *m.shape)
                lo[key], hi[key] = torch.full(shape, low), torch.full(shape, high)
                masks[key] = m.cpu()
        probe = torch.stack([(lo[k] + hi[k]) / 2 for k in keys]).to(site.images.device)
        reply = site.respond(SyntheticImages(request.site, probe))
        for key, p, g in zip(keys, probe.cpu(), reply.grad.cpu()):
            up = g > 0  # x < probe
            down = g < 0
            hi[key] = torch.where(up, p, hi[key])
            lo[key] = torch.where(down, p, lo[key])
    keys = list(masks)
    return torch.stack([masks[k] for k in keys]), torch.stack([(lo[k] + hi[k]) / 2 for k in keys])
