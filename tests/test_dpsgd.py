"""Sample-level DP-SGD: per-sample losses, opacus per-sample gradients, fit_dp_sgd, calibration."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from privfl.defenses.dpsgd import DPSGD, DPSGDResult, fit_dp_sgd, sample_level_epsilon
from privfl.defenses.rng import SeededNoise
from privfl.fl.client import Client, ClientConfig, trainable_state
from privfl.fl.device import make_fabric
from privfl.models import build_model
from privfl.models.dhunet import TINY, DHUNet
from privfl.models.dp_compat import make_private_compatible
from privfl.models.losses import CEDiceLoss, DHUNetLoss, per_sample_loss, soft_dice_loss

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning", "ignore:Optimal order is the:UserWarning"
)


def tiny_dhunet(size: int = 32, seed: int = 0) -> DHUNet:
    """dhunet-tiny without stochastic depth, so a batch and a single sample see the same network."""
    torch.manual_seed(seed)
    return DHUNet(4, size, dataclasses.replace(TINY, swin_drop_path=0.0, convnext_drop_path=0.0))


def private(name: str, seed: int = 0, size: int = 32) -> nn.Module:
    if name == "dhunet-tiny":
        return make_private_compatible(tiny_dhunet(size, seed))
    torch.manual_seed(seed)
    return make_private_compatible(build_model(name))


def data(n: int, size: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.randint(0, 4, (n, size, size), generator=g))


def norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def fit(model: nn.Module, ds, dp: DPSGD, cfg: ClientConfig | None = None, **kw) -> DPSGDResult:
    kw = {"loss_fn": CEDiceLoss(), "round_idx": 0, "total_rounds": 2, "seed": 0} | kw
    return fit_dp_sgd(model, ds, trainable_state(model), cfg or ClientConfig(local_steps=2, batch_size=2, lr=0.05), dp,
                      **kw)


# --- per-sample losses -----------------------------------------------------------------------------

def test_per_sample_dice_is_the_mean_of_single_sample_losses():
    torch.manual_seed(0)
    # images unlike each other (class make-up and confidence), so batch and per-image Dice differ
    target = torch.randint(0, 3, (4, 8, 8))
    target[0], target[1, :6] = 0, 2
    logits = torch.randn(4, 3, 8, 8) * torch.tensor([0.5, 1.0, 3.0, 6.0]).view(4, 1, 1, 1)
    singles = torch.stack([soft_dice_loss(logits[i : i + 1], target[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(soft_dice_loss(logits, target, per_sample=True), singles.mean())
    assert not torch.allclose(soft_dice_loss(logits, target), singles.mean(), atol=1e-3)  # batch Dice couples
    for loss in (CEDiceLoss(0.3, 0.7), DHUNetLoss()):
        ps = per_sample_loss(loss)
        out = (logits, (logits * 0.5, logits.flip(-1), logits * 2)) if isinstance(loss, DHUNetLoss) else logits

        def pick(i, out=out):
            if isinstance(out, torch.Tensor):
                return out[i : i + 1]
            return out[0][i : i + 1], tuple(d[i : i + 1] for d in out[1])

        singles = torch.stack([ps(pick(i), target[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(ps(out, target), singles.mean())
        torch.testing.assert_close(singles, torch.stack([loss(pick(i), target[i : i + 1]) for i in range(4)]))
        assert not torch.allclose(loss(out, target), singles.mean(), atol=1e-3)


def test_per_sample_gradient_of_one_sample_ignores_the_others():
    torch.manual_seed(1)
    logits, target = torch.randn(3, 4, 8, 8), torch.randint(0, 4, (3, 8, 8))

    def grad_of_sample_0(other: torch.Tensor, per_sample: bool) -> torch.Tensor:
        x = torch.cat([logits[:1], other]).requires_grad_(True)
        DHUNetLoss(per_sample=per_sample)(x, target).backward()
        return x.grad[0]

    other = logits[1:] + 3 * torch.randn_like(logits[1:])
    torch.testing.assert_close(grad_of_sample_0(logits[1:], True), grad_of_sample_0(other, True))
    assert not torch.allclose(grad_of_sample_0(logits[1:], False), grad_of_sample_0(other, False))


def test_default_losses_are_unchanged_and_helper_rejects_unknown_losses():
    torch.manual_seed(2)
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    probs, onehot = logits.softmax(1), F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    inter, den = (probs * onehot).sum((0, 2, 3)), probs.pow(2).sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    torch.testing.assert_close(soft_dice_loss(logits, target), 1 - ((2 * inter + 1e-5) / (den + 1e-5)).mean())
    assert not CEDiceLoss().per_sample and not DHUNetLoss().per_sample
    ps = per_sample_loss(DHUNetLoss(weights=(0.6, 0.3, 0.1)))
    assert isinstance(ps, DHUNetLoss) and ps.per_sample and ps.weights == (0.6, 0.3, 0.1)
    assert per_sample_loss(ps) is ps
    assert per_sample_loss(CEDiceLoss(0.2, 0.8)).ce_weight == 0.2
    for bad in (nn.CrossEntropyLoss(), nn.MSELoss()):
        with pytest.raises(TypeError, match="per-sample"):
            per_sample_loss(bad)
    empty = torch.zeros(0, 4, 8, 8, requires_grad=True)  # Poisson sampling may draw an empty batch
    loss = per_sample_loss(DHUNetLoss())((empty, (empty, empty, empty)), torch.zeros(0, 8, 8, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


# --- opacus per-sample gradients with the per-sample loss ---------------------------------------------

@pytest.mark.parametrize("name,size", [("unet-tiny", 32), ("dhunet-tiny", 64), ("dhunet-tiny", 32)])
def test_opacus_per_sample_gradients_match_one_sample_at_a_time(name, size):
    """opacus' per-sample gradients of the per-sample loss (mean reduction, as fit_dp_sgd uses) are
    each sample's own gradient. dhunet-tiny at 32 px has a 1×1 last ConvNeXt stage (see the
    channels-last test below)."""
    model = private(name, size=size).double().train()
    reference = copy.deepcopy(model)
    loss_fn = per_sample_loss(DHUNetLoss() if name == "dhunet-tiny" else CEDiceLoss())
    x = torch.rand(3, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 4, (3, size, size), generator=torch.Generator().manual_seed(4))
    gsm = GradSampleModule(model, loss_reduction="mean")  # what fit_dp_sgd asks of make_private
    loss_fn(gsm(x), y).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = dict(reference.named_parameters())
    for i in range(3):
        reference.zero_grad()
        loss_fn(reference(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in params:
            g = ref[n].grad
            # the losses score in float32 (logits.float()), hence float32-level tolerances
            torch.testing.assert_close(p.grad_sample[i], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=n)
    gsm.to_standard_module()


def test_conv_grad_sampler_on_a_channels_last_1x1_map():
    """A channels-last (N, C, 1, 1) map counts as contiguous, yet F.pad keeps its layout and opacus'
    as_strided unfold2d misread it (zero per-sample gradients on dhunet-tiny's last ConvNeXt stage at
    32 px); dp_compat's Conv2d sampler copies to canonical strides."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 7, padding=3, groups=4).double()
    x = torch.rand(2, 1, 1, 4, dtype=torch.float64).permute(0, 3, 1, 2)  # as ConvNeXt hands it over
    gsm = GradSampleModule(copy.deepcopy(conv), loss_reduction="sum")
    (gsm(x) ** 2).sum().backward()
    conv.zero_grad()
    (conv(x[:1]) ** 2).sum().backward()
    torch.testing.assert_close(gsm._module.weight.grad_sample[0], conv.weight.grad)


