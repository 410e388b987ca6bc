"""Distributed Synthetic Learning: the protocol, the four variants, FedAvg-GAN, the defense and the
attacks."""

from __future__ import annotations

import math

import pytest
import torch

from privfl.attacks.gradient_sign import GradientSignAttack, bisect_site, mask_key, sign_vote_estimate
from privfl.attacks.metrics import psnr
from privfl.data import SyntheticHistology
from privfl.defenses.rng import SeededNoise
from privfl.fl.rounds import weighted_sum
from privfl.sharing.dsl import (
    ClipAndNoise,
    DSLConfig,
    DSLProtocolError,
    DSLServer,
    DSLSite,
    MaskRequest,
    MaskToImageGenerator,
    PatchDiscriminator,
    SiteData,
    SyntheticImages,
    average_gradients,
    modality_weights,
    synthesize,
    train_cl_dsl,
    train_dsl,
)
from privfl.sharing.dsl.baselines import train_fedavg_gan

TINY = dict(ngf=4, ndf=4, n_blocks=1, batch_size=2, accelerator="cpu")


@pytest.fixture(scope="module")
def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    ds = SyntheticHistology(10, size=32, sites=2, seed=3)
    return torch.stack([ds[i][0] for i in range(10)]), torch.stack([ds[i][1] for i in range(10)])


def _sites(pairs, modalities: int = 1, available=None) -> list[SiteData]:
    x, m = pairs
    x = x.repeat(1, modalities, 1, 1)
    avail = available or [None, None]
    return [SiteData(x[:6], m[:6], avail[0]), SiteData(x[6:], m[6:], avail[1])]


# ------------------------------------------------------------------ networks


def test_networks_shapes_and_range() -> None:
    g = MaskToImageGenerator(4, modalities=2, ngf=4, n_blocks=2)
    m = torch.randint(0, 4, (3, 32, 32))
    out = g(m)
    assert out.shape == (3, 6, 32, 32) and out.min() >= 0 and out.max() <= 1
    d = PatchDiscriminator(4, 3, ndf=4)
    assert d(out[:, :3], m).shape[:2] == (3, 1)
    with pytest.raises(ValueError):
        g(torch.randint(0, 4, (1, 30, 30)))
    with pytest.raises(ValueError):
        MaskToImageGenerator(4, dropout=1.0)


# ------------------------------------------------------------------ weighted gradient averaging


def test_modality_weights_proportional_to_size_among_holders() -> None:
    w = modality_weights([10, 30, 60], [(True, True), (True, False), (False, True)])
    assert torch.allclose(
        w, torch.tensor([[0.25, 10 / 70], [0.75, 0.0], [0.0, 60 / 70]], dtype=torch.float64)
    )
    assert torch.allclose(w.sum(0), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="held by no site"):
        modality_weights([1, 2], [(True, False), (True, False)])
    with pytest.raises(ValueError):
        modality_weights([0, 2], [(True,), (True,)])


def test_average_gradients_matches_direct_backprop_of_weighted_loss() -> None:
    torch.manual_seed(0)
    g = MaskToImageGenerator(4, modalities=2, ngf=4, n_blocks=1, dropout=0.0).double()
    masks = [torch.randint(0, 4, (2, 16, 16)), torch.randint(0, 4, (3, 16, 16))]
    targets = [torch.rand(2, 6, 16, 16, dtype=torch.float64), torch.rand(3, 6, 16, 16, dtype=torch.float64)]
    available = [(True, True), (True, False)]
    w = modality_weights([2, 3], available)

    def site_losses(out: torch.Tensor, j: int) -> list[torch.Tensor]:  # one loss per modality the site has
        return [
            ((out[:, 3 * k : 3 * k + 3] - targets[j][:, 3 * k : 3 * k + 3]) ** 2).mean() * (k + 1)
            for k in range(2)
            if available[j][k]
        ]

    # the protocol: each site returns d(sum of its losses)/d(output); the server weighs and backprops
    g.zero_grad()
    outputs, grads = [], []
    for j in range(2):
        out = g(masks[j])
        leaf = out.detach().requires_grad_(True)
        grads.append(torch.autograd.grad(sum(site_losses(leaf, j)), leaf)[0])
        outputs.append(out)
    average_gradients(outputs, grads, w.double())
    protocol = [p.grad.clone() for p in g.parameters()]
    # direct: backprop sum_j sum_k w_jk L_jk
    g.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for j in range(2):
        ks = [k for k in range(2) if available[j][k]]
        total = total + sum(w[j, k] * loss for k, loss in zip(ks, site_losses(g(masks[j]), j)))
    total.backward()
    for a, p in zip(protocol, g.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-12, rtol=1e-9)
    with pytest.raises(ValueError):
        average_gradients(outputs[:1], grads, w)


