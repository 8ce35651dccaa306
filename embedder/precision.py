"""Encoder precision: fp32, bf16 (CPU autocast where the CPU has native bf16 kernels) and int8
(the Linear layers as int8 matrix products: weights per output channel, activations per token,
SmoothQuant-smoothed from calibration texts).

Vectors of one model at two precisions are close but not equal, so precision is part of what a
vector means: an index records the precision it was built with, its vector cache is kept apart
(`vector_space`), and queries are encoded at the index's precision (search.engine).
"""

from __future__ import annotations

import logging
import threading
from enum import Enum
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"


def parse_precision(value: str | Precision | None) -> Precision:
    if value is None:
        return Precision.FP32
    if isinstance(value, Precision):
        return value
    try:
        return Precision(str(value).lower())
    except ValueError:
        raise ValueError(f"unknown encoder precision {value!r}: use fp32, bf16 or int8") from None


# What a non-fp32 vector space is called after `@`. int8 names its scheme: vectors cached by the
# earlier one (a per-batch activation scale, under `@int8`) differ from today's and are never reused.
_SPACE_SUFFIX = {Precision.BF16: "bf16", Precision.INT8: "int8-token"}


def vector_space(model_version: str, precision: str | Precision = Precision.FP32) -> str:
    """The name vectors of `model_version` at `precision` are cached under: the model version
    itself at fp32 (so caches written before precisions existed stay valid), else
    `<model_version>@<bf16 | int8-token>`."""
    p = parse_precision(precision)
    return model_version if p is Precision.FP32 else f"{model_version}@{_SPACE_SUFFIX[p]}"


@lru_cache(maxsize=1)
def bf16_support() -> tuple[bool, str]:
    """(usable, why): native bf16 matmul kernels on this CPU. Without them torch emulates bf16 and
    is slower than fp32, so bf16 is only worth having where the CPU says it has them."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not native:
        return False, "this CPU has no native bf16 kernels (no avx512_bf16 or amx_bf16 in /proc/cpuinfo)"
    try:
        import torch

        if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False, "torch's oneDNN build reports no bf16 support on this CPU"
    except (ImportError, AttributeError, RuntimeError):
        pass  # an older torch without the check: the CPU flags decide
    return True, f"native bf16 kernels ({', '.join(native)})"


@lru_cache(maxsize=1)
def int8_support() -> tuple[bool, str]:
    """(usable, why): whether this torch multiplies int8 matrices on the CPU (`torch._int_mm`,
    which older releases ran on CUDA only)."""
    try:
        import torch

        a = torch.ones((3, 32), dtype=torch.int8)
        ok = bool((torch._int_mm(a, torch.ones((32, 8), dtype=torch.int8)) == 32).all())
    except (ImportError, AttributeError, RuntimeError, NotImplementedError) as exc:
        return False, f"this torch has no CPU int8 matrix product (torch._int_mm: {type(exc).__name__})"
    return (True, "torch._int_mm on the CPU") if ok else (False, "torch._int_mm gave a wrong product on this CPU")


def resolve_precision(requested: str | Precision | None, device: str = "cpu") -> tuple[Precision, str]:
    """The precision an encoder will run at, and why. bf16 on a CPU without native kernels falls
    back to fp32; int8 is a CPU path (a GPU encodes in fp16)."""
    p = parse_precision(requested)
    if p is Precision.BF16 and not device.startswith("cuda"):
        ok, why = bf16_support()
        return (p, why) if ok else (Precision.FP32, f"bf16 asked for, fp32 used: {why}")
    if p is Precision.INT8 and device.startswith("cuda"):
        return Precision.FP32, "int8 asked for, fp32 used: int8 encoders run on the CPU only"
    if p is Precision.INT8:
        ok, why = int8_support()
        if not ok:
            return Precision.FP32, f"int8 asked for, fp32 used: {why}"
    return p, "as asked"


# Modules that pass their Linear children's weights to a functional op instead of calling them:
# open_clip's ModifiedResNet attention pool (F.multi_head_attention_forward), timm's EVA attention
# (F.linear on qkv.weight, open_clip's EVA02 towers).
_READS_LINEAR_WEIGHTS = {"AttentionPool2d", "EvaAttention"}
# Linear layers their owner calls only after `isinstance(layer, nn.Linear)`, else multiplies as a
# tensor: open_clip's text projection (a Linear where the config has proj_bias, e.g. SigLIP).
_TYPE_CHECKED_LINEAR = ("text_projection",)

# SmoothQuant's migration strength (Xiao et al. 2023): how much of each input channel's activation
# range moves into the weights. Top-10 overlap with fp32, query and gallery both at int8: trained
# demo model (200 emoji-name queries, 800 titles) 0.9465 at 0.5, 0.9525 at 0.6, 0.9485 at 0.65-0.7,
# 0.9425 at 0.8; pretrained all-MiniLM-L6-v2 (100 over 400) 0.966 at 0.5, 0.965 at 0.7.
SMOOTHING_ALPHA = 0.6

CALIBRATION_TEXTS = Path(__file__).with_name("int8_calibration.txt")


_CLASSES_LOCK = threading.Lock()


def _made_once(make):
    """`make()` run once, under a lock: two loader threads get one class, not two (the classes
    import torch, so they are made on first use, not at import)."""
    cached = lru_cache(maxsize=1)(make)

    def get():
        with _CLASSES_LOCK:
            return cached()
    return get


@_made_once
def int8_linear_type():
    """The module type int8 puts in place of each quantised `nn.Linear` (made on first use)."""
    import torch

    class Int8Linear(torch.nn.Module):
        """A Linear layer run as an int8 x int8 matrix product (`torch._int_mm`): int8 weights with
        a scale per output channel, activations quantised per call with a scale per token (row).

        Why per token: torch's dynamic quantisation gives a whole batch one activation scale, so
        one token with an outlier channel (BERT-style towers have them) flattens every other
        token's values into a few levels; MiniLM's top-10 overlap with fp32 was 0.83. `smooth`
        (SmoothQuant) divides each input channel by s and multiplies the weight's column by s,
        which leaves the product unchanged and moves outlier channels' range into the weights."""

        def __init__(self, linear: "torch.nn.Linear", smooth: "torch.Tensor | None" = None):
            super().__init__()
            weight = linear.weight.detach().float()
            if smooth is not None:
                weight = weight * smooth[None, :]
            scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous())
            self.register_buffer("weight_scale", scale)
            self.register_buffer("input_divisor", None if smooth is None else (1.0 / smooth).contiguous())
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
            # open_clip reads a block's weight dtype to cast activations; this attribute is what it
            # looks for on a quantised layer instead of `.weight`.
            self.int8_original_dtype = torch.float32

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            rows = x.reshape(-1, self.in_features).float()
            if self.input_divisor is not None:
                rows = rows * self.input_divisor
            # Few ops, in place where they can be: at batch 1 each costs about as much as the
            # product itself (abs().amax(), not linalg.vector_norm(ord=inf), which took 12 us a
            # call on a MiniLM query, 6x this).
            step = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-8).div_(127.0)
            quantised = (rows / step).round_().to(torch.int8)
            out = torch._int_mm(quantised, self.weight_int8).float().mul_(step).mul_(self.weight_scale)
            if self.bias is not None:
                out.add_(self.bias)
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, " \
                   f"smoothed={self.input_divisor is not None}"

    return Int8Linear


