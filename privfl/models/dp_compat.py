"""Make DHU-Net (and U-Net) trainable with opacus' per-sample DP-SGD in hooks mode.

Opacus computes per-sample gradients from module hooks: each parameterised module sees its input
(activations) and the gradient of its output (backprops), both with the batch as the first axis,
and a registered *grad sampler* turns them into one gradient per sample. Four things in DHU-Net
break that, and :func:`make_private_compatible` fixes each (on a deep copy; the input is untouched):

1. **BatchNorm** mixes the samples of a batch. It becomes ``GroupNorm(gcd(32, C), C)`` through
   ``opacus.validators.ModuleValidator.fix``; ``gcd(32, C)`` always divides C (so widths such as 2,
   6 or 48 work: 2, 2 and 16 groups). This changes the model's outputs, as it must.
2. **ConvNeXt layer scale**: timm's ``ConvNeXtBlock.gamma`` is a bare parameter on a module with
   children. Opacus would then re-run the whole block under ``torch.func`` (a second forward) to
   get per-sample gradients, and stochastic depth inside it fails there (random ops under vmap).
   The block becomes a :class:`DPConvNeXtBlock` whose ``gamma`` lives in a :class:`LayerScale` child
   (``ls.gamma``, same values, bit-identical outputs) with its own grad sampler.
3. **Swin window attention** folds the windows into the batch axis (``B·nW`` "samples"), so every
   hooked layer inside would produce per-*window* gradients, and ``relative_position_bias_table``
   is a bare parameter next to a buffer (opacus refuses trainable modules with buffers). Blocks
   become :class:`DPSwinTransformerBlock` / :class:`DPWindowAttention`, which keep the batch axis
   first (windows as ``(B, nW, N, C)``) and move the table into a :class:`RelativePositionBias`
   child (``attn.rel_pos.relative_position_bias_table``) with its own grad sampler; the relative
   position index becomes a plain tensor attribute. Outputs are unchanged (timm's non-fused
   attention path, its default).
4. In-place activations (``ReLU(inplace=True)``) after hooked layers trip the full backward hooks
   opacus installs; they are switched to out-of-place (same values).

Importing this module also registers opacus grad samplers for ``nn.ConvTranspose2d`` and timm's
``LayerNorm`` / ``LayerNorm2d`` (opacus has none and would re-run them under ``torch.func``, which
fails on the empty batches Poisson sampling produces), and re-registers ``nn.Conv2d``'s to make its
input contiguous (opacus' version silently returns wrong per-sample gradients for channels-last
strided inputs, which timm's ConvNeXt produces).

Parameter names change only for the moved tensors (``…gamma`` → ``…ls.gamma`` and
``…attn.relative_position_bias_table`` → ``…attn.rel_pos.relative_position_bias_table``) and for
BatchNorm's running statistics, which disappear. Load pretrained weights first
(:func:`privfl.models.pretrained.load_pretrained` also understands the new names).
"""

from __future__ import annotations

from typing import cast

import torch
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.validators import ModuleValidator
from timm.layers import LayerNorm, LayerNorm2d
from timm.models.convnext import ConvNeXtBlock
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    WindowAttention,
    get_relative_position_index,
)
from torch import nn