# ------------------------------------------------------------------ the site's side


def test_site_sends_masks_only_and_returns_a_gradient_that_carries_the_l1_sign(pairs) -> None:
    x, m = pairs
    site = DSLSite(0, x[:4], m[:4], (True,), ndf=4, lambda_l1=1e4, seed=1)
    with pytest.raises(DSLProtocolError, match="without a pending request"):
        site.respond(SyntheticImages(0, torch.rand(2, 3, 32, 32)))
    request = site.request(2)
    assert isinstance(request, MaskRequest) and set(vars(request)) == {"site", "masks"}
    assert request.masks.shape == (2, 32, 32) and request.masks.dtype == torch.int64
    real = next(x[i : i + 1] for i in range(4) if torch.equal(m[i], request.masks[0]))
    probe = torch.rand(2, 3, 32, 32)
    reply = site.respond(SyntheticImages(0, probe))
    assert reply.grad.shape == probe.shape
    # with a dominant L1 term the sign of the reply is sign(probe - real), pixel by pixel
    agree = (reply.grad[0].sign() == (probe[0] - real[0]).sign()).float().mean()
    assert agree > 0.99
    site.request(2)
    with pytest.raises(DSLProtocolError, match="meant for site"):
        site.respond(SyntheticImages(1, probe))


def test_missing_modality_gets_zero_gradient(pairs) -> None:
    x, m = pairs
    site = DSLSite(0, x[:4].repeat(1, 2, 1, 1), m[:4], (False, True), ndf=4)
    assert list(site.discriminators) == ["1"]
    site.request(2)
    reply = site.respond(SyntheticImages(0, torch.rand(2, 6, 32, 32)))
    assert torch.count_nonzero(reply.grad[:, :3]) == 0 and torch.count_nonzero(reply.grad[:, 3:]) > 0


# ------------------------------------------------------------------ the four variants


@pytest.mark.parametrize(
    "modalities,available,variant",
    [
        (1, None, "DSL"),
        (2, None, "MM-DSL"),
        (2, [(True, False), (False, True)], "Hetero-MM-DSL"),
    ],
)
def test_variants_run_end_to_end(pairs, modalities, available, variant) -> None:
    names = ("he", "ihc")[:modalities]
    config = DSLConfig(modalities=names, epochs=2, **TINY)
    seen = []
    result = train_dsl(
        _sites(pairs, modalities, available), config, observer=lambda q, s, r: seen.append(q.site)
    )
    assert result.variant == variant and len(result.history) == 2
    iters = math.ceil(6 / 2)
    assert result.messages == len(seen) == 2 * iters * 2
    # bytes per channel: masks as uint8, images and gradients as float32
    assert result.traffic["masks_to_server"] == result.messages * 2 * 32 * 32
    assert (
        result.traffic["gradients_to_server"]
        == result.traffic["images_to_sites"]
        == result.messages * 2 * 3 * modalities * 32 * 32 * 4
    )
    out = synthesize(result.generator, pairs[1][:3], seed=5)
    assert out.shape == (3, 3 * modalities, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, synthesize(result.generator, pairs[1][:3], seed=5))
    assert all(math.isfinite(v) for rec in result.history for v in rec["l1"])


def test_hetero_completes_the_missing_modality(pairs) -> None:
    config = DSLConfig(modalities=("he", "ihc"), epochs=1, **TINY)
    result = train_dsl(_sites(pairs, 2, [(True, False), (True, True)]), config)
    # site 0 has no IHC, yet the generator produces IHC for its masks
    assert synthesize(result.generator, pairs[1][:6]).shape[1] == 6


def test_cl_dsl_reminding_loss_keeps_the_earlier_generator(pairs) -> None:
    sites = _sites(pairs)
    m0 = pairs[1][:6]

    def drift(weight: float) -> float:
        config = DSLConfig(epochs=2, reminding_weight=weight, lr=2e-3, dropout=0.0, seed=1, **TINY)
        stage1 = train_cl_dsl(sites[:1], config)
        both = train_cl_dsl(sites, config)
        return float(
            (
                synthesize(both.generator, m0, stochastic=False)
                - synthesize(stage1.generator, m0, stochastic=False)
            )
            .abs()
            .mean()
        )

    result = train_cl_dsl(sites, DSLConfig(epochs=1, **TINY))
    assert result.variant == "CL-DSL" and [r["stage"] for r in result.history] == [0, 1]
    assert drift(1e4) < drift(0.0)


