"""Model registry and the U-Net baseline."""

import pytest
import torch

from privfl.models import build_model, list_models
from privfl.models.losses import CEDiceLoss, soft_dice_loss


@pytest.mark.parametrize("name", ["unet", "unet-tiny"])
def test_unet_shapes(name):
    model = build_model(name, num_classes=5).eval()
    out = model(torch.rand(2, 3, 32, 48))
    assert out.shape == (2, 5, 32, 48)


def test_registry_errors():
    assert {"unet", "unet-tiny"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("unet", num_classes=1)


def test_unet_rejects_sizes_it_cannot_take():
    with pytest.raises(ValueError, match="multiples of 4"):
        build_model("unet")(torch.rand(1, 3, 30, 32))


def test_dice_loss_is_zero_for_perfect_logits_and_high_for_wrong():
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, target) < 1e-3
    wrong = torch.nn.functional.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(wrong, target) > 0.99
    assert CEDiceLoss()(perfect, target) < 1e-3