def test_batch_dice_gives_opacus_gradients_that_are_not_per_sample():
    """Why the per-sample loss is required: with the batch-summed Dice, opacus' 'per-sample'
    gradients are not the gradients of any one sample's loss."""
    model = private("unet-tiny").double().train()
    reference = copy.deepcopy(model)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 4, (3, 32, 32), generator=torch.Generator().manual_seed(4))
    gsm = GradSampleModule(model, loss_reduction="mean")
    CEDiceLoss()(gsm(x), y).backward()
    CEDiceLoss()(reference(x[:1]), y[:1]).backward()
    p, g = model.head.weight, reference.head.weight.grad
    assert not torch.allclose(p.grad_sample[0], g, rtol=1e-3)
    gsm.to_standard_module()


# --- fit_dp_sgd ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["unet-tiny", "dhunet-tiny"])
def test_fit_dp_sgd_returns_a_delta_keyed_like_the_compatible_model(name):
    model = private(name)
    before = trainable_state(model)
    loss = DHUNetLoss() if name == "dhunet-tiny" else CEDiceLoss()
    res = fit(model, data(4), DPSGD(noise_multiplier=1.0, max_grad_norm=1.0), loss_fn=loss)
    assert res.delta.keys() == before.keys()
    assert not any(k.startswith("_module.") for k in res.delta)
    if name == "dhunet-tiny":
        assert any(k.endswith("ls.gamma") for k in res.delta)
        assert any(k.endswith("rel_pos.relative_position_bias_table") for k in res.delta)
    assert all(torch.isfinite(v).all() for v in res.delta.values()) and norm(res.delta) > 0
    assert res.steps == 2 and res.sample_rate == 2 / 4 and res.noise_multiplier == 1.0
    assert res.event == (1.0, 0.5, 2) and res.history == [(1.0, 0.5, 2)]
    assert 0 < res.epsilon < math.inf and res.dp_delta == 1e-5
    assert math.isfinite(res.loss)
    after = model.state_dict()  # the caller's model is neither trained nor left with opacus' hooks
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_sample_rate_is_what_opacus_samples_with():
    res = fit(private("unet-tiny"), data(5), DPSGD(noise_multiplier=1.0), ClientConfig(local_epochs=1, batch_size=2))
    assert res.sample_rate == 1 / 3  # 1 / ceil(n / B), not B / n = 0.4
    assert res.steps == 3  # local_epochs · ceil(n / B), as Client.fit