def test_bf16_autocast_path_runs_on_cpu(pairs) -> None:
    config = DSLConfig(epochs=1, precision="bf16-mixed", **TINY)
    result = train_dsl(_sites(pairs), config)
    assert result.generator(pairs[1][:2]).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path(pairs) -> None:
    result = train_dsl(_sites(pairs), DSLConfig(epochs=1, ngf=4, ndf=4, n_blocks=1, accelerator="cuda"))
    assert result.history


# ------------------------------------------------------------------ FedAvg-GAN


def test_fedavg_gans_average_is_the_weighted_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    avg = weighted_sum([a, b], [1, 3], dtype=torch.float64)
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0])) and avg["w"].dtype == torch.float32
    assert avg["n"].dtype == torch.int64 and avg["n"] == 4
    with pytest.raises(ValueError):
        weighted_sum([a], [1, 2])


def test_fedavg_gan_runs_and_counts_model_traffic(pairs) -> None:
    result = train_fedavg_gan(_sites(pairs), DSLConfig(epochs=1, **TINY), rounds=2)
    assert result.variant == "FedAvg-GAN" and len(result.history) == 2
    assert result.traffic["models_to_server"] == result.traffic["models_to_sites"] > 0


# ------------------------------------------------------------------ the defense


def test_clip_and_noise_clips_each_image_and_adds_calibrated_noise() -> None:
    g = torch.randn(4, 3, 8, 8)
    clipped = ClipAndNoise(0.5, 0.0)(g)
    assert torch.all((clipped * 4).flatten(1).norm(dim=1) <= 0.5 + 1e-6)
    noisy = ClipAndNoise(0.5, 2.0, SeededNoise(0))(g, (0, 1))
    residual = noisy * 4 - clipped * 4
    assert abs(float(residual.std()) - 1.0) < 0.1  # std = noise_multiplier * clip
    assert torch.equal(noisy, ClipAndNoise(0.5, 2.0, SeededNoise(0))(g, (0, 1)))
    with pytest.raises(ValueError):
        ClipAndNoise(0.0, 1.0)
    with pytest.raises(ValueError):
        ClipAndNoise(1.0, -1.0)


# ------------------------------------------------------------------ the gradient-sign attack


def test_sign_vote_estimate_brackets_and_tolerates_flips() -> None:
    probes = torch.tensor([[0.2], [0.8], [0.5], [0.6]])
    signs = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])  # x in (0.5, 0.6)
    assert torch.allclose(sign_vote_estimate(probes, signs), torch.tensor([0.55]))
    # one contradicting observation ("x < 0.3") is outvoted by the others
    more = torch.cat([probes, torch.tensor([[0.45], [0.7], [0.3]])])
    flipped = torch.cat([signs, torch.tensor([[-1.0], [1.0], [1.0]])])
    assert torch.allclose(sign_vote_estimate(more, flipped), torch.tensor([0.55]))
    assert torch.allclose(
        sign_vote_estimate(torch.tensor([[0.4]]), torch.tensor([[0.0]])), torch.tensor([0.5])
    )
    with pytest.raises(ValueError):
        sign_vote_estimate(probes, signs[:2])


def test_passive_attack_converges_on_random_probes() -> None:
    torch.manual_seed(0)
    real = torch.rand(2, 3, 8, 8)
    masks = torch.randint(0, 4, (2, 8, 8))
    attack = GradientSignAttack()
    for _ in range(40):
        probe = torch.rand(2, 3, 8, 8)
        noise = 0.01 * torch.randn_like(probe)  # the adversarial term's small contribution
        grad = (probe - real).sign() * 0.03 + noise
        attack(MaskRequest(0, masks), SyntheticImages(0, probe), type("R", (), {"grad": grad})())
    recon, seen = attack.reconstruct(masks)
    assert seen.all() and attack.observations(mask_key(masks[0])) == 40
    assert float(psnr(recon, real).mean()) > 25


def test_mask_key_identifies_masks() -> None:
    a = torch.zeros(8, 8, dtype=torch.long)
    b = a.clone()
    b[0, 0] = 1
    assert mask_key(a) == mask_key(a.clone()) != mask_key(b)


