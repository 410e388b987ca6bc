"""Load local ImageNet checkpoints of Swin-T and ConvNeXt-T into DHU-Net's two encoder branches.

Nothing is downloaded: :func:`load_pretrained` reads files you already have, for example the official
``swin_tiny_patch4_window7_224.pth`` (Microsoft) and ``convnext_tiny_1k_224_ema.pth`` (Meta), or
state dicts saved from timm models. Both key layouts are accepted:

- **timm** names (``layers.N.blocks.M…`` with the Swin patch merging at the *start* of stage N as
  ``layers.N.downsample``; ``stem``, ``stages.N.downsample``, ``stages.N.blocks.M.{conv_dw,mlp.fc1,…}``);
- **official** names (Swin ``layers.N.downsample`` at the *end* of stage N, ``head``, ``norm``;
  ConvNeXt ``downsample_layers.N.{0,1}``, ``stages.N.M.{dwconv,norm,pwconv1,pwconv2,gamma}``,
  ``norm``, ``head``), converted with timm's own ``checkpoint_filter_fn`` of each model.

Checkpoints may wrap the weights in ``"model"`` / ``"state_dict"`` (and DDP ``module.`` prefixes).

**Shortened stages.** DHU-Net uses fewer blocks than the ImageNet models (Swin 2,2,2,2 instead of
2,2,6,2; ConvNeXt 3,3,3,3 instead of 3,3,9,3). A stage with ``n_src`` checkpoint blocks loaded into
``n_dst < n_src`` model blocks takes the blocks ``range(0, n_src, n_src // n_dst)[:n_dst]``: every
third block of Swin-T's and ConvNeXt-T's third stage (0, 3 and 0, 3, 6), as the DHUnet reference
does. Swin blocks alternate regular (even index) and shifted (odd index) windows, so for Swin a
picked block whose parity differs from its destination is replaced by its right-hand neighbour
(its left-hand one at the end of the stage); for Swin-T → DHU-Net (0, 3) nothing changes. With
``n_src <= n_dst`` the first ``n_src`` blocks load and the rest stay ``missing``.

Buffers that are recomputed (``relative_position_index``, ``attn_mask``), classifier heads and the
final norm (DHU-Net has none) are skipped, not reported as unexpected. Tensors whose shape differs
(another width, window size or patch size) are reported in ``mismatched`` and left untouched; pass
``strict=True`` to raise instead. Load pretrained weights *before*
:func:`privfl.models.dp_compat.make_private_compatible`; loading into a converted model also works
(its renamed layer-scale and relative-position parameters are recognised).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from privfl.models.dhunet import DHUNet

__all__ = ["PretrainedReport", "load_pretrained", "select_blocks"]

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
PathLike = str | Path

# Per branch: (DHUNet attribute, regex of a block key in timm naming, whether blocks alternate shifts).
_BRANCHES = {
    "swin": ("global_branch", re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$"), True),
    "convnext": ("local_branch", re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$"), False),
}
_SWIN_PREFIXES = ("layers.", "patch_embed.", "absolute_pos_embed")
_CONVNEXT_PREFIXES = ("stem.", "stages.", "downsample_layers.", "norm_pre.")
_HEAD_PREFIXES = ("head.", "norm.", "fc_norm.")  # classifier and final norm (both models)
_RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")
# timm key suffix -> where privfl.models.dp_compat.make_private_compatible moves that parameter.
_DP_ALIASES = (
    (".gamma", ".ls.gamma"),
    (".attn.relative_position_bias_table", ".attn.rel_pos.relative_position_bias_table"),
)


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did. All names are DHUNet ``state_dict`` keys
    (``global_branch.…`` / ``local_branch.…``); checkpoint-side names are the checkpoint key in timm
    naming (after the official → timm conversion) under the branch prefix, in the checkpoint's own
    block numbering."""

    loaded: list[str] = field(default_factory=list)
    """Model keys filled from the checkpoint."""
    missing: list[str] = field(default_factory=list)
    """Keys of a branch that a checkpoint was given for but that received nothing (not counting
    ``mismatched`` ones)."""
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint tensors that match no model key (after skipping heads, final norms, recomputed
    buffers and the blocks left out of shortened stages)."""
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    """``(model key, checkpoint shape, model shape)`` of tensors left untouched."""
    skipped: list[str] = field(default_factory=list)
    """Checkpoint tensors deliberately not used: classifier heads, final norms, recomputed buffers
    and the blocks dropped from shortened stages."""
    blocks: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    """Per branch (``"swin"``/``"convnext"``) and stage: the checkpoint block loaded into each model block."""

    def summary(self) -> str:
        """One line: how many tensors were loaded, missing, shape-mismatched, unexpected and skipped."""
        return (
            f"pretrained: {len(self.loaded)} tensors loaded, {len(self.missing)} missing, "
            f"{len(self.mismatched)} shape-mismatched, {len(self.unexpected)} unexpected, "
            f"{len(self.skipped)} skipped (heads, final norms, buffers, dropped blocks)"
        )


def select_blocks(n_src: int, n_dst: int, *, alternate: bool = False) -> list[int]:
    """Checkpoint block indices loaded into ``n_dst`` model blocks of a stage that has ``n_src``.

    ``range(0, n_src, n_src // n_dst)[:n_dst]`` when the checkpoint has more blocks (6 → 2 gives
    0, 3; 9 → 3 gives 0, 3, 6), else the first ``n_src``. ``alternate=True`` (Swin) keeps each picked
    block's shift parity equal to its destination's, moving a mismatched pick one block right (left
    at the end of the stage); the step is then at least 2, so picks stay distinct and ordered.
    """
    if n_src <= n_dst:
        return list(range(n_src))
    idx = list(range(0, n_src, n_src // n_dst))[:n_dst]
    if alternate:
        idx = [i if i % 2 == j % 2 else (i + 1 if i + 1 < n_src else i - 1) for j, i in enumerate(idx)]
    return idx


def load_pretrained(
    model: DHUNet,
    path: PathLike | None = None,
    *,
    swin_path: PathLike | None = None,
    convnext_path: PathLike | None = None,
    strict: bool = False,
) -> PretrainedReport:
    """Fill ``model.global_branch`` (Swin) and/or ``model.local_branch`` (ConvNeXt) from local files.

    Args:
        model: a :class:`~privfl.models.dhunet.DHUNet` (anything with those two timm branches).
        path: a checkpoint holding a Swin or a ConvNeXt state dict (told apart by its keys), or both:
            as sub-dicts (e.g. ``{"swin": ..., "convnext": ...}``) or as one flat dict with
            ``global_branch.`` / ``local_branch.`` prefixes (a DHUNet checkpoint).
        swin_path: a checkpoint holding the Swin weights.
        convnext_path: a checkpoint holding the ConvNeXt weights.
        strict: raise :class:`ValueError` (before changing any weight) if a branch that a checkpoint
            was given for has missing or shape-mismatched tensors.

    Returns:
        a :class:`PretrainedReport`; a one-line summary is also logged at INFO level.

    Raises:
        FileNotFoundError: a named checkpoint does not exist.
        ValueError: no path given, a file holds neither model, two sources for one branch, or
            ``strict`` and something is missing or mismatched.
    """
    if path is None and swin_path is None and convnext_path is None:
        raise ValueError("load_pretrained needs a checkpoint: path=, swin_path= and/or convnext_path=")
    sources: dict[str, tuple[dict[str, torch.Tensor], str]] = {}

    def add(kind: str, sd: dict[str, torch.Tensor], origin: str) -> None:
        if kind in sources:
            raise ValueError(f"two {kind} checkpoints given ({sources[kind][1]} and {origin}); pass one")
        sources[kind] = (sd, origin)

    if path is not None:
        found = _split_by_kind(_read(path), str(path))
        if not found:
            raise ValueError(f"{path} holds neither Swin nor ConvNeXt weights")
        for kind, sd in found.items():
            add(kind, sd, str(path))
    for kind, p in (("swin", swin_path), ("convnext", convnext_path)):
        if p is None:
            continue
        found = _split_by_kind(_read(p), str(p))
        if kind not in found:
            raise ValueError(f"{p} holds no {kind} weights (found: {', '.join(found) or 'nothing usable'})")
        add(kind, found[kind], str(p))

    report = PretrainedReport()
    targets = model.state_dict()
    plan: list[tuple[str, torch.Tensor]] = []
    for kind in ("swin", "convnext"):
        if kind in sources:
            plan += _plan_branch(kind, sources[kind][0], targets, report)

    if strict and (report.missing or report.mismatched):
        raise ValueError(
            f"strict load_pretrained: {len(report.missing)} missing tensors (e.g. {report.missing[:3]}) and "
            f"{len(report.mismatched)} shape mismatches (e.g. {report.mismatched[:3]}); nothing was loaded"
        )
    with torch.no_grad():
        for key, value in plan:
            targets[key].copy_(value)
    logger.info("%s from %s", report.summary(), ", ".join(f"{k}={o}" for k, (_, o) in sources.items()))
    return report


# --------------------------------------------------------------------------- reading and splitting


def _read(path: PathLike) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    return torch.load(p, map_location="cpu", weights_only=True)


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _key_kind(key: str) -> str | None:
    if key.startswith(_SWIN_PREFIXES):
        return "swin"
    if key.startswith(_CONVNEXT_PREFIXES):
        return "convnext"
    return None


def _split_by_kind(obj: Any, origin: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"swin": sd, "convnext": sd}`` for whatever the (possibly nested) checkpoint holds."""
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{origin}: expected a state dict, got {type(obj).__name__}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    flat: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            key = key[len("module.") :] if key.startswith("module.") else key
            flat[key] = value
        elif isinstance(value, Mapping):  # a per-model sub-dict; anything else (optimizer state…) is ignored
            for kind, sd in _split_by_kind(value, origin).items():
                if kind in out:
                    raise ValueError(f"{origin} holds two {kind} state dicts")
                out[kind] = sd
    by_prefix = {"swin": "global_branch.", "convnext": "local_branch."}
    for kind, prefix in by_prefix.items():  # a DHUNet checkpoint: split on the branch prefixes
        part = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        if part:
            flat = {k: v for k, v in flat.items() if not k.startswith(prefix)}
            _merge(out, kind, part, origin)
    kinds = {c for c in map(_key_kind, flat) if c is not None}
    if len(kinds) > 1:
        raise ValueError(
            f"{origin} mixes Swin and ConvNeXt keys in one flat dict; store them as "
            "{'swin': ..., 'convnext': ...} or pass swin_path= and convnext_path="
        )
    if kinds:
        _merge(out, kinds.pop(), flat, origin)
    return out


