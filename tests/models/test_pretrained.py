"""load_pretrained: local Swin-T / ConvNeXt-T checkpoints (timm and official layouts) into DHU-Net."""

import re

import pytest
import timm
import torch

import privfl.models.dhunet  # noqa: F401 - registers 'dhunet' / 'dhunet-tiny'
from privfl.models import build_model
from privfl.models.pretrained import load_pretrained, select_blocks


def official_swin(sd: dict) -> dict:
    """timm Swin keys -> the Microsoft layout: patch merging at the end of the previous stage, plain
    ``head``, plus the buffers the official checkpoints carry."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
        if k.endswith("attn.relative_position_bias_table"):
            out[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
                49, 49, dtype=torch.long
            )
            out[k.replace("attn.relative_position_bias_table", "attn_mask")] = torch.zeros(64, 49, 49)
    return out


def official_convnext(sd: dict) -> dict:
    """timm ConvNeXt keys -> the Meta layout (downsample_layers, stages.N.M, dwconv/pwconv, norm, head)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"^stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = (
            k.replace("conv_dw", "dwconv")
            .replace("mlp.fc", "pwconv")
            .replace("head.norm.", "norm.")
            .replace("head.fc.", "head.")
        )
        out[k] = v
    return out


def imagenet_models(seed: int) -> dict[str, dict]:
    torch.manual_seed(seed)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)  # depths 2,2,6,2
    convnext = timm.create_model("convnext_tiny", pretrained=False)  # depths 3,3,9,3
    return {"swin": swin.state_dict(), "convnext": convnext.state_dict()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrained")
    timm_src, official_src = imagenet_models(0), imagenet_models(1)  # different weights: no accidental passes
    torch.save(timm_src["swin"], d / "swin_timm.pth")
    torch.save({"state_dict": timm_src["convnext"], "epoch": 300}, d / "convnext_timm.pth")
    both = {
        "swin": official_swin(official_src["swin"]),
        "convnext": official_convnext(official_src["convnext"]),
    }
    torch.save({"model": both, "optimizer": {"state": {}, "param_groups": []}}, d / "official.pth")
    return {"dir": d, "timm": timm_src, "official": official_src}


def source_key(key: str) -> tuple[str, str]:
    """The ImageNet (timm-named) tensor a DHUNet branch key should hold: stage 2 block i <- block 3i."""
    branch, rest = key.split(".", 1)
    kind = "swin" if branch == "global_branch" else "convnext"
    stage_block = r"^(layers|stages)\.2\.blocks\.(\d+)\."
    return kind, re.sub(stage_block, lambda m: f"{m.group(1)}.2.blocks.{3 * int(m.group(2))}.", rest)


def assert_branches_hold(model, src: dict[str, dict], report, kinds=("swin", "convnext")):
    sd = model.state_dict()
    prefixes = tuple({"swin": "global_branch.", "convnext": "local_branch."}[k] for k in kinds)
    branch_keys = {k for k in sd if k.startswith(prefixes)}
    assert set(report.loaded) == branch_keys
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    for key in branch_keys:
        kind, skey = source_key(key)
        assert torch.equal(sd[key], src[kind][skey]), key


def test_timm_checkpoints_load_with_every_third_block(ckpt):
    model = build_model("dhunet")
    decoder_before = model.fuse4.conv[0].weight.detach().clone()
    report = load_pretrained(
        model, swin_path=ckpt["dir"] / "swin_timm.pth", convnext_path=ckpt["dir"] / "convnext_timm.pth"
    )
    src = ckpt["timm"]
    assert_branches_hold(model, src, report)
    # the shortened third stages: ours i <- theirs 3i, shifted/regular Swin windows kept in step
    assert report.blocks["swin"][2] == [0, 3] and report.blocks["convnext"][2] == [0, 3, 6]
    assert torch.equal(
        model.global_branch.layers[2].blocks[1].attn.qkv.weight,
        src["swin"]["layers.2.blocks.3.attn.qkv.weight"],
    )
    assert model.global_branch.layers[2].blocks[1].shift_size == (3, 3)
    assert torch.equal(
        model.local_branch.stages[2].blocks[2].gamma, src["convnext"]["stages.2.blocks.6.gamma"]
    )
    skipped = set(report.skipped)
    assert {
        "global_branch.norm.weight",
        "global_branch.head.fc.weight",
        "local_branch.head.norm.weight",
        "local_branch.head.fc.bias",
        "global_branch.layers.2.blocks.5.mlp.fc2.weight",
        "local_branch.stages.2.blocks.8.conv_dw.weight",
    } <= skipped
    assert torch.equal(model.fuse4.conv[0].weight, decoder_before)  # only the encoders change


def test_official_layouts_load_from_one_file(ckpt):
    model = build_model("dhunet")
    report = load_pretrained(model, ckpt["dir"] / "official.pth")
    src = ckpt["official"]  # the timm-named originals of the converted official tensors
    assert_branches_hold(model, src, report)
    assert torch.equal(
        model.global_branch.layers[1].downsample.reduction.weight,
        official_swin(src["swin"])["layers.0.downsample.reduction.weight"],
    )  # end of stage 0 -> start of 1
    assert torch.equal(
        model.local_branch.stages[1].downsample[1].weight,
        official_convnext(src["convnext"])["downsample_layers.1.1.weight"],
    )
    assert "global_branch.layers.0.blocks.1.attn_mask" in report.skipped


def test_single_checkpoint_is_told_apart_by_its_keys(ckpt):
    model = build_model("dhunet")
    swin_before = model.global_branch.patch_embed.proj.weight.detach().clone()
    report = load_pretrained(model, ckpt["dir"] / "convnext_timm.pth")
    assert_branches_hold(model, ckpt["timm"], report, kinds=("convnext",))
    assert torch.equal(model.global_branch.patch_embed.proj.weight, swin_before)


def test_dhunet_checkpoint_round_trip_also_into_a_dp_model(tmp_path):
    from privfl.models.dp_compat import make_private_compatible

    source = build_model("dhunet-tiny")
    torch.save(source.state_dict(), tmp_path / "tiny.pth")  # one flat dict, branch prefixes, decoder too
    target = make_private_compatible(build_model("dhunet-tiny"))  # layer scale / bias tables renamed
    report = load_pretrained(target, tmp_path / "tiny.pth", strict=True)
    assert report.missing == [] and report.mismatched == [] and report.unexpected == []
    got = target.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith(("global_branch.", "local_branch.")):
            key = key.replace(".gamma", ".ls.gamma").replace(
                "attn.relative_position_bias_table", "attn.rel_pos.relative_position_bias_table"
            )
            assert torch.equal(got[key], value), key


def test_width_and_window_mismatches_are_reported_and_strict_raises(ckpt):
    model = build_model("dhunet-tiny")  # C=16, window 4: nothing from Swin-T / ConvNeXt-T fits
    paths = {"swin_path": ckpt["dir"] / "swin_timm.pth", "convnext_path": ckpt["dir"] / "convnext_timm.pth"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained(model, **paths, strict=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # strict: nothing loaded

    report = load_pretrained(model, **paths)
    mismatched = {k: (a, b) for k, a, b in report.mismatched}
    assert mismatched["local_branch.stem.0.weight"] == ((96, 3, 4, 4), (16, 3, 4, 4))
    table = "global_branch.layers.0.blocks.0.attn.relative_position_bias_table"
    assert mismatched[table] == ((169, 3), (49, 1))
    assert report.blocks["convnext"][2] == [0, 4]  # 9 -> 2 blocks: step 4
    assert report.loaded == [] and report.missing == []


def test_errors(ckpt, tmp_path):
    model = build_model("dhunet-tiny")
    missing = tmp_path / "nope" / "swin.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_pretrained(model, swin_path=missing)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        load_pretrained(model)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither Swin nor ConvNeXt"):
        load_pretrained(model, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no swin weights"):
        load_pretrained(model, swin_path=ckpt["dir"] / "convnext_timm.pth")


def test_select_blocks():
    assert select_blocks(6, 2) == [0, 3]
    assert select_blocks(9, 3) == [0, 3, 6]
    assert select_blocks(9, 2) == [0, 4]
    assert select_blocks(2, 2) == [0, 1]
    assert select_blocks(1, 3) == [0]
    assert select_blocks(4, 2) == [0, 2]
    assert select_blocks(4, 2, alternate=True) == [0, 3]  # Swin: block 1 is shifted, so is block 3
    assert select_blocks(5, 2, alternate=True) == [0, 3]
    assert select_blocks(18, 2, alternate=True) == [0, 9]