def test_active_bisection_recovers_images_and_the_defense_stops_it(pairs) -> None:
    x, m = pairs
    site = DSLSite(0, x[:4], m[:4], (True,), ndf=4, seed=2)
    masks, recon = bisect_site(site, 8, batch_size=2)
    order = [next(i for i in range(4) if torch.equal(m[i], mk)) for mk in masks]
    assert len(masks) == 4 and float(psnr(recon, x[order]).mean()) > 40
    defended = DSLSite(
        0, x[:4], m[:4], (True,), ndf=4, seed=2, defense=ClipAndNoise(1.0, 1.0, SeededNoise(0))
    )
    masks, recon = bisect_site(defended, 8, batch_size=2)
    order = [next(i for i in range(4) if torch.equal(m[i], mk)) for mk in masks]
    assert float(psnr(recon, x[order]).mean()) < 15


def test_perceptual_term_is_used(pairs) -> None:
    x, m = pairs
    feats = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="perceptual"):
        DSLSite(0, x[:4], m[:4], (True,), lambda_perceptual=1.0)
    replies = []
    for weight in (0.0, 50.0):
        torch.manual_seed(0)
        site = DSLSite(0, x[:4], m[:4], (True,), ndf=4, lambda_perceptual=weight, perceptual=feats, seed=1)
        site.request(2)
        replies.append(site.respond(SyntheticImages(0, torch.full((2, 3, 32, 32), 0.5))).grad)
    assert not torch.allclose(replies[0], replies[1])
    result = train_dsl(_sites(pairs), DSLConfig(epochs=1, lambda_perceptual=1.0, **TINY), perceptual=feats)
    assert result.history


def test_passive_prior_is_what_the_server_has_without_signs() -> None:
    torch.manual_seed(1)
    real = torch.rand(1, 3, 8, 8)
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    attack = GradientSignAttack(prior_window=2)
    probes = [real + 0.2, real + 0.1]  # every probe above the real image: one-sided bracket
    for probe in probes:
        attack(
            MaskRequest(0, masks),
            SyntheticImages(0, probe.clamp(0, 1)),
            type("R", (), {"grad": (probe - real).sign()})(),
        )
    prior, _ = attack.reconstruct(masks, use_signs=False)
    assert torch.allclose(prior, torch.stack(probes).clamp(0, 1).mean(0), atol=1e-3)  # probes kept as float16
    with_signs, _ = attack.reconstruct(masks)
    # the prior is moved to the bound the signs prove: never farther from the real image
    assert (with_signs - real).abs().le((prior - real).abs() + 1e-6).all()
    assert float(psnr(with_signs, real)) > float(psnr(prior, real))


def test_malformed_dsl_messages_are_refused_and_nothing_is_updated(pairs) -> None:
    x, m = pairs
    site = DSLSite(0, x[:4], m[:4], (True,), ndf=4, seed=1)
    site.request(2)
    before = [p.clone() for p in site.discriminators.parameters()]
    for bad in (torch.rand(3, 3, 32, 32), torch.full((2, 3, 32, 32), float("nan"))):
        with pytest.raises(DSLProtocolError):
            site.respond(SyntheticImages(0, bad))
    assert all(torch.equal(a, b) for a, b in zip(before, site.discriminators.parameters()))
    site.respond(SyntheticImages(0, torch.rand(2, 3, 32, 32)))  # the request is still pending: it answers

    gen = MaskToImageGenerator(4, ngf=4, n_blocks=1)
    server = DSLServer(gen, modality_weights([4], [(True,)]).float())
    weights = [p.clone() for p in gen.parameters()]
    request = site.request(2)
    synthetic, out = server.synthesize(request)
    reply = site.respond(synthetic)
    for grad in (reply.grad[:1], reply.grad.clone().fill_(float("inf"))):
        with pytest.raises(DSLProtocolError, match="gradient from site 0"):
            server.step([out], [type(reply)(0, grad)])
    assert all(torch.equal(a, b) for a, b in zip(weights, gen.parameters()))
    server.step([out], [reply])
    assert not all(torch.equal(a, b) for a, b in zip(weights, gen.parameters()))


def test_training_is_deterministic_whatever_ran_before(pairs) -> None:
    config = DSLConfig(epochs=1, **TINY)
    first = train_dsl(_sites(pairs), config).generator.state_dict()
    torch.rand(100)  # the caller's RNG state must not matter ...
    again = train_dsl(_sites(pairs), config).generator.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    state = torch.random.get_rng_state()
    train_cl_dsl(_sites(pairs), config)
    assert torch.equal(state, torch.random.get_rng_state())  # ... and is left as it was
    other = train_dsl(_sites(pairs), DSLConfig(epochs=1, seed=1, **TINY)).generator.state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)
