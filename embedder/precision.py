"""Encoder precision: fp32, bf16 (CPU autocast where the CPU has native bf16 kernels) and int8
(the Linear layers as int8 matrix products: weights per output channel, activations per token,
SmoothQuant-smoothed from calibration texts).

Vectors of one model at two precisions are close but not equal, so precision is part of what a
vector means: an index records the precision it was built with, its vector cache is kept apart
(`vector_space`), and queries are encoded at the index's precision (search.engine).
"""

from __future__ import annotations

import logging
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


def resolve_precision(requested: str | Precision | None, device: str = "cpu") -> tuple[Precision, str]:
    """The precision an encoder will run at, and why. bf16 on a CPU without native kernels falls
    back to fp32; int8 is a CPU path (a GPU encodes in fp16)."""
    p = parse_precision(requested)
    if p is Precision.BF16 and not device.startswith("cuda"):
        ok, why = bf16_support()
        return (p, why) if ok else (Precision.FP32, f"bf16 asked for, fp32 used: {why}")
    if p is Precision.INT8 and device.startswith("cuda"):
        return Precision.FP32, "int8 asked for, fp32 used: int8 encoders run on the CPU only"
    return p, "as asked"


# Modules that pass their Linear children's weights to a functional op (F.multi_head_attention_forward).
_READS_LINEAR_WEIGHTS = {"AttentionPool2d"}

# SmoothQuant's migration strength (Xiao et al. 2023): how much of each input channel's activation
# range moves into the weights. Top-10 overlap with fp32, query and gallery both at int8: trained
# demo model (200 emoji-name queries, 800 titles) 0.9465 at 0.5, 0.9525 at 0.6, 0.9485 at 0.65-0.7,
# 0.9425 at 0.8; pretrained all-MiniLM-L6-v2 (100 over 400) 0.966 at 0.5, 0.965 at 0.7.
SMOOTHING_ALPHA = 0.6

CALIBRATION_TEXTS = Path(__file__).with_name("int8_calibration.txt")


@lru_cache(maxsize=1)
def _int8_linear_class():
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
            # abs().amax(): linalg.vector_norm(ord=inf) took 12 us a call on a MiniLM query, 6x this.
            step = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-8).div_(127.0)
            quantised = (rows / step).round_().to(torch.int8)
            out = torch._int_mm(quantised, self.weight_int8).float().mul_(step)
            out = out.mul_(self.weight_scale) if self.bias is None else torch.addcmul(self.bias, out, self.weight_scale)
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, " \
                   f"smoothed={self.input_divisor is not None}"

    return Int8Linear


def int8_linear_type():
    """The module type int8 puts in place of each quantised `nn.Linear`."""
    return _int8_linear_class()


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

    What stays fp32: `nn.MultiheadAttention` (open_clip's ViT and text towers) holds its input
    projection as a bare parameter and its output projection as a NonDynamicallyQuantizableLinear,
    which it reads as tensors; so is every non-Linear layer (embeddings, LayerNorm, convolutions
    such as a ViT's patch embedding), and the Linear layers of open_clip's ModifiedResNet attention
    pool, which hands their weights to a functional op. HF towers (BERT, CLIP, SigLIP) build
    attention from plain Linear layers, which are quantised."""
    import torch

    int8_linear = _int8_linear_class()
    # Linear layers whose owner reads their `.weight` tensors itself instead of calling them
    # (open_clip's ModifiedResNet attention pool, the demo's image tower) must stay fp32.
    reads_weights = {name for name, m in model.named_modules() if type(m).__name__ in _READS_LINEAR_WEIGHTS}
    targets = [
        name for name, m in model.named_modules()
        if type(m) is torch.nn.Linear and not any(name.startswith(owner + ".") for owner in reads_weights)
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
                 "calibration texts); %d Linear layers (attention projections torch or open_clip use as "
                 "plain tensors) and the non-Linear layers stay fp32", label, quantised, smoothed, kept)
    return model