__all__ = [
    "DPConvNeXtBlock",
    "DPSwinTransformerBlock",
    "DPWindowAttention",
    "LayerScale",
    "RelativePositionBias",
    "check_private_compatible",
    "convert_layer_scale_",
    "convert_window_attention_",
    "make_private_compatible",
]


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma``; ``channels_last`` picks the channel axis (last or 1)."""

    def __init__(self, gamma: torch.Tensor, channels_last: bool = False):
        super().__init__()
        self.gamma = gamma if isinstance(gamma, nn.Parameter) else nn.Parameter(gamma.detach().clone())
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return x.mul(self.gamma)
        return x.mul(self.gamma.reshape(1, -1, *([1] * (x.ndim - 2))))

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[0]}, channels_last={self.channels_last}"


@register_grad_sampler(LayerScale)
def _layer_scale_grad_sample(layer: LayerScale, activations: list[torch.Tensor], backprops: torch.Tensor):
    if not layer.gamma.requires_grad:
        return {}
    prod = activations[0] * backprops
    channel = prod.ndim - 1 if layer.channels_last else 1
    return {layer.gamma: prod.sum(dim=[d for d in range(1, prod.ndim) if d != channel])}


class RelativePositionBias(nn.Module):
    """Adds Swin's learned relative-position bias to attention scores ``(B, …, heads, N, N)``.

    The ``(2Wh−1)(2Ww−1) × heads`` table is indexed by the relative position of each token pair.
    The index is a plain tensor attribute, not a buffer: opacus rejects trainable modules with
    buffers, and the index is recomputed from the window size anyway (it is never saved).
    """

    def __init__(self, table: nn.Parameter, window_size: tuple[int, int]):
        super().__init__()
        self.relative_position_bias_table = table
        win_h, win_w = window_size
        self.window_size = (win_h, win_w)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.index = get_relative_position_index(*self.window_size, device=table.device).view(-1)

    def _index(self) -> torch.Tensor:
        device = self.relative_position_bias_table.device
        if self.index.device != device:  # follow .to(device) of the module
            self.index = self.index.to(device)
        return self.index

    def bias(self) -> torch.Tensor:
        """The ``(heads, N, N)`` bias."""
        n = self.window_area
        return self.relative_position_bias_table[self._index()].view(n, n, -1).permute(2, 0, 1)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return attn + self.bias()

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, heads={self.relative_position_bias_table.shape[1]}"


@register_grad_sampler(RelativePositionBias)
def _relative_position_bias_grad_sample(layer: RelativePositionBias, activations, backprops: torch.Tensor):
    table = layer.relative_position_bias_table
    if not table.requires_grad:
        return {}
    b, heads, n = backprops.shape[0], backprops.shape[-3], backprops.shape[-1]
    if backprops.ndim > 4:  # (B, nW, …, heads, N, N): sum over the windows of each sample
        backprops = backprops.sum(dim=tuple(range(1, backprops.ndim - 3)))
    g = backprops.reshape(b, heads, n * n).transpose(1, 2)  # (B, N·N, heads)
    gs = torch.zeros((b, *table.shape), dtype=g.dtype, device=g.device)
    return {table: gs.index_add_(1, layer._index(), g)}


class DPWindowAttention(WindowAttention):
    """timm ``WindowAttention`` taking windows as ``(B, nW, N, C)`` (batch first) instead of
    ``(B·nW, N, C)``, with the bias table in ``rel_pos``. Built by converting a ``WindowAttention``
    in place (:func:`make_private_compatible`), not constructed directly."""

    rel_pos: RelativePositionBias

    @classmethod
    def convert_(cls, attn: WindowAttention) -> DPWindowAttention:
        table = attn.relative_position_bias_table
        del attn.relative_position_bias_table
        del attn.relative_position_index
        attn.rel_pos = RelativePositionBias(table, attn.window_size)
        attn.__class__ = cls
        return attn  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, nW, N, C)``; ``mask``: ``(nW, N, N)`` of 0/−100 or None. Same arithmetic as
        timm's non-fused path."""
        B, nW, N, _ = x.shape
        # explicit sizes throughout: B may be 0 (an empty Poisson-sampled batch)
        head_dim = self.qkv.out_features // (3 * self.num_heads)
        qkv = self.qkv(x).reshape(B, nW, N, 3, self.num_heads, head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)  # (B, nW, heads, N, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.rel_pos(attn)
        if mask is not None:
            attn = attn + mask.unsqueeze(1)  # (nW, 1, N, N) against (B, nW, heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(2, 3).reshape(B, nW, N, self.num_heads * head_dim)
        return self.proj_drop(self.proj(x))

    def _get_rel_pos_bias(self) -> torch.Tensor:
        return self.rel_pos.bias().unsqueeze(0)

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.rel_pos.relative_position_bias_table, std=0.02)

    def _init_buffers(self) -> None:
        pass  # the index lives in rel_pos

    def set_window_size(self, window_size) -> None:
        raise NotImplementedError("resize the window before make_private_compatible")


class DPSwinTransformerBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` that hands its windows to the attention as ``(B, nW, N, C)``."""

    @classmethod
    def convert_(cls, block: SwinTransformerBlock) -> DPSwinTransformerBlock:
        DPWindowAttention.convert_(block.attn)
        block.__class__ = cls
        return block  # type: ignore[return-value]

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        has_shift = any(self.shift_size)
        shifted_x = (
            torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2)) if has_shift else x
        )
        pad_h = (self.window_size[0] - H % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - W % self.window_size[1]) % self.window_size[1]
        shifted_x = nn.functional.pad(shifted_x, (0, 0, 0, pad_w, 0, pad_h))
        _, Hp, Wp, _ = shifted_x.shape
        wh, ww = self.window_size
        nw = (Hp // wh) * (Wp // ww)
        # batch-major windows: (B, Hp/wh, wh, Wp/ww, ww, C) -> (B, nW, N, C); explicit sizes so B may be 0
        windows = shifted_x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(B, nw, self.window_area, C)
        mask = self.get_attn_mask(shifted_x) if getattr(self, "dynamic_mask", False) else self.attn_mask
        windows = self.attn(windows, mask=mask)
        shifted_x = (
            windows.view(B, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        )
        shifted_x = shifted_x[:, :H, :W, :].contiguous()
        return torch.roll(shifted_x, shifts=self.shift_size, dims=(1, 2)) if has_shift else shifted_x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape  # timm's forward, with explicit sizes so B may be 0
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, H * W, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)

    def set_input_size(self, *args, **kwargs) -> None:
        raise NotImplementedError("change the input size before make_private_compatible")


class DPConvNeXtBlock(ConvNeXtBlock):
    """timm ``ConvNeXtBlock`` with the layer scale as a :class:`LayerScale` child ``ls``."""

    ls: LayerScale

    @classmethod
    def convert_(cls, block: ConvNeXtBlock) -> DPConvNeXtBlock:
        gamma = block.gamma
        if gamma is None:
            raise ValueError("this ConvNeXtBlock has no layer scale (gamma) to convert")
        del block.gamma
        block.gamma = None  # as timm's blocks without layer scale
        block.ls = LayerScale(gamma, channels_last=False)
        block.__class__ = cls
        return block  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = self.ls(x)
        return self.drop_path(x) + self.shortcut(shortcut)


_opacus_conv_grad_sample = GradSampleModule.GRAD_SAMPLERS[nn.Conv2d]


@register_grad_sampler(nn.Conv2d)
def _conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor):
    """opacus' Conv2d grad sampler with contiguous activations: its ``unfold2d`` builds patches with
    ``as_strided`` assuming a contiguous NCHW input, and timm's ConvNeXt hands its depthwise and
    downsampling convs channels-last-strided tensors (after ``permute``), which gave wrong
    per-sample gradients without an error. ``contiguous()`` is not enough: for a map with size-1
    dims (e.g. 1×1) a channels-last tensor already counts as contiguous, yet ``F.pad`` keeps its
    layout, so the strides are compared with the canonical ones and the tensor copied if they differ."""
    x = activations[0]
    if x.stride() != _contiguous_strides(x.shape):
        x = x.clone(memory_format=torch.contiguous_format)
    return _opacus_conv_grad_sample(layer, [x, *activations[1:]], backprops)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@register_grad_sampler(nn.ConvTranspose2d)
def _conv_transpose2d_grad_sample(
    layer: nn.ConvTranspose2d, activations: list[torch.Tensor], backprops: torch.Tensor
):
    """Per-sample gradients of ``ConvTranspose2d`` (opacus has none and would re-run the layer under
    ``torch.func``, which also fails on an empty batch). A transposed convolution is the adjoint of
    a convolution with the same kernel, stride, padding and dilation, so its weight gradient pairs
    each input position with the ``unfold``-ed output gradient around it:
    ``grad[n, i, o, kh, kw] = Σ_p x[n, i, p] · unfold(g)[n, (o, kh, kw), p]`` within each group."""
    x = activations[0].to(backprops.dtype)
    n, groups = x.shape[0], layer.groups
    ret = {}
    if layer.weight.requires_grad:
        cols = nn.functional.unfold(
            backprops,
            layer.kernel_size,
            dilation=layer.dilation,
            padding=cast(tuple[int, ...], layer.padding),  # never a string for ConvTranspose2d
            stride=layer.stride,
        )  # (n, C_out·kh·kw, L) with L = the input's H·W
        positions = x.shape[2] * x.shape[3]
        if cols.shape[-1] != positions:
            raise RuntimeError(
                f"ConvTranspose2d grad sampler: {cols.shape[-1]} output windows for {positions} inputs"
            )
        gs = torch.einsum(
            "ngip,ngop->ngio",
            x.reshape(n, groups, layer.in_channels // groups, positions),
            cols.reshape(n, groups, cols.shape[1] // groups, positions),
        )
        ret[layer.weight] = gs.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))
    return ret


@register_grad_sampler(LayerNorm)
def _timm_layer_norm_grad_sample(layer: LayerNorm, activations, backprops):
    return compute_layer_norm_grad_sample(layer, activations, backprops)


@register_grad_sampler(LayerNorm2d)
def _timm_layer_norm_2d_grad_sample(layer: LayerNorm2d, activations, backprops):
    return compute_layer_norm_grad_sample(
        layer, [activations[0].permute(0, 2, 3, 1)], backprops.permute(0, 2, 3, 1)
    )


def convert_layer_scale_(model: nn.Module) -> nn.Module:
    """Step 2 alone, in place: timm ConvNeXt blocks get a :class:`LayerScale` child. Outputs are
    bit-identical."""
    for m in model.modules():
        if type(m) is ConvNeXtBlock and isinstance(m.gamma, nn.Parameter):
            DPConvNeXtBlock.convert_(m)
    return model


def convert_window_attention_(model: nn.Module) -> nn.Module:
    """Step 3 alone, in place: timm Swin blocks keep the batch axis first in window attention."""
    for m in model.modules():
        if type(m) is SwinTransformerBlock:
            DPSwinTransformerBlock.convert_(m)
    return model


def make_private_compatible(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that opacus' hooks-mode ``GradSampleModule`` / ``PrivacyEngine`` can
    train with exact per-sample gradients (see the module docstring for the four changes).

    Idempotent; keeps the train/eval mode. ``check_private_compatible`` of the result is empty
    (in training mode).
    """
    fixed = ModuleValidator.fix(model)  # a clone (pickled copy); BatchNorm -> GroupNorm(gcd(32, C), C)
    convert_layer_scale_(fixed)
    convert_window_attention_(fixed)
    for m in fixed.modules():
        if isinstance(getattr(m, "inplace", None), bool) and m.inplace:
            m.inplace = False
    return fixed


def check_private_compatible(model: nn.Module) -> list[str]:
    """Why opacus' hooks-mode DP-SGD cannot train ``model`` exactly; empty when it can.

    Combines ``ModuleValidator.validate`` (BatchNorm, LSTM, …; it also requires training mode),
    ``GradSampleModule.validate`` (trainable modules with buffers) and two checks opacus cannot
    make: timm Swin blocks not converted (per-window instead of per-sample gradients) and modules
    with their own parameters *and* parameterised children (opacus re-runs those whole under
    ``torch.func``, which fails on random ops inside such as stochastic depth).
    """
    errors = [str(e) for e in ModuleValidator.validate(model, strict=False)]
    errors += [str(e) for e in GradSampleModule.validate(model, strict=False)]
    for name, m in model.named_modules():
        label = name or type(m).__name__
        if type(m) is SwinTransformerBlock:
            errors.append(
                f"{label}: timm SwinTransformerBlock folds windows into the batch axis, so opacus "
                "would compute per-window gradients; run make_private_compatible"
            )
        own = any(p.requires_grad for p in m.parameters(recurse=False))
        child = any(p.requires_grad for c in m.children() for p in c.parameters())
        if own and child and type(m) not in GradSampleModule.GRAD_SAMPLERS:
            errors.append(
                f"{label} ({type(m).__name__}) has its own parameters and parameterised submodules: "
                "opacus would re-run it under torch.func for per-sample gradients; give the bare "
                "parameters their own module (make_private_compatible does for timm ConvNeXt and Swin)"
            )
    return errors
