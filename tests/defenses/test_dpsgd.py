"""Sample-level DP-SGD: per-sample losses, opacus per-sample gradients, fit_dp_sgd, Poisson sampling from
the noise source, accounting in PrivacyAccountant, calibration."""

from __future__ import annotations

import copy
import json
import math

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_dhunet_model as tiny_dhunet
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import TensorDataset

from privfl.defenses.accounting import ACCOUNTANTS, PrivacyAccountant, calibrate
from privfl.defenses.dpsgd import (
    DPSGD,
    DPSGDResult,
    PoissonBatchSampler,
    dpsgd_event,
    fit_dp_sgd,
    poisson_loader,
    round_delta_floor,
)
from privfl.defenses.rng import SecureNoise, SeededNoise
from privfl.fl.client import Client, ClientConfig, trainable_state
from privfl.fl.device import make_fabric
from privfl.models import build_model
from privfl.models.dp_compat import make_private_compatible
from privfl.models.losses import CEDiceLoss, DHUNetLoss, per_sample_loss, soft_dice_loss

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning", "ignore:Optimal order is the:UserWarning"
)


def private(name: str, seed: int = 0, size: int = 32) -> nn.Module:
    if name == "dhunet-tiny":
        return make_private_compatible(tiny_dhunet(size, seed))
    torch.manual_seed(seed)
    return make_private_compatible(build_model(name))


def data(n: int, size: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.rand(n, 3, size, size, generator=g), torch.randint(0, 4, (n, size, size), generator=g)
    )


def norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def fit(model: nn.Module, ds, dp: DPSGD, cfg: ClientConfig | None = None, **kw) -> DPSGDResult:
    kw = {"loss_fn": CEDiceLoss(), "round_idx": 0, "total_rounds": 2, "seed": 0} | kw
    return fit_dp_sgd(
        model, ds, trainable_state(model), cfg or ClientConfig(local_steps=2, batch_size=2, lr=0.05), dp, **kw
    )


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
        out = (
            (logits, (logits * 0.5, logits.flip(-1), logits * 2)) if isinstance(loss, DHUNetLoss) else logits
        )

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
    loss = per_sample_loss(DHUNetLoss())(
        (empty, (empty, empty, empty)), torch.zeros(0, 8, 8, dtype=torch.long)
    )
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
            torch.testing.assert_close(
                p.grad_sample[i], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=n
            )
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
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    res = fit(model, data(4), dp, loss_fn=loss)
    assert res.delta.keys() == before.keys()
    assert not any(k.startswith("_module.") for k in res.delta)
    if name == "dhunet-tiny":
        assert any(k.endswith("ls.gamma") for k in res.delta)
        assert any(k.endswith("rel_pos.relative_position_bias_table") for k in res.delta)
    assert all(torch.isfinite(v).all() for v in res.delta.values()) and norm(res.delta) > 0
    assert res.steps == 2 and res.sample_rate == 2 / 4 and res.noise_multiplier == 1.0
    assert res.event == dpsgd_event(1.0, 0.5, 2)
    assert res.accountant_state["events"] == [
        {"mechanism": "gaussian", "noise_multiplier": 1.0, "sample_rate": 0.5, "count": 2}
    ]
    assert 0 < res.epsilon < math.inf and res.epsilon == res.epsilon_report.epsilon
    floor = round_delta_floor(dp.noise, model.parameters(), 2)
    assert res.delta_floor == pytest.approx(floor) and res.dp_delta == pytest.approx(1e-5 + floor)
    assert math.isfinite(res.loss)
    after = model.state_dict()  # the caller's model is neither trained nor left with opacus' hooks
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_sample_rate_is_what_opacus_samples_with():
    res = fit(
        private("unet-tiny"), data(5), DPSGD(noise_multiplier=1.0), ClientConfig(local_epochs=1, batch_size=2)
    )
    assert res.sample_rate == 1 / 3  # 1 / ceil(n / B), not B / n = 0.4
    assert res.steps == 3  # local_epochs · ceil(n / B), as Client.fit