@_made_once
def _self_attention_class():
    import math

    import torch
    import torch.nn.functional as F

    class SelfAttention(torch.nn.Module):
        """`nn.MultiheadAttention` rebuilt from two plain Linear layers (input and output
        projections) around `scaled_dot_product_attention`: the same results (masks, key padding,
        cross-attention, attention weights, batch_first or not), but with projections int8 can
        quantise. MultiheadAttention hands its weights to a functional op, so a third of a ViT
        block's Linear work stayed fp32 (ViT-B-32 text int8 1.75x -> 2.9x, image tower 4x)."""

        def __init__(self, attention: "torch.nn.MultiheadAttention"):
            super().__init__()
            self.heads, self.batch_first = attention.num_heads, attention.batch_first
            self.in_proj = _linear(attention.in_proj_weight, attention.in_proj_bias)
            self.out_proj = _linear(attention.out_proj.weight, attention.out_proj.bias)

        def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            same = key is query and value is query
            unbatched = query.dim() == 2
            if unbatched:
                query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
                key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
            if not self.batch_first or unbatched:
                query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
            batch, length, width = query.shape
            head = width // self.heads
            if same:
                q, k, v = self.in_proj(query).view(batch, length, 3, self.heads, head).permute(2, 0, 3, 1, 4)
            else:  # cross-attention: each input through its third of the projection
                q = self.in_proj(query)[..., :width]
                k = self.in_proj(key)[..., width:2 * width]
                v = self.in_proj(value)[..., 2 * width:]
                q, k, v = (t.reshape(batch, -1, self.heads, head).transpose(1, 2) for t in (q, k, v))
            mask = _additive_mask(attn_mask, key_padding_mask, batch, self.heads, length, k.shape[2], q.dtype)
            if is_causal and mask is None:
                mask = torch.full((length, k.shape[2]), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
            weights = None
            if need_weights:
                scores = (q @ k.transpose(-2, -1)) / math.sqrt(head)
                weights = (scores if mask is None else scores + mask).softmax(dim=-1)
                out = weights @ v
                weights = weights.mean(dim=1) if average_attn_weights else weights
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
            if not self.batch_first or unbatched:
                out = out.transpose(0, 1)
            if unbatched:
                out = out.squeeze(1)
                weights = None if weights is None else weights.squeeze(0)
            return out, weights

    def _linear(weight, bias):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        return linear

    def _additive_mask(attn_mask, key_padding_mask, batch, heads, length, source, dtype):
        """MultiheadAttention's masks (bool: True = may not attend; or float, added) as one float
        mask that broadcasts over (batch, heads, length, source)."""
        def additive(m):
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # (batch x heads, length, source)
                mask = mask.view(batch, heads, length, source)
        if key_padding_mask is not None:
            padding = additive(key_padding_mask).view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    return SelfAttention


def _split_self_attention(model, skip: set[str]) -> int:
    """Every `nn.MultiheadAttention` that `SelfAttention` can stand for (one embedding width for
    query, key and value; no bias_k or zero attention), replaced by it; returns how many."""
    import torch

    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.MultiheadAttention or any(name.startswith(o + ".") for o in skip):
            continue
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            continue
        owner_name, _, child = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, child, _self_attention_class()(module))
        replaced += 1
    return replaced


