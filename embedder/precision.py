"""Encoder precision: fp32, bf16 (CPU autocast where the CPU has native bf16 kernels) and int8
(weight-only dynamic quantisation of the Linear layers).

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


def vector_space(model_version: str, precision: str | Precision = Precision.FP32) -> str:
    """The name vectors of `model_version` at `precision` are cached under: the model version
    itself at fp32 (so caches written before precisions existed stay valid), else
    `<model_version>@<precision>`."""
    p = parse_precision(precision)
    return model_version if p is Precision.FP32 else f"{model_version}@{p.value}"


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
    back to fp32; int8 dynamic quantisation is a CPU path (torch has no CUDA kernels for it)."""
    p = parse_precision(requested)
    if p is Precision.BF16 and not device.startswith("cuda"):
        ok, why = bf16_support()
        return (p, why) if ok else (Precision.FP32, f"bf16 asked for, fp32 used: {why}")
    if p is Precision.INT8 and device.startswith("cuda"):
        return Precision.FP32, "int8 asked for, fp32 used: dynamic int8 quantisation runs on the CPU only"
    return p, "as asked"


# Modules that pass their Linear children's weights to a functional op (F.multi_head_attention_forward).
_READS_LINEAR_WEIGHTS = {"AttentionPool2d"}


def quantise_linear_int8(model):
    """Weight-only dynamic int8 quantisation of every `nn.Linear` (int8 weights with a scale per
    output channel; activations quantised per call, per tensor), in place; returns
    (model, quantised, kept): how many Linear layers were quantised and how many stay fp32.

    What stays fp32: `nn.MultiheadAttention` (open_clip's ViT and text towers) holds its input
    projection as a bare parameter and its output projection as a NonDynamicallyQuantizableLinear,
    which torch leaves alone by design; so is every non-Linear layer (embeddings, LayerNorm,
    convolutions such as a ViT's patch embedding), and the Linear layers of open_clip's
    ModifiedResNet attention pool, which hands their weights to a functional op. HF towers (BERT,
    CLIP, SigLIP) build attention from plain Linear layers, which are quantised."""
    import warnings

    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

    # Linear layers whose owner reads their `.weight` tensors itself instead of calling them
    # (open_clip's ModifiedResNet attention pool, the demo's image tower) must stay fp32.
    reads_weights = {name for name, m in model.named_modules() if type(m).__name__ in _READS_LINEAR_WEIGHTS}
    targets = [
        name for name, m in model.named_modules()
        if type(m) is torch.nn.Linear and not any(name.startswith(owner + ".") for owner in reads_weights)
    ]
    with warnings.catch_warnings():
        # torch 2.x deprecates its eager-mode quantised tensors in favour of torchao, and says so
        # on every layer; the kernels are the ones torch ships and measures (docs/design.md).
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        # Per output channel weight scales: MiniLM (the demo's text tower) loses far less than
        # with one scale per tensor (cosine to fp32 over 60 demo titles: min 0.958 against 0.842).
        model = torch.ao.quantization.quantize_dynamic(
            model, dict.fromkeys(targets, torch.ao.quantization.per_channel_dynamic_qconfig), dtype=torch.qint8,
            inplace=True,
        )
    quantised = 0
    for module in model.modules():
        if type(module) is DynamicQuantLinear:
            # open_clip reads a block's weight dtype to cast activations; a quantised Linear's
            # `weight` is a method, and this attribute is what open_clip looks for instead.
            module.int8_original_dtype = torch.float32
            quantised += 1
    kept = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    return model, quantised, kept


def apply_precision(model, precision: Precision, *, label: str):
    """`model` ready to run at `precision` (int8: quantised in place; fp32/bf16: unchanged, bf16
    is an autocast at encode time). One log line says what was done."""
    if precision is Precision.INT8:
        model, quantised, kept = quantise_linear_int8(model)
        log.info("%s: int8 weights in %d Linear layers; %d Linear layers (attention projections torch or "
                 "open_clip use as plain tensors) and the non-Linear layers stay fp32", label, quantised, kept)
    return model