def test_poisson_batches_vary_and_empty_batches_are_noised_and_counted():
    model = private("unet-tiny")
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))  # survives deepcopy
    res = fit(model, data(4), DPSGD(noise_multiplier=0.5), ClientConfig(local_steps=12, batch_size=1, lr=0.05))
    assert len(sizes) == res.steps == 12 and res.sample_rate == 0.25
    assert 0 in sizes and len(set(sizes)) > 1
    assert math.isfinite(res.loss) and all(torch.isfinite(v).all() for v in res.delta.values())
    assert res.history == [(0.5, 0.25, 12)]


def test_deterministic_given_seed_with_per_sample_augmentation():
    calls = []

    def flip(image, mask):
        calls.append(1)
        if torch.rand(()) < 0.5:  # torch's global RNG, seeded per (seed, round, client)
            return image.flip(-1), mask.flip(-1)
        return image, mask

    model, ds, dp = private("unet-tiny"), data(4), DPSGD(noise_multiplier=1.0, noise=SeededNoise(0))
    a = fit(model, ds, dp, augment=flip, seed=7)
    assert calls
    b = fit(model, ds, dp, augment=flip, seed=7)
    c = fit(model, ds, dp, augment=flip, seed=8)
    d = fit(model, ds, dp, augment=flip, seed=7, client_id=1)
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)
    assert not all(torch.equal(a.delta[k], c.delta[k]) for k in a.delta)
    assert not all(torch.equal(a.delta[k], d.delta[k]) for k in a.delta)


def test_without_noise_and_clipping_it_is_plain_sgd():
    """z = 0, a clip no gradient reaches, and q = 1 (B >= n): every step takes every sample and the
    DP gradient is the plain mean gradient, so fit_dp_sgd must reproduce Client.fit (momentum, weight
    decay and poly lr included)."""
    model, ds = private("unet-tiny"), data(4)
    cfg = ClientConfig(local_steps=3, batch_size=4, lr=0.05)
    res = fit(model, ds, DPSGD(noise_multiplier=0.0, max_grad_norm=1e6), cfg, round_idx=1, total_rounds=3)
    assert res.sample_rate == 1.0 and res.epsilon == math.inf
    client = Client(0, ds, cfg, loss_fn=CEDiceLoss(per_sample=True))
    delta, _ = client.fit(copy.deepcopy(model), trainable_state(model), 1, 3, make_fabric("cpu"), seed=0)
    assert norm(delta) > 0
    for k in delta:
        torch.testing.assert_close(res.delta[k], delta[k], rtol=1e-4, atol=1e-6, msg=k)


def test_noise_makes_the_update_larger():
    # seeded: the same Poisson batches in all three runs (a secure source draws them from the OS, and
    # a run whose batches happen to be empty has no signal to compare against)
    model, ds = private("unet-tiny"), data(4)
    quiet = fit(model, ds, DPSGD(noise_multiplier=0.0, max_grad_norm=1.0, noise=SeededNoise(0)))
    noisy = fit(model, ds, DPSGD(noise_multiplier=20.0, max_grad_norm=1.0, noise=SeededNoise(0)))
    assert norm(noisy.delta) > 5 * norm(quiet.delta)
    clipped = fit(model, ds, DPSGD(noise_multiplier=0.0, max_grad_norm=1e-4, noise=SeededNoise(0)))
    assert norm(clipped.delta) < norm(quiet.delta)


def test_target_epsilon_holds_over_the_planned_rounds():
    dp = DPSGD(target_epsilon=3.0, delta=1e-5)
    z = dp.resolve_noise_multiplier(0.25, 40)
    acc = RDPAccountant()
    acc.history = [(z, 0.25, 40)]
    assert 3.0 - 0.05 <= acc.get_epsilon(1e-5) <= 3.0

    model, ds = private("unet-tiny"), data(4)
    cfg = ClientConfig(local_steps=2, batch_size=1, lr=0.05)
    history = None
    for r in range(3):
        res = fit(model, ds, dp, cfg, round_idx=r, total_rounds=3, accountant_state=history)
        history = res.history
        assert res.noise_multiplier == dp.resolve_noise_multiplier(0.25, 6)
    assert history == [(res.noise_multiplier, 0.25, 6)]
    assert 3.0 - 0.05 <= res.epsilon <= 3.0
    assert res.epsilon == sample_level_epsilon(history, 1e-5)