def calibration_texts() -> list[str]:
    """Short product titles and queries the text tower runs once before int8 quantisation, so that
    smoothing knows each Linear input channel's range (the same list every time: an index and the
    queries against it must be quantised alike)."""
    return [line.strip() for line in CALIBRATION_TEXTS.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def _input_ranges(model, targets: list[str], run_texts) -> dict:
    """Per target Linear, the largest |activation| of each input channel over the calibration texts."""
    import torch

    modules = dict(model.named_modules())
    ranges: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(_module, inputs, _output):
            seen = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0)
            ranges[name] = torch.maximum(ranges[name], seen) if name in ranges else seen
        return hook

    hooks = [modules[name].register_forward_hook(recorder(name)) for name in targets]
    try:
        with torch.inference_mode():
            texts = calibration_texts()
            for start in range(0, len(texts), 32):
                run_texts(texts[start:start + 32])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: r.clone() for name, r in ranges.items()}


def quantise_linear_int8(model, run_texts=None):
    """int8 weights (a scale per output channel) and int8 activations (a scale per token) for every
    `nn.Linear`, in place; returns (model, quantised, smoothed, kept): how many Linear layers were
    quantised, how many of them smoothed with calibrated input ranges, and how many stay fp32.

    `run_texts(texts)`: runs the model's text tower on a list of strings (the embedder's own query
    path); the Linear layers it reaches are smoothed (SmoothQuant) from the ranges it shows. Layers
    it does not reach (the image tower) are quantised per token without smoothing.

    `nn.MultiheadAttention` (open_clip's ViT and text towers) holds its projections as tensors it
    hands to a functional op; it is first rebuilt as `SelfAttention` with two plain Linear layers,
    which are then quantised. HF towers (BERT, CLIP, SigLIP) build attention from plain Linear
    layers. What stays fp32: every non-Linear layer (embeddings, LayerNorm, convolutions such as a
    ViT's patch embedding), the Linear layers of modules that hand their weights to a functional
    op (open_clip's ModifiedResNet attention pool, timm's EVA attention), and open_clip's text
    projection where it is a Linear (open_clip type-checks it)."""
    import torch

    int8_linear = int8_linear_type()
    # Linear layers whose owner reads their `.weight` tensors itself instead of calling them
    # (`_READS_LINEAR_WEIGHTS`) must stay fp32.
    reads_weights = {name for name, m in model.named_modules() if type(m).__name__ in _READS_LINEAR_WEIGHTS}
    _split_self_attention(model, reads_weights)
    targets = [
        name for name, m in model.named_modules()
        if type(m) is torch.nn.Linear and not any(name.startswith(owner + ".") for owner in reads_weights)
        and name.rpartition(".")[2] not in _TYPE_CHECKED_LINEAR
    ]
    ranges = _input_ranges(model, targets, run_texts) if run_texts is not None else {}
    smoothed = 0
    for name in targets:
        owner_name, _, child = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        linear = getattr(owner, child)
        smooth = None
        if name in ranges:
            weight_range = linear.weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
            smooth = (ranges[name].clamp(min=1e-5).pow(SMOOTHING_ALPHA)
                      / weight_range.pow(1 - SMOOTHING_ALPHA)).clamp(min=1e-5)
            # On a grid of 1/8 octave (within 4.5% of the computed factor): an activation range
            # that differs in its last bits on another CPU or thread count (a Ray worker embedding
            # the catalog, the server encoding queries) gives the same factors. Trained demo, top-10
            # overlap: 0.954 on this grid, 0.9525 unrounded, 0.9465 on powers of two.
            smooth = torch.exp2(torch.round(torch.log2(smooth) * 8) / 8)
            smoothed += 1
        setattr(owner, child, int8_linear(linear, smooth))
    kept = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    return model, len(targets), smoothed, kept


def apply_precision(model, precision: Precision, *, label: str, run_texts=None):
    """`model` ready to run at `precision` (int8: quantised in place, smoothed from `run_texts` as
    `quantise_linear_int8` says; fp32/bf16: unchanged, bf16 is an autocast at encode time). One log
    line says what was done."""
    if precision is Precision.INT8:
        model, quantised, smoothed, kept = quantise_linear_int8(model, run_texts)
        log.info("%s: int8 weights and per-token int8 activations in %d Linear layers (%d smoothed from "
                 "calibration texts); %d Linear layers int8 cannot take (their owner reads their weights or "
                 "type-checks them) and the non-Linear layers stay fp32", label, quantised, smoothed, kept)
    return model
