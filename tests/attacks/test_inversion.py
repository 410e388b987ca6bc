"""Inverting Gradients (privfl.attacks.inversion) and its benchmark (``python -m privfl.bench inversion``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from privfl.attacks.inversion import InvertingGradients, observe_update, recover_labels
from privfl.attacks.metrics import mean_psnr
from privfl.data.synthetic import SyntheticHistology
from privfl.experiments.inversion import dp_protect, fixed_case
from privfl.models import CEDiceLoss, DHUNetLoss, build_model
from privfl.models.losses import soft_segmentation_loss
from privfl.updates import InvalidUpdateError, global_l2_norm

pytestmark = pytest.mark.filterwarnings("ignore:.*not cryptographically secure")

# The acceptance case: a UNet with a 48-channel first level (the default (16, 32, 64) UNet is much
# harder to invert: its few full-resolution channels give too few equations per pixel), BatchNorm
# statistics estimated on other synthetic patches, one 64x64 patch, masks known to the attacker.
WIDTHS = (48, 64)
ITERATIONS = 300
TV, LR = 1.0, 0.05


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The attack is many small ops (a double backward per iteration): on a shared 2-core machine
    one thread is several times faster than oversubscribed ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("unet-tiny").eval()
    image, mask = SyntheticHistology(2, size=32, seed=3)[0]
    return model, image[None], mask[None]


def _attack(model, **kw) -> InvertingGradients:
    kw = {"iterations": 3, "progress": False, **kw}
    return InvertingGradients(model, **kw)


# ---------------------------------------------------------------------------------------------
# acceptance: undefended single image recovered, DP noise destroys it
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_undefended_update_is_inverted_and_dp_blocks_it():
    model, image, mask = fixed_case("unet", widths=WIDTHS)
    update = observe_update(model, image, mask)  # one image, one gradient
    attack = InvertingGradients(model, iterations=ITERATIONS, tv=TV, lr=LR, progress=False, seed=0)
    clear = attack.reconstruct(update, tuple(image.shape), mask)
    noised = attack.reconstruct(dp_protect(update, noise_multiplier=0.5), tuple(image.shape), mask)
    p_clear, p_dp = mean_psnr(clear.images, image), mean_psnr(noised.images, image)
    assert p_clear >= 20.0, p_clear
    assert p_dp <= p_clear - 8.0, (p_clear, p_dp)
    assert clear.images.shape == image.shape and 0 <= clear.images.min() and clear.images.max() <= 1
    assert torch.equal(clear.masks, mask)
    assert len(clear.history) == ITERATIONS and clear.loss < clear.history[0]
    assert clear.iterations_per_second > 0


def test_dp_protect_clips_then_noises():
    model, image, mask = fixed_case("unet-tiny", size=32, calibrate=4)
    update = observe_update(model, image, mask)
    noised = dp_protect(update, noise_multiplier=0.5, clip=1e-3)
    assert set(noised) == set(update)
    norm = global_l2_norm(update)
    assert norm > 1e-3
    noise = torch.cat([(noised[k] - update[k] * (1e-3 / norm)).flatten() for k in update])
    assert noise.std() == pytest.approx(0.5e-3, rel=0.1)  # N(0, (z C)^2) on the clipped update
    assert dp_protect(update, 0.5, seed=1)["head.bias"].sub(update["head.bias"]).abs().max() > 0


# ---------------------------------------------------------------------------------------------
# fedavg mode: through E local SGD steps
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fedavg_two_local_steps_reconstructs_better_than_random_init():
    model, image, mask = fixed_case("unet", widths=WIDTHS)
    update = observe_update(model, image, mask, mode="fedavg", local_steps=2, local_lr=0.01)
    attack = InvertingGradients(
        model, mode="fedavg", local_steps=2, local_lr=0.01, iterations=100, tv=TV, lr=LR, progress=False
    )
    result = attack.reconstruct(update, tuple(image.shape), mask)
    start = torch.rand(image.shape, generator=torch.Generator().manual_seed(0))
    assert mean_psnr(result.images, image) >= mean_psnr(start, image) + 4.0  # measured: 12.1 vs 6.9 dB


def test_fedavg_one_step_is_minus_lr_times_the_gradient(tiny):
    model, image, mask = tiny
    grad = observe_update(model, image, mask)
    delta = observe_update(model, image, mask, mode="fedavg", local_steps=1, local_lr=0.05)
    assert set(grad) == set(delta) == {k for k, _ in model.named_parameters()}
    for k in grad:
        torch.testing.assert_close(delta[k], -0.05 * grad[k], rtol=1e-4, atol=1e-7)


def test_fedavg_simulation_matches_privfl_client(tiny):
    """The update privfl's Client sends (train-mode BatchNorm, momentum, weight decay, 2 steps) is
    what the attacker's model of it produces, and the attack takes it as it is (buffers included)."""
    from privfl.fl.client import Client, ClientConfig, trainable_state
    from privfl.fl.device import make_fabric

    model, image, mask = tiny
    global_state = trainable_state(model)
    cfg = ClientConfig(local_steps=2, batch_size=1, lr=0.01, momentum=0.9, weight_decay=1e-4)
    data = torch.utils.data.TensorDataset(image, mask)
    trained = copy.deepcopy(model)
    delta, _ = Client(0, data, cfg).fit(trained, global_state, 0, 10_000, make_fabric("cpu"), seed=0)
    assert any(k.endswith("running_mean") for k in delta)  # the client sends BatchNorm statistics too

    simulated = observe_update(
        model,
        image,
        mask,
        mode="fedavg",
        local_steps=2,
        local_lr=0.01,
        local_momentum=0.9,
        weight_decay=1e-4,
        batchnorm="train",
    )
    for k in simulated:
        torch.testing.assert_close(simulated[k], delta[k], rtol=2e-3, atol=1e-7)

    attack = _attack(
        model,
        mode="fedavg",
        local_steps=2,
        local_lr=0.01,
        local_momentum=0.9,
        weight_decay=1e-4,
        batchnorm="train",
    )
    assert attack.attacked_keys(delta) == list(simulated)  # buffers accepted and ignored
    result = attack.reconstruct(delta, tuple(image.shape), mask)
    assert result.images.shape == image.shape
    # the model is untouched: weights, buffers and training flags
    for k, v in trainable_state(model).items():
        assert torch.equal(v, global_state[k])
    assert not any(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------
# what the attack accepts
# ---------------------------------------------------------------------------------------------


def test_partial_update_uses_only_its_keys(tiny):
    model, image, mask = tiny
    update = observe_update(model, image, mask)
    shared = {k: v for k, v in update.items() if k.startswith("down.")}
    attack = _attack(model)
    assert attack.attacked_keys(shared) == [k for k, _ in model.named_parameters() if k.startswith("down.")]
    result = attack.reconstruct(shared, tuple(image.shape), mask)
    assert result.images.shape == image.shape and len(result.history) == 3


def test_unknown_keys_and_shapes_are_refused(tiny):
    model, image, mask = tiny
    update = observe_update(model, image, mask)
    attack = _attack(model)
    with pytest.raises(InvalidUpdateError, match="not entries of this UNet.*'encoder.weight'"):
        attack.reconstruct({**update, "encoder.weight": torch.zeros(3)}, tuple(image.shape), mask)
    with pytest.raises(InvalidUpdateError, match=r"update\['head.weight'\] has shape \(4, 8\)"):
        attack.reconstruct({**update, "head.weight": torch.zeros(4, 8)}, tuple(image.shape), mask)
    buffers = {k: v.float() for k, v in model.state_dict().items() if "running" in k}
    with pytest.raises(InvalidUpdateError, match="no parameter"):
        attack.reconstruct(buffers, tuple(image.shape), mask)
    with pytest.raises(InvalidUpdateError, match="zero on every"):
        attack.reconstruct({k: torch.zeros_like(v) for k, v in update.items()}, tuple(image.shape), mask)
    with pytest.raises(InvalidUpdateError, match="non-finite"):
        attack.reconstruct({**update, "head.bias": torch.full((4,), float("nan"))}, tuple(image.shape), mask)
    with pytest.raises(InvalidUpdateError, match="non-empty dict"):
        attack.reconstruct({}, tuple(image.shape), mask)


def test_image_shapes_the_model_does_not_accept(tiny):
    model, image, mask = tiny
    update = observe_update(model, image, mask)
    with pytest.raises(ValueError, match="does not accept images of shape.*multiples of 2"):
        _attack(model).reconstruct(update, (1, 3, 33, 33), torch.zeros(1, 33, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        _attack(model).reconstruct(update, (3, 32, 32), mask)
    dhunet = build_model("dhunet-tiny").eval()  # built for 64x64
    du = {k: torch.ones_like(p) for k, p in dhunet.named_parameters()}
    with pytest.raises(ValueError, match="does not accept images.*img_size"):
        _attack(dhunet).reconstruct(du, (1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.long))


def test_masks_and_labels_must_match_the_batch(tiny):
    model, image, mask = tiny
    update = observe_update(model, image, mask)
    attack = _attack(model)
    with pytest.raises(
        ValueError, match=r"masks must have shape \(1, 32, 32\) \(batch size 1\), got \(2, 32, 32\)"
    ):
        attack.reconstruct(update, tuple(image.shape), mask.repeat(2, 1, 1))
    with pytest.raises(ValueError, match="masks='known' needs the masks"):
        attack.reconstruct(update, tuple(image.shape))
    with pytest.raises(ValueError, match=r"masks must be in 0\.\.3"):
        attack.reconstruct(update, tuple(image.shape), mask + 4)
    with pytest.raises(TypeError, match="integer class indices"):
        attack.reconstruct(update, tuple(image.shape), mask.float())
    net = _classifier()
    upd = {k: torch.ones_like(p) for k, p in net.named_parameters()}
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        _attack(net, task="classification").reconstruct(upd, (2, 3, 8, 8), labels=torch.tensor([1, 2, 3]))


def test_invalid_settings_are_refused(tiny):
    model, _, _ = tiny
    for kw, msg in [
        ({"mode": "fedsgd"}, "mode must be one of"),
        ({"masks": "guess"}, "masks must be one of"),
        ({"local_steps": 0}, "local_steps"),
        ({"iterations": 0}, "iterations"),
        ({"tv": -1.0}, "tv must be"),
        ({"batchnorm": "frozen"}, "batchnorm must be"),
        ({"loss": "dice"}, "loss must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            InvertingGradients(model, **kw)
    with pytest.raises(TypeError, match="soft-target form"):
        InvertingGradients(model, masks="joint", loss=nn.CrossEntropyLoss())


def test_same_seed_same_reconstruction(tiny):
    model, image, mask = tiny
    update = observe_update(model, image, mask)
    a = _attack(model, seed=7, restarts=2).reconstruct(update, tuple(image.shape), mask)
    b = _attack(model, seed=7, restarts=2).reconstruct(update, tuple(image.shape), mask)
    assert torch.equal(a.images, b.images) and a.loss == b.loss
    assert len(a.restart_losses) == 2 and a.loss == min(a.restart_losses)
    assert a.iterations == 6


def test_progress_bar_shows_the_loss(tiny, capsys):
    model, image, mask = tiny
    update = observe_update(model, image, mask)
    _attack(model, progress=True).reconstruct(update, tuple(image.shape), mask)
    err = capsys.readouterr().err
    assert "inversion restart 1/1" in err and "loss" in err


# ---------------------------------------------------------------------------------------------
# jointly optimised masks, DHU-Net, classification
# ---------------------------------------------------------------------------------------------


def test_soft_losses_equal_the_training_losses_on_one_hot_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16)
    deep = tuple(torch.randn(2, 4, 16, 16) for _ in range(3))
    target = torch.randint(0, 4, (2, 16, 16))
    onehot = nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
    for loss in (
        CEDiceLoss(),
        CEDiceLoss(0.3, 0.7, per_sample=True),
        DHUNetLoss(),
        DHUNetLoss(per_sample=True),
    ):
        out = (logits, deep) if isinstance(loss, DHUNetLoss) else logits
        torch.testing.assert_close(soft_segmentation_loss(loss)(out, onehot), loss(out, target))


def test_joint_masks_are_optimised(tiny):
    model, image, mask = tiny
    update = observe_update(model, image, mask)
    result = _attack(model, masks="joint", iterations=5).reconstruct(update, tuple(image.shape))
    assert result.masks.shape == mask.shape and result.masks.dtype == torch.long
    assert 0 <= int(result.masks.min()) and int(result.masks.max()) <= 3
    assert result.loss < result.history[0]


@pytest.mark.parametrize("loss", ["default", "final"])
def test_dhunet_training_output_and_loss(loss):
    torch.manual_seed(0)
    model = build_model("dhunet-tiny", img_size=32).eval()
    image, mask = SyntheticHistology(1, size=32, seed=0)[0]
    image, mask = image[None], mask[None]
    update = observe_update(model, image, mask, loss=loss)
    deep_head = update["deep_heads.0.weight"]
    assert bool(deep_head.any()) == (loss == "default")  # deep supervision only in the default loss
    result = _attack(model, loss=loss, iterations=4).reconstruct(update, tuple(image.shape), mask)
    assert result.images.shape == image.shape
    assert result.loss < result.history[0]
    assert not model.training and not any(m.training for m in model.modules())


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def test_idlg_recovers_the_label_of_one_image():
    net = _classifier()
    image = torch.rand(1, 3, 8, 8)
    for label in (0, 3, 9):
        y = torch.tensor([label])
        grad = observe_update(net, image, labels=y, task="classification")
        assert recover_labels(grad["6.bias"]).tolist() == [label]
        assert recover_labels(grad["6.weight"]).tolist() == [label]
        delta = observe_update(net, image, labels=y, task="classification", mode="fedavg", local_lr=0.1)
        assert recover_labels(delta["6.bias"], is_delta=True).tolist() == [label]
        attack = _attack(net, task="classification", mode="fedavg", local_lr=0.1)
        result = attack.reconstruct(delta, (1, 3, 8, 8))  # labels recovered from the head
        assert result.labels.tolist() == [label] and result.masks is None


def test_idlg_batch_heuristic_finds_distinct_labels():
    net = _classifier()
    labels = torch.tensor([2, 5, 7])
    grad = observe_update(net, torch.rand(3, 3, 8, 8), labels=labels, task="classification")
    assert sorted(recover_labels(grad["6.bias"], batch_size=3).tolist()) == [2, 5, 7]
    with pytest.raises(ValueError, match="bias"):
        recover_labels(torch.zeros(2, 2, 2))


# ---------------------------------------------------------------------------------------------
# device and benchmark
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_models_device():
    model, image, mask = fixed_case("unet", size=32, calibrate=4, device="cuda")
    update = observe_update(model, image, mask)
    assert all(v.device.type == "cpu" for v in update.values())
    result = _attack(model).reconstruct(update, tuple(image.shape), mask)
    assert result.images.device.type == "cpu" and result.images.shape == image.shape


def test_benchmark_subcommand(tmp_path, capsys):
    from privfl.bench.__main__ import main

    assert (
        main(
            [
                "inversion",
                "--json",
                "--model",
                "unet-tiny",
                "--size",
                "32",
                "--iterations",
                "3",
                "--calibrate",
                "4",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert set(record["result"]) == {"none", "dp"}
    for row in record["result"].values():
        assert row["iterations"] == 3 and row["iterations_per_second"] > 0 and "psnr_db" in row
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "inversion.json").exists()