def _merge(out: dict, kind: str, sd: dict, origin: str) -> None:
    if kind in out:
        raise ValueError(f"{origin} holds two {kind} state dicts")
    out[kind] = sd


# --------------------------------------------------------------------------- official -> timm keys


def _swin_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's Swin filter moves official end-of-stage downsamples to the next stage and renames the
    head. It also resizes patch embeddings / relative-position tables that differ from the model it
    is given; we give it a stand-in with the checkpoint's own shapes so nothing is resized (a shape
    that differs from DHU-Net is reported as mismatched instead)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    stub = _SwinShapes(sd)
    return checkpoint_filter_fn(sd, cast("torch.nn.Module", stub))  # duck-typed: has what the filter reads


class _SwinShapes:
    def __init__(self, sd: dict[str, torch.Tensor]):
        self._sd = sd
        w = sd.get("patch_embed.proj.weight")
        self.patch_embed = SimpleNamespace(
            proj=SimpleNamespace(weight=w if w is not None else torch.empty(0, 0, 0, 0))
        )

    def get_submodule(self, name: str) -> SimpleNamespace:
        table = self._sd[f"{name}.relative_position_bias_table"]
        side = (int(round(table.shape[0] ** 0.5)) + 1) // 2
        return SimpleNamespace(relative_position_bias_table=table, window_size=(side, side))