def test_sample_level_epsilon_matches_the_oracle():
    assert sample_level_epsilon([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.32911, abs=1e-5)
    assert sample_level_epsilon([(1.5, 0.04, 1000), (1.5, 0.04, 1250)], 1e-5) == pytest.approx(7.32911, abs=1e-5)
    mixed = sample_level_epsilon([(1.5, 0.04, 1000), (3.0, 0.04, 1250)], 1e-5)
    assert sample_level_epsilon([(1.5, 0.04, 1000)], 1e-5) < mixed < 7.32911
    assert sample_level_epsilon([], 1e-5) == 0.0
    assert sample_level_epsilon([(0.0, 0.1, 1)], 1e-5) == math.inf
    with pytest.raises(ValueError, match="GDP"):
        sample_level_epsilon([(1.5, 0.04, 10), (2.0, 0.04, 10)], 1e-5, accountant="gdp")
    with pytest.raises(ValueError):
        sample_level_epsilon([(1.0, 1.5, 1)], 1e-5)


def test_models_that_are_not_dp_compatible_are_refused():
    torch.manual_seed(0)
    raw = build_model("unet-tiny")
    with pytest.raises(ValueError, match="make_private_compatible") as err:
        fit(raw, data(4), DPSGD(noise_multiplier=1.0))
    assert "BatchNorm" in str(err.value)
    compatible = make_private_compatible(raw)
    with pytest.raises(ValueError, match="BatchNorm statistics"):  # a global state of the raw model
        fit_dp_sgd(compatible, data(4), trainable_state(raw), ClientConfig(), DPSGD(noise_multiplier=1.0),
                   loss_fn=CEDiceLoss(), round_idx=0, total_rounds=1, seed=0)
    with pytest.raises(TypeError, match="per-sample"):
        fit(compatible, data(4), DPSGD(noise_multiplier=1.0), loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="round_idx"):
        fit(compatible, data(4), DPSGD(noise_multiplier=1.0), round_idx=2, total_rounds=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_grad_norm": 0.0, "noise_multiplier": 1.0},
        {"max_grad_norm": -1.0, "noise_multiplier": 1.0},
        {"max_grad_norm": math.inf, "noise_multiplier": 1.0},
        {},
        {"noise_multiplier": 1.0, "target_epsilon": 1.0},
        {"noise_multiplier": -0.1},
        {"target_epsilon": 0.0},
        {"noise_multiplier": 1.0, "delta": 0.0},
        {"noise_multiplier": 1.0, "delta": 1.0},
        {"noise_multiplier": 1.0, "accountant": "moments"},
    ],
)
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        DPSGD(**kwargs)


def test_resolve_noise_multiplier_validates_its_inputs():
    dp = DPSGD(target_epsilon=1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        dp.resolve_noise_multiplier(0.0, 10)
    with pytest.raises(ValueError, match="steps"):
        dp.resolve_noise_multiplier(0.1, 0)
    assert DPSGD(noise_multiplier=0.7).resolve_noise_multiplier(0.1, 10) == 0.7


def test_default_noise_is_secure_and_seeded_noise_replays():
    model, ds = private("unet-tiny"), data(4)
    dp = DPSGD(noise_multiplier=1.0)
    assert dp.noise.secure
    a, b = fit(model, ds, dp), fit(model, ds, dp)
    assert not all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)  # fresh ChaCha20 noise
    seeded = DPSGD(noise_multiplier=1.0, noise=SeededNoise(3))
    c, d = fit(model, ds, seeded), fit(model, ds, seeded)
    assert all(torch.equal(c.delta[k], d.delta[k]) for k in c.delta)


def test_noise_std_is_z_c_over_the_expected_batch():
    """One plain SGD step (no momentum or weight decay) with overwhelming noise: the update is
    -lr · (clipped sum + N(0, (zC)^2)) / (n·q), so its std is lr·z·C/(n·q)."""
    model, ds = private("unet-tiny"), data(8)
    z, c, lr = 1000.0, 0.5, 1e-3
    cfg = ClientConfig(local_steps=1, batch_size=4, lr=lr, momentum=0.0, weight_decay=0.0)
    res = fit(model, ds, DPSGD(noise_multiplier=z, max_grad_norm=c), cfg, total_rounds=1)
    values = torch.cat([v.reshape(-1) for v in res.delta.values()]).double()
    expected = lr * z * c / (8 * res.sample_rate)
    n = values.numel()
    assert abs(float(values.std()) / expected - 1) < 5 / math.sqrt(2 * n) + 1e-3
