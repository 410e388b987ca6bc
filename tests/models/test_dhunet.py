"""DHU-Net architecture, outputs and loss."""

import pytest
import torch

from privfl.models import DHUNet, DHUNetLoss, build_model, default_loss
from privfl.models.losses import CEDiceLoss


@pytest.fixture(scope="module")
def paper_model():
    return build_model("dhunet", num_classes=4)


def test_paper_model_size_and_output_shape(paper_model):
    n = sum(p.numel() for p in paper_model.parameters())
    assert abs(n - 55.4e6) / 55.4e6 < 0.01, n
    with torch.no_grad():
        out = paper_model.eval()(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 4, 224, 224)


def test_branches_give_four_maps_at_the_paper_widths(paper_model):
    with torch.no_grad():
        g, loc = paper_model.encode(torch.rand(1, 3, 224, 224))
    expected = [(96, 56), (192, 28), (384, 14), (768, 7)]
    assert [(m.shape[1], m.shape[2]) for m in g] == expected
    assert [(m.shape[1], m.shape[2]) for m in loc] == expected


def test_tiny_train_and_eval_outputs():
    model = build_model("dhunet-tiny", num_classes=3)
    assert sum(p.numel() for p in model.parameters()) <= 2_000_000
    x = torch.rand(2, 3, 64, 64)
    logits, deep = model.train()(x)
    assert logits.shape == (2, 3, 64, 64)
    assert len(deep) == 3 and all(d.shape == (2, 3, 64, 64) for d in deep)
    assert model.eval()(x).shape == (2, 3, 64, 64)


def test_sizes_the_architecture_cannot_take_raise():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("dhunet-tiny", img_size=48)
    with pytest.raises(ValueError, match=r"built for \(B, 3, 64, 64\)"):
        build_model("dhunet-tiny").eval()(torch.rand(1, 3, 96, 96))


def test_fusion_uses_both_branches():
    """Zeroing one branch's maps changes the output: GLFusion adds global and local features."""
    model = build_model("dhunet-tiny").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        g, loc = model.encode(x)
        d16 = model.fuse4(g[3], torch.zeros_like(loc[3]))
        d8 = model.fuse3(g[2], torch.zeros_like(loc[2]), d16)
        d4 = model.fuse2(g[1], torch.zeros_like(loc[1]), d8)
        no_local = model.head(model.fuse1(g[0], torch.zeros_like(loc[0]), d4))
    assert not torch.allclose(ref, no_local)


def test_dhunet_loss_combines_outputs_with_paper_weights():
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 16, 16))
    final, d1, d2, d3 = (torch.randn(2, 4, 16, 16) for _ in range(4))
    per = CEDiceLoss()
    expected = (
        0.5 * per(final, target) + 0.3 * per(d1, target) + 0.2 * (per(d2, target) + per(d3, target)) / 2
    )
    assert torch.allclose(DHUNetLoss()((final, (d1, d2, d3)), target), expected)
    assert torch.allclose(DHUNetLoss()(final, target), per(final, target))


def test_default_loss_follows_the_model():
    assert isinstance(default_loss(build_model("dhunet-tiny")), DHUNetLoss)
    assert isinstance(default_loss(build_model("unet")), CEDiceLoss)
    assert isinstance(build_model("dhunet-tiny"), DHUNet)