_OFFICIAL_CONVNEXT = re.compile(r"^(downsample_layers\.|stages\.\d+\.\d+\.)")


def _convnext_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ConvNeXt filter renames the official layout; it reshapes 2-D tensors to the model's
    shapes, so it gets a meta-device (no memory) timm ConvNeXt of the checkpoint's depths and widths."""
    if not any(_OFFICIAL_CONVNEXT.match(k) for k in sd):
        return dict(sd)  # already timm names
    from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

    stages: dict[int, int] = {}
    for k in sd:
        m = re.match(r"^stages\.(\d+)\.(\d+)\.", k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            stages[s] = max(stages.get(s, 0), b + 1)
    n = max(stages) + 1 if stages else 0
    depths = tuple(stages.get(s, 0) for s in range(n))
    try:
        dims = tuple(sd[f"stages.{s}.0.dwconv.weight"].shape[0] for s in range(n))
        stem = sd["downsample_layers.0.0.weight"]
    except KeyError as e:
        raise ValueError(f"incomplete official ConvNeXt checkpoint: no {e.args[0]}") from None
    with torch.device("meta"):
        ref = ConvNeXt(
            in_chans=stem.shape[1],
            num_classes=0,
            depths=depths,
            dims=dims,
            patch_size=stem.shape[-1],
            kernel_sizes=sd["stages.0.0.dwconv.weight"].shape[-1],
            use_grn=any(".grn." in k for k in sd),
            conv_bias="stages.0.0.dwconv.bias" in sd,
            ls_init_value=1e-6 if any(k.endswith(".gamma") and ".grn." not in k for k in sd) else None,
        )
    return checkpoint_filter_fn(sd, ref)


# --------------------------------------------------------------------------- mapping to the model


def _is_head_or_final_norm(key: str) -> bool:
    return key.startswith(_HEAD_PREFIXES)


def _resolve(key: str, targets: Mapping[str, torch.Tensor]) -> str | None:
    if key in targets:
        return key
    for suffix, alias in _DP_ALIASES:
        if key.endswith(suffix):
            alt = key[: -len(suffix)] + alias
            if alt in targets:
                return alt
    return None


def _plan_branch(
    kind: str,
    sd: dict[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    report: PretrainedReport,
) -> list[tuple[str, torch.Tensor]]:
    attr, block_re, alternate = _BRANCHES[kind]
    prefix = attr + "."
    branch_keys = [k for k in targets if k.startswith(prefix)]
    if not branch_keys:
        raise ValueError(f"the model has no {attr} to load {kind} weights into")

    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for k in [k for k in sd if k.rsplit(".", 1)[-1] in _RECOMPUTED_BUFFERS]:
        report.skipped.append(prefix + k)
        del sd[k]
    try:
        sd = _swin_to_timm(sd) if kind == "swin" else _convnext_to_timm(sd)
    except Exception as e:  # name the checkpoint layout problem, keep the cause
        raise ValueError(f"could not convert the {kind} checkpoint to timm names: {e}") from e

    def depths(keys) -> dict[int, int]:
        out: dict[int, int] = {}
        for k in keys:
            m = block_re.match(k)
            if m:
                s, b = int(m.group(1)), int(m.group(2))
                out[s] = max(out.get(s, 0), b + 1)
        return out

    src_depths = depths(sd)
    dst_depths = depths(k[len(prefix) :] for k in branch_keys)
    # checkpoint block -> model block, per stage
    block_map: dict[tuple[int, int], int] = {}
    report.blocks[kind] = {}
    for s, n_src in sorted(src_depths.items()):
        if s not in dst_depths:
            continue
        picks = select_blocks(n_src, dst_depths[s], alternate=alternate)
        report.blocks[kind][s] = picks
        for dst, src in enumerate(picks):
            block_map[(s, src)] = dst

    plan: list[tuple[str, torch.Tensor]] = []
    filled: set[str] = set()
    for key, value in sd.items():
        m = block_re.match(key)
        if m:
            s, b, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if s in dst_depths and (s, b) not in block_map:
                report.skipped.append(prefix + key)  # a block dropped from a shortened stage
                continue
            if (s, b) in block_map:
                key = f"{key[: m.start(2)]}{block_map[(s, b)]}.{rest}"
        target = _resolve(prefix + key, targets)
        if target is None:
            (report.skipped if _is_head_or_final_norm(key) else report.unexpected).append(prefix + key)
            continue
        shape_model = tuple(targets[target].shape)
        if tuple(value.shape) != shape_model:
            report.mismatched.append((target, tuple(value.shape), shape_model))
            filled.add(target)
            continue
        plan.append((target, value))
        report.loaded.append(target)
        filled.add(target)
    report.missing += [k for k in branch_keys if k not in filled]
    return plan
