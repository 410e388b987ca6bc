"""Federated DP-CVAE and DP-CGAN on embeddings (docs/dpcvae.md): decoder FedAvg is the size-weighted mean,
encoders never leave a client, the reported ε is the accountant's and meets the target, sampling
follows the class distribution, a CVAE learns class-conditional means, runs replay with
``SeededNoise``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import privfl.sharing.dpcvae as dpcvae_mod
from privfl.defenses.accounting import PrivacyAccountant
from privfl.defenses.dpsgd import DPSGD, dpsgd_event
from privfl.defenses.rng import SeededNoise
from privfl.sharing.cvae import CVAE
from privfl.sharing.dp_training import train_dp
from privfl.sharing.dpcgan import CGAN, DPCGANConfig, train_federated_dpcgan
from privfl.sharing.dpcgan import sample as sample_gan
from privfl.sharing.dpcvae import DPCVAEConfig, fedavg_decoders, sample, train_federated_dpcvae

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure", "ignore:.*Secure RNG")

SIZES = (40, 70, 100)
DIM, CLASSES = 8, 3


def _clients(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, DIM, generator=g), torch.randint(0, CLASSES, (n,), generator=g)) for n in SIZES]


def _config(**kw) -> DPCVAEConfig:
    base = dict(rounds=2, local_epochs=1, batch_size=16, hidden=32, latent=4, noise=SeededNoise(0))
    return DPCVAEConfig(**{**base, **kw})


def _loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    assert isinstance(m, CVAE)
    return m.per_sample_loss(x, y)


@pytest.fixture(scope="module")
def run():
    """A completed 2-round run, with a spy on what the server receives."""
    received: list[list[str]] = []
    original = dpcvae_mod.fedavg_decoders

    def spy(states, sizes):
        received.extend(sorted(s) for s in states)
        return original(states, sizes)

    dpcvae_mod.fedavg_decoders = spy
    try:
        result = train_federated_dpcvae(_clients(), CLASSES, _config())
    finally:
        dpcvae_mod.fedavg_decoders = original
    return result, received


# --- the CVAE -----------------------------------------------------------------------------------


def test_cvae_has_three_linear_layers_each_and_only_opacus_friendly_modules():
    m = CVAE(DIM, CLASSES, latent=4, hidden=32)
    for part, (inp, out) in ((m.encoder, (DIM + CLASSES, 8)), (m.decoder, (4 + CLASSES, DIM))):
        linears = [layer for layer in part if isinstance(layer, nn.Linear)]
        assert len(linears) == 3 and linears[0].in_features == inp and linears[-1].out_features == out
    assert all(isinstance(mod, (CVAE, nn.Sequential, nn.Linear, nn.ReLU)) for mod in m.modules())
    x, y = torch.randn(5, DIM), torch.tensor([0, 1, 2, 0, 1])
    mu, logvar = m.encode(x, y)
    assert mu.shape == logvar.shape == (5, 4) and m.decode(mu, y).shape == (5, DIM)
    assert m.per_sample_loss(x, y).shape == (5,)
    state = m.decoder_state()
    assert state and all(k.startswith("decoder.") for k in state)
    other = CVAE(DIM, CLASSES, latent=4, hidden=32)
    enc_before = {k: v.clone() for k, v in other.state_dict().items() if k.startswith("encoder.")}
    other.load_decoder_state(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in enc_before.items())
    with pytest.raises(ValueError):
        other.load_decoder_state({**state, "encoder.0.weight": m.encoder[0].weight})


def test_per_sample_loss_is_mse_summed_plus_beta_kl():
    m = CVAE(DIM, CLASSES, latent=4, hidden=16)
    x, y = torch.randn(3, DIM), torch.tensor([0, 1, 2])
    torch.manual_seed(1)
    loss = m.per_sample_loss(x, y, beta=0.5)
    torch.manual_seed(1)
    x_hat, mu, logvar = m(x, y)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    torch.testing.assert_close(loss, ((x_hat - x) ** 2).sum(1) + 0.5 * kl)


# --- train_dp -----------------------------------------------------------------------------------


def test_train_dp_is_deterministic_with_seeded_noise_and_leaves_the_caller_rng_alone():
    x, y = _clients()[0]
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, noise=SeededNoise(3))
    states, results = [], []
    for _ in range(2):
        torch.manual_seed(0)
        m = CVAE(DIM, CLASSES, latent=4, hidden=16)
        rng = torch.get_rng_state()
        results.append(train_dp(m, x, y, _loss, epochs=2, lr=0.1, batch_size=8, dp=dp, seed=5))
        assert torch.equal(torch.get_rng_state(), rng)
        assert not any(hasattr(p, "grad_sample") for p in m.parameters())  # opacus cleaned up
        assert all(not mod._forward_hooks for mod in m.modules())
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert results[0] == results[1]
    torch.manual_seed(0)
    m = CVAE(DIM, CLASSES, latent=4, hidden=16)
    train_dp(m, x, y, _loss, epochs=2, lr=0.1, batch_size=8, dp=dp, seed=6)
    assert not all(torch.equal(states[0][k], m.state_dict()[k]) for k in states[0])


def test_train_dp_clips_per_sample_over_all_trained_parameters_and_freezes_the_rest():
    x, y = _clients()[0]
    m = CVAE(DIM, CLASSES, latent=4, hidden=16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    clip = 1e-3
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip, noise=SeededNoise(0))
    # batch_size = n: q = 1, every sample in every step; one step moves by lr·(mean of clipped grads)
    res = train_dp(m, x, y, _loss, epochs=1, lr=1.0, batch_size=len(y), dp=dp, params=m.decoder.parameters())
    assert res.steps == 1 and res.sample_rate == 1.0 and math.isinf(res.epsilon)
    moved = torch.cat([(m.state_dict()[k] - v).flatten() for k, v in before.items()])
    assert 0 < float(moved.norm()) <= clip * (1 + 1e-5)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items() if k.startswith("encoder."))
    assert all(p.requires_grad for p in m.parameters())


def test_train_dp_calibrates_for_the_whole_planned_run():
    x, y = _clients()[1]  # n = 70, B = 16: q = 1/5
    dp = DPSGD(target_epsilon=1.0, delta=1e-4, max_grad_norm=1.5, noise=SeededNoise(0))
    m = CVAE(DIM, CLASSES, latent=4, hidden=16)
    first = train_dp(m, x, y, _loss, epochs=2, lr=1e-3, batch_size=16, dp=dp, total_epochs=4, seed=0)
    assert first.sample_rate == pytest.approx(1 / 5) and first.steps == 10
    assert first.noise_multiplier == dp.resolve_noise_multiplier(1 / 5, 20)
    assert first.epsilon < 0.9
    assert first.event == dpsgd_event(first.noise_multiplier, 1 / 5, 10)
    second = train_dp(
        m,
        x,
        y,
        _loss,
        epochs=2,
        lr=1e-3,
        batch_size=16,
        dp=dp,
        total_epochs=4,
        seed=1,
        accountant_state=first.accountant_state,
    )
    acct = dp.make_accountant(second.accountant_state)
    assert acct.events == (dpsgd_event(first.noise_multiplier, 1 / 5, 20),)  # one run of 20 equal steps
    assert second.epsilon == acct.epsilon().epsilon == second.epsilon_report.epsilon
    assert second.delta == acct.epsilon().delta >= 1e-4
    assert 0.99 <= second.epsilon <= 1.0  # calibrated to the reported (tightest) bound


def test_train_dp_refuses_batch_coupled_output_shapes_and_foreign_params():
    x, y = _clients()[0]
    m = CVAE(DIM, CLASSES, latent=4, hidden=16)
    dp = DPSGD(noise_multiplier=1.0, noise=SeededNoise(0))
    with pytest.raises(ValueError, match="per-sample"):
        train_dp(
            m,
            x,
            y,
            lambda mod, a, b: mod.per_sample_loss(a, b).mean(),
            epochs=1,
            lr=0.1,
            batch_size=40,
            dp=dp,
        )
    with pytest.raises(ValueError, match="parameters of model"):
        train_dp(m, x, y, _loss, epochs=1, lr=0.1, batch_size=8, dp=dp, params=nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="optimizer"):
        train_dp(m, x, y, _loss, epochs=1, lr=0.1, batch_size=8, dp=dp, optimizer="rmsprop")


def test_a_cvae_trained_without_dp_generates_the_class_conditional_means():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[2.0, -1.0, 0.0, 1.0], [-2.0, 1.0, 1.0, -1.0]])
    y = torch.arange(400) % 2
    x = means[y] + 0.3 * torch.randn(400, 4, generator=g)
    torch.manual_seed(0)
    m = CVAE(4, 2, latent=2, hidden=32)
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6, noise=SeededNoise(0))  # no noise, no clipping
    res = train_dp(m, x, y, _loss, epochs=40, lr=1e-2, batch_size=64, dp=dp, optimizer="adam")
    assert res.loss < 2.0
    xs, ys = sample(m, 2000, [0.5, 0.5], seed=0)
    for c in (0, 1):
        assert (xs[ys == c].mean(0) - means[c]).abs().max() < 0.3, c


# --- federated DP-CVAE --------------------------------------------------------------------------


def test_fedavg_decoders_is_the_size_weighted_mean():
    # dyadic values and weights 1/4, 1/4, 1/2: every operation is exact, so equality is exact
    states = [
        {"decoder.w": torch.tensor([1.0, -2.0, 0.5]) * (i + 1), "decoder.b": torch.tensor([4.0 * i])}
        for i in range(3)
    ]
    sizes = [40, 40, 80]
    out = fedavg_decoders(states, sizes)
    for k in states[0]:
        expected = (states[0][k] * 40 + states[1][k] * 40 + states[2][k] * 80) / 160
        assert torch.equal(out[k], expected)
    g = torch.Generator().manual_seed(0)
    rand = [{"decoder.w": torch.randn(5, 3, generator=g)} for _ in range(3)]
    ref = sum(n * s["decoder.w"].double() for n, s in zip(SIZES, rand)) / sum(SIZES)
    torch.testing.assert_close(fedavg_decoders(rand, SIZES)["decoder.w"], ref.float(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="outside decoder"):
        fedavg_decoders([{"decoder.w": torch.zeros(1), "encoder.w": torch.zeros(1)}], [1])
    with pytest.raises(ValueError, match="positive integers"):
        fedavg_decoders(states, [40, 0, 80])
    with pytest.raises(ValueError):
        fedavg_decoders(states, [40, 40])


def test_encoders_never_leave_a_client(run):
    result, received = run
    cfg = _config()
    decoder_keys = sorted(CVAE(DIM, CLASSES, latent=4, hidden=32).decoder_state())
    assert len(result.sent) == cfg.rounds * len(SIZES)
    assert all(sorted(keys) == decoder_keys for keys in result.sent)
    assert not any(k.startswith("encoder") for keys in result.sent for k in keys)
    assert received == [decoder_keys] * (cfg.rounds * len(SIZES))  # what the server actually got
    assert sorted(result.global_decoder) == decoder_keys
    assert result.param_count["total"] == result.param_count["encoder"] + result.param_count["decoder"]


def test_reported_epsilon_is_the_accountants_and_meets_the_target(run):
    result, _ = run
    cfg = _config()
    assert len(result.epsilons) == len(SIZES)
    assert len(result.accountant_states) == len(result.epsilon_reports) == len(SIZES)
    for eps, state, report, n in zip(
        result.epsilons, result.accountant_states, result.epsilon_reports, SIZES
    ):
        acct = PrivacyAccountant(delta=cfg.delta, accountants=cfg.dp_accountants)
        acct.load_state_dict(state)
        assert eps == acct.epsilon().epsilon == report.epsilon
        steps = cfg.rounds * cfg.local_epochs * math.ceil(n / cfg.batch_size)
        (event,) = acct.events
        assert event.count == steps and event.event.sampling_probability == 1 / math.ceil(n / cfg.batch_size)
        assert 0.99 * cfg.epsilon <= eps <= cfg.epsilon  # completed run: calibrated to the target
    assert result.delta == max(r.delta for r in result.epsilon_reports) >= cfg.delta


def test_federated_run_is_deterministic_with_seeded_noise(run):
    result, _ = run
    again = train_federated_dpcvae(_clients(), CLASSES, _config())
    assert all(torch.equal(result.global_decoder[k], again.global_decoder[k]) for k in result.global_decoder)
    assert again.accountant_states == result.accountant_states and again.epsilons == result.epsilons
    other = train_federated_dpcvae(_clients(), CLASSES, _config(noise=SeededNoise(1)))
    assert not all(
        torch.equal(result.global_decoder[k], other.global_decoder[k]) for k in result.global_decoder
    )


def test_sampling_follows_class_probs(run):
    result, _ = run
    x, y = sample(result.model, 20000, [0.2, 0.0, 0.8], seed=0)
    assert x.shape == (20000, DIM) and y.shape == (20000,) and y.dtype == torch.long
    assert torch.isfinite(x).all() and not (y == 1).any()
    assert (y == 0).float().mean().item() == pytest.approx(0.2, abs=0.015)
    x2, y2 = sample(result.model, 20000, torch.tensor([1.0, 0.0, 4.0]), seed=0)  # normalised: same draw
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = sample(result.model, 20000, [0.2, 0.0, 0.8], seed=1)
    assert not torch.equal(x, x3)
    for bad in ([0.5, 0.5], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [float("nan"), 1.0, 1.0]):
        with pytest.raises(ValueError):
            sample(result.model, 5, bad)


def test_bad_client_data_is_refused():
    (x, y), *_ = _clients()
    with pytest.raises(ValueError, match="labels"):
        train_federated_dpcvae([(x, y + CLASSES)], CLASSES, _config())
    with pytest.raises(ValueError, match="dimensions"):
        train_federated_dpcvae([(x, y), (x[:, :4], y)], CLASSES, _config())
    with pytest.raises(ValueError, match="no clients"):
        train_federated_dpcvae([], CLASSES, _config())


# --- DP-CGAN ------------------------------------------------------------------------------------


def test_dpcgan_runs_end_to_end_with_accountant_epsilons_and_more_parameters(run):
    cvae_result, _ = run
    cfg = DPCGANConfig(rounds=2, local_epochs=1, batch_size=16, hidden=32, latent=4, noise=SeededNoise(0))
    result = train_federated_dpcgan(_clients(), CLASSES, cfg)
    assert len(result.sent) == cfg.rounds * len(SIZES)
    assert all(k.startswith("generator.") for keys in result.sent for k in keys)
    assert sorted(result.global_generator) == sorted(
        CGAN(DIM, CLASSES, noise_dim=4, hidden=32).generator_state()
    )
    for eps, state in zip(result.epsilons, result.accountant_states):
        assert eps == cfg.dpsgd().make_accountant(state).epsilon().epsilon
        assert 0.99 * cfg.epsilon <= eps <= cfg.epsilon
    assert result.param_count["total"] > cvae_result.param_count["total"]  # same hidden and latent
    x, y = sample_gan(result.model, 50, [0.5, 0.5, 0.0], seed=0)
    assert x.shape == (50, DIM) and torch.isfinite(x).all() and not (y == 2).any()
    again = train_federated_dpcgan(_clients(), CLASSES, cfg)
    assert all(
        torch.equal(result.global_generator[k], again.global_generator[k]) for k in result.global_generator
    )