def test_poisson_batches_vary_and_empty_batches_are_noised_and_counted():
    model = private("unet-tiny")
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))  # survives deepcopy
    res = fit(
        model, data(4), DPSGD(noise_multiplier=0.5), ClientConfig(local_steps=12, batch_size=1, lr=0.05)
    )
    assert len(sizes) == res.steps == 12 and res.sample_rate == 0.25
    assert 0 in sizes and len(set(sizes)) > 1
    assert math.isfinite(res.loss) and all(torch.isfinite(v).all() for v in res.delta.values())
    assert res.event == dpsgd_event(0.5, 0.25, 12)
    assert [e["count"] for e in res.accountant_state["events"]] == [12]


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
    z = dp.resolve_noise_multiplier(0.25, 6)
    assert z == calibrate(3.0, 1e-5, 6, 0.25)  # to the tightest accountant, the reported one
    model, ds = private("unet-tiny"), data(4)
    cfg = ClientConfig(local_steps=2, batch_size=1, lr=0.05)
    state = None
    for r in range(3):
        res = fit(model, ds, dp, cfg, round_idx=r, total_rounds=3, accountant_state=state)
        state = res.accountant_state
        assert res.noise_multiplier == z
    assert 0.99 * 3.0 <= res.epsilon <= 3.0
    acct = PrivacyAccountant(delta=1e-5)
    acct.record(dpsgd_event(z, 0.25, 6))
    assert res.epsilon == acct.epsilon().epsilon


def test_epsilon_is_the_privacy_accountants_over_the_rounds_recorded_events():
    """(a) ε over several rounds is PrivacyAccountant's for the same SelfComposed events; (b) each round's
    recorded event is (z, q, steps); the floating-point δ floor adds up over the rounds."""
    dp = DPSGD(noise_multiplier=1.3, noise=SeededNoise(0))
    model, ds = private("unet-tiny"), data(6)
    cfg = ClientConfig(local_steps=3, batch_size=2, lr=0.05)
    reference = PrivacyAccountant(delta=1e-5, accountants=ACCOUNTANTS)
    state, floors = None, 0.0
    for r in range(3):
        res = fit(model, ds, dp, cfg, round_idx=r, total_rounds=3, accountant_state=state)
        q = 1 / math.ceil(6 / 2)
        assert (res.noise_multiplier, res.sample_rate, res.steps) == (1.3, q, 3)
        assert res.event == dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.3)), 3
        )
        reference.record(res.event)
        floors += res.delta_floor
        state = res.accountant_state
        expected = reference.epsilon()
        assert res.epsilon == expected.epsilon and res.epsilon_report.by_accountant == expected.by_accountant
        assert res.epsilon_report.accountant == expected.accountant
        assert res.dp_delta == pytest.approx(1e-5 + floors, rel=1e-12)
    restored = dp.make_accountant(state)
    assert restored.steps == 9 and restored.events == reference.events
    assert restored.delta_floor == pytest.approx(floors) and floors > 0
    assert res.delta_floor == pytest.approx(round_delta_floor(dp.noise, model.parameters(), 3))
    assert json.loads(json.dumps(state)) == state  # checkpointable as JSON


def test_dpsgd_accountants_and_the_rdp_oracle():
    rdp = DPSGD(noise_multiplier=1.0, accountants="rdp")
    assert rdp.accountants == ("rdp",)
    acct = rdp.make_accountant()
    acct.record(dpsgd_event(1.5, 0.04, 1000))
    acct.record(dpsgd_event(1.5, 0.04, 1250))
    assert acct.epsilon().epsilon == pytest.approx(7.32911, abs=1e-5)  # opacus' RDP oracle
    acct.record(dpsgd_event(0.0, 0.1, 1))
    assert acct.epsilon().epsilon == math.inf
    assert DPSGD(noise_multiplier=1.0).accountants == ACCOUNTANTS
    with pytest.raises(ValueError):
        DPSGD(noise_multiplier=1.0).make_accountant({"events": []})  # not a state_dict


def test_models_that_are_not_dp_compatible_are_refused():
    torch.manual_seed(0)
    raw = build_model("unet-tiny")
    with pytest.raises(ValueError, match="make_private_compatible") as err:
        fit(raw, data(4), DPSGD(noise_multiplier=1.0))
    assert "BatchNorm" in str(err.value)
    compatible = make_private_compatible(raw)
    with pytest.raises(ValueError, match="BatchNorm statistics"):  # a global state of the raw model
        fit_dp_sgd(
            compatible,
            data(4),
            trainable_state(raw),
            ClientConfig(),
            DPSGD(noise_multiplier=1.0),
            loss_fn=CEDiceLoss(),
            round_idx=0,
            total_rounds=1,
            seed=0,
        )
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
        {"noise_multiplier": 1.0, "accountants": ("moments",)},
        {"noise_multiplier": 1.0, "accountants": ("gdp",)},
        {"noise_multiplier": 1.0, "accountants": ()},
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


