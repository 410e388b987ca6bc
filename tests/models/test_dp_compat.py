"""make_private_compatible: opacus hooks-mode per-sample DP-SGD on DHU-Net and U-Net."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_dhunet_model
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privfl.models import build_model
from privfl.models.dhunet import TINY
from privfl.models.dp_compat import (
    DPConvNeXtBlock,
    DPSwinTransformerBlock,
    check_private_compatible,
    convert_layer_scale_,
    convert_window_attention_,
    make_private_compatible,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def sum_loss(output, target: torch.Tensor) -> torch.Tensor:
    """A loss that is a sum of per-sample terms: CE (sum) on the logits and on every deep map."""
    maps = [output] if isinstance(output, torch.Tensor) else [output[0], *output[1]]
    return sum(F.cross_entropy(m, target, reduction="sum") for m in maps)


def test_raw_models_are_reported_and_converted_ones_pass():
    raw = tiny_dhunet_model(64).train()
    errors = check_private_compatible(raw)
    joined = "\n".join(errors)
    assert "BatchNorm" in joined
    assert "per-window gradients" in joined  # Swin blocks, which opacus itself cannot detect
    assert "buffers" in joined  # WindowAttention's relative_position_index
    assert "ConvNeXtBlock" in joined  # bare layer-scale parameter next to submodules
    assert any("BatchNorm" in e for e in check_private_compatible(build_model("unet").train()))

    for model in (raw, build_model("unet").train()):
        private = make_private_compatible(model)
        assert private is not model
        assert check_private_compatible(private) == []
        ModuleValidator.validate(private, strict=True)
        assert GradSampleModule.validate(private, strict=True) == []
        assert private.training
        assert not any(isinstance(m, nn.BatchNorm2d) for m in private.modules())
        again = make_private_compatible(private)  # idempotent
        assert again.state_dict().keys() == private.state_dict().keys()
    assert any(isinstance(m, nn.BatchNorm2d) for m in raw.modules())  # the input is untouched


def test_group_norm_groups_divide_channels():
    odd = nn.Sequential(
        nn.Conv2d(3, 2, 1),
        nn.BatchNorm2d(2),
        nn.Conv2d(2, 6, 1),
        nn.BatchNorm2d(6),
        nn.Conv2d(6, 48, 1),
        nn.BatchNorm2d(48),
        nn.ReLU(inplace=True),
    )
    for model in (odd, tiny_dhunet_model(64), build_model("unet")):
        norms = [m for m in make_private_compatible(model).modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    groups = {
        m.num_channels: m.num_groups
        for m in make_private_compatible(odd).modules()
        if isinstance(m, nn.GroupNorm)
    }
    assert groups == {2: 2, 6: 2, 48: 16}
    assert not make_private_compatible(odd)[6].inplace  # in-place activations trip opacus' backward hooks


def test_layer_scale_and_window_conversion_keep_outputs_and_values():
    model = tiny_dhunet_model(64).eval()
    with torch.no_grad():  # O(1) layer scales (init is 1e-6, which would hide small deviations)
        for name, p in model.named_parameters():
            if name.endswith(".gamma") or name.endswith("relative_position_bias_table"):
                p.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        scaled = convert_layer_scale_(copy.deepcopy(model))
        assert torch.equal(scaled(x), reference)  # layer scale alone: bit-identical
        both = convert_window_attention_(scaled)
        torch.testing.assert_close(both(x), reference, rtol=1e-5, atol=1e-6)
    blocks = [m for m in both.modules() if isinstance(m, DPConvNeXtBlock)]
    swins = [m for m in both.modules() if isinstance(m, DPSwinTransformerBlock)]
    assert len(blocks) == sum(TINY.convnext_depths) and len(swins) == sum(TINY.swin_depths)
    sd, new = model.state_dict(), both.state_dict()
    torch.testing.assert_close(
        new["local_branch.stages.1.blocks.0.ls.gamma"], sd["local_branch.stages.1.blocks.0.gamma"]
    )
    key = "global_branch.layers.0.blocks.1.attn.relative_position_bias_table"
    torch.testing.assert_close(new[key.replace("attn.", "attn.rel_pos.")], sd[key])
    # copies and device/dtype moves keep working (the relative-position index is not a buffer)
    with torch.no_grad():
        torch.testing.assert_close(
            copy.deepcopy(both).double()(x.double()).float(), reference, rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("name", ["dhunet-tiny", "unet"])
def test_per_sample_gradients_are_exact(name):
    model = tiny_dhunet_model(64) if name == "dhunet-tiny" else build_model("unet")
    private = make_private_compatible(model).double().train()
    reference = copy.deepcopy(private)  # same weights, no hooks
    torch.manual_seed(1)
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 64, 64))

    gsm = GradSampleModule(private, loss_reduction="sum")
    sum_loss(gsm(x), y).backward()
    params = [(n, p) for n, p in private.named_parameters() if p.requires_grad]
    for n, p in params:
        assert p.grad_sample is not None and p.grad_sample.shape == (3, *p.shape), n
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-9, atol=1e-10, msg=n)

    ref_params = dict(reference.named_parameters())
    for i in (0, 2):
        reference.zero_grad()
        sum_loss(reference(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in params:
            g = ref_params[n].grad
            torch.testing.assert_close(
                p.grad_sample[i], g, rtol=1e-7, atol=1e-9 * (1 + g.abs().max().item()), msg=n
            )


def test_privacy_engine_trains_dhunet_tiny():
    torch.manual_seed(0)
    model = make_private_compatible(build_model("dhunet-tiny")).train()  # default config: stochastic depth on
    data = TensorDataset(torch.rand(8, 3, 64, 64), torch.randint(0, 4, (8, 64, 64)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus: "secure RNG turned off" (fine for a test)
        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = 0
    for images, masks in loader:
        optimizer.zero_grad()
        logits, deep = model(images)
        loss = F.cross_entropy(logits, masks) + sum(F.cross_entropy(d, masks) for d in deep)
        loss.backward()
        optimizer.step()
        steps += 1
    assert steps == 2
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert 0 < engine.get_epsilon(delta=1e-5) < float("inf")


def test_empty_batch_under_poisson_sampling():
    """Poisson sampling can draw an empty batch; timm's Swin cannot reshape one, the converted model can."""
    private = make_private_compatible(tiny_dhunet_model(64)).train()
    gsm = GradSampleModule(private)
    logits, deep = gsm(torch.rand(0, 3, 64, 64))
    assert logits.shape == (0, 4, 64, 64)
    (logits.sum() + sum(d.sum() for d in deep)).backward()
    assert all(p.grad_sample.shape == (0, *p.shape) for p in private.parameters())


def test_conv2d_grad_sampler_handles_channels_last_inputs():
    """opacus' own Conv2d grad sampler assumes contiguous activations; ConvNeXt feeds permuted ones."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1).double()
    x = torch.rand(2, 5, 5, 4, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last strides
    gsm = GradSampleModule(copy.deepcopy(conv), loss_reduction="sum")
    (gsm(x) ** 2).sum().backward()
    for i in range(2):
        conv.zero_grad()
        (conv(x[i : i + 1]) ** 2).sum().backward()
        torch.testing.assert_close(gsm._module.weight.grad_sample[i], conv.weight.grad)