# --- Poisson sampling from the noise source ---------------------------------------------------------


class _Spy:
    """A noise source that forwards to ``inner`` and records every bernoulli draw."""

    def __init__(self, inner):
        self.inner, self.draws = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def bernoulli(self, n, p, *, key=()):
        mask = self.inner.bernoulli(n, p, key=key)
        self.draws.append((n, p, key, mask.clone()))
        return mask


def test_secure_sampling_draws_every_batch_from_the_noise_source(monkeypatch):
    """(c) with SecureNoise, each step's batch is exactly the noise source's Bernoulli mask (ChaCha20);
    opacus' torch-generator sampler is never used."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    def refuse(*_a, **_k):
        raise AssertionError("opacus' UniformWithReplacementSampler used")

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", refuse)
    spy = _Spy(SecureNoise())
    assert spy.secure
    model = private("unet-tiny")
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    res = fit(
        model,
        data(8),
        DPSGD(noise_multiplier=1.0, noise=spy),
        ClientConfig(local_steps=6, batch_size=2, lr=0.05),
        round_idx=1,
        client_id=3,
    )
    assert res.steps == 6 and res.sample_rate == 0.25
    used = spy.draws[:6]  # scheduled_batches may draw one more batch before it stops
    assert [key for _, _, key, _ in used] == [("dpsgd-sampling", 1, 3, s) for s in range(6)]
    assert all(n == 8 and p == 0.25 for n, p, _, _ in used)
    assert sizes == [int(m.sum()) for *_, m in used]


def test_poisson_sampler_inclusion_rate_and_empty_batches():
    """(d) every index is included independently with probability q."""
    n, q, batches = 500, 0.1, 200
    for noise in (SecureNoise(), SeededNoise(0)):
        sampler = PoissonBatchSampler(n, q, noise, key=("test",), batches_per_pass=batches)
        counts = torch.zeros(n)
        sizes = []
        for idx in sampler:
            assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
            counts[idx] += 1
            sizes.append(len(idx))
        assert len(sizes) == batches == len(sampler) and sampler.drawn == batches
        rate = float(counts.sum()) / (n * batches)
        assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / (n * batches))
        assert len(set(sizes)) > 1
    tiny = PoissonBatchSampler(3, 0.05, SecureNoise(), batches_per_pass=200)
    assert [] in list(tiny)  # P(empty) = 0.95^3 per batch: empty batches happen and are yielded
    assert len(PoissonBatchSampler(10, 0.25, SecureNoise())) == 4
    with pytest.raises(ValueError):
        PoissonBatchSampler(0, 0.5, SecureNoise())
    with pytest.raises(ValueError):
        PoissonBatchSampler(5, 1.5, SecureNoise())


def test_seeded_sampling_is_deterministic_per_key_and_secure_sampling_is_not():
    """(e) SeededNoise: the same (seed, key) gives the same batches, in every pass; other keys differ."""

    def batches(noise, key, passes=2):
        sampler = PoissonBatchSampler(50, 0.2, noise, key=key)
        return [idx for _ in range(passes) for idx in sampler]

    a = batches(SeededNoise(0), ("dpsgd-sampling", 0, 0))
    assert a == batches(SeededNoise(0), ("dpsgd-sampling", 0, 0))
    assert a[:5] != a[5:]  # the step in the key runs on across passes
    assert a != batches(SeededNoise(1), ("dpsgd-sampling", 0, 0))
    assert a != batches(SeededNoise(0), ("dpsgd-sampling", 1, 0))
    assert a != batches(SeededNoise(0), ("dpsgd-sampling", 0, 1))
    secure = SecureNoise()
    assert batches(secure, ()) != batches(secure, ())


def test_poisson_loader_rate_and_empty_batches():
    ds = data(5)
    loader = poisson_loader(ds, 2, SeededNoise(0), key=("k",))
    assert len(loader) == 3 and loader.batch_sampler.sample_rate == 1 / 3
    loader = poisson_loader(ds, 1, SeededNoise(0), key=("k",))
    shapes = {tuple(images.shape[1:]) for _ in range(20) for images, _ in loader}
    assert shapes == {(3, 32, 32)}
    lonely = poisson_loader(data(1), 1, SeededNoise(0))
    lonely.batch_sampler.sample_rate = 1e-9  # every batch empty, the first included
    images, masks = next(iter(lonely))
    assert images.shape == (0, 3, 32, 32) and masks.shape == (0, 32, 32)
