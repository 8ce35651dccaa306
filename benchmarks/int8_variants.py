"""Where the demo text tower (MiniLM-L6) loses its ranking under int8, and what each fix costs.

torch's dynamic int8 (`quantize_dynamic`: int8 weights with a scale per output channel,
activations quantised per call with one scale per tensor), which Prism shipped until 2026-12-02,
kept 2x the fp32 speed at batch 1 on the demo's text tower but agreed with fp32 on only ~0.75-0.85
of each query's top 10. `embedder.precision.quantise_linear_int8` now quantises activations per
token and smooths from calibration texts ("per token" rows). This measures, side by side in one run:

    sensitivity   each Linear layer quantised alone: the mean cosine error (1 - cos to fp32) it
                  adds to the query vectors (--sensitivity)
    variants      which layers are quantised, and SmoothQuant-style smoothing (Xiao et al. 2023):
                  per input channel, activations divided by s and weights multiplied by s,
                  s = amax(X)^a / amax(W)^(1-a) from calibration texts, so that the per-tensor
                  activation scale is no longer set by a few outlier channels
    per variant   q/s at batch 1 (blocks alternating over the variants: noise hits each alike),
                  top-10 overlap with fp32 over a gallery of demo titles, queries encoded one at a
                  time as a server encodes them, against (a) the fp32 gallery and (b) the gallery
                  encoded at that variant in batches of 128 (what an index built at it holds);
                  cosine of each query vector with its fp32 vector (min, mean)

Queries, gallery and calibration texts are disjoint slices of the demo-style emoji names.

    python benchmarks/int8_variants.py [--queries 100] [--gallery 600] [--sensitivity]

Writes benchmarks/results/int8_variants.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

# name -> (regex over the text tower's Linear layer names to quantise, smoothing alpha or None)
VARIANTS = {
    "all Linear, per tensor (before)": (r".", None),
    "encoder only (projection fp32)": (r"^transformer\.", None),
    "attention only (FFN fp32)": (r"attention\.(self\.(query|key|value)|output\.dense)$", None),
    "FFN only": (r"(intermediate\.dense|layer\.\d+\.output\.dense)$", None),
    "encoder, smoothed a=0.8": (r"^transformer\.", 0.8),
    "encoder, smoothed a=0.9": (r"^transformer\.", 0.9),
}


def _top10(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--gallery", type=int, default=600)
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--sensitivity", action="store_true", help="also quantise each Linear layer alone")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "int8_variants.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from embedder import wrap_open_clip
    from embedder.factory import create_base_model
    from embedder.precision import SMOOTHING_ALPHA
    from encoder_precision import demo_titles

    threads = int(os.environ.get("PRISM_THREADS") or 2)
    torch.set_num_threads(threads)
    base, preprocess, tokenizer = create_base_model("prism-demo-minilm", device="cpu")
    fp32_text = base.text
    titles = demo_titles(args.gallery + args.queries + args.calibration)
    gallery = titles[: args.gallery]
    queries = titles[args.gallery : args.gallery + args.queries]
    calibration = titles[args.gallery + args.queries :]

    def embedder(text_tower):
        # A shallow copy of the model per text tower (sharing the image tower), so that every
        # variant's embedder stays usable at once for the alternating timing blocks.
        model = copy.copy(base)
        model._modules = dict(base._modules)
        model.text = text_tower
        return wrap_open_clip(model, preprocess, tokenizer, name="prism-demo-minilm", precision="fp32")

    def one_by_one(e, texts) -> np.ndarray:
        return np.concatenate([e.encode_texts([t]) for t in texts])

    fp32 = embedder(fp32_text)
    fp32_gallery = fp32.encode_texts(gallery, batch_size=128)
    fp32_queries = one_by_one(fp32, queries)
    fp32_rank = _top10(fp32_queries, fp32_gallery)
    linear_names = [n for n, m in fp32_text.named_modules() if type(m) is torch.nn.Linear]

    # Per input channel |activation| maxima of every Linear layer over the calibration texts.
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in fp32_text.named_modules():
        if type(module) is torch.nn.Linear:
            def hook(_m, inputs, _out, name=name):
                x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
                amax[name] = torch.maximum(amax[name], x) if name in amax else x
            hooks.append(module.register_forward_hook(hook))
    for text in calibration:
        fp32.encode_texts([text])
    for h in hooks:
        h.remove()

    class Smoothed(torch.nn.Module):
        def __init__(self, inverse: torch.Tensor, linear):
            super().__init__()
            self.register_buffer("inverse", inverse)
            self.linear = linear

        def forward(self, x):
            return self.linear(x * self.inverse)

    def quantised(pattern: str, alpha: float | None):
        tower = copy.deepcopy(fp32_text)
        modules = dict(tower.named_modules())
        targets = [n for n in linear_names if re.search(pattern, n)]
        for name in targets:
            linear = modules[name]
            wrapped = torch.nn.Sequential(linear)
            inverse = None
            if alpha is not None:
                s = (amax[name].clamp(min=1e-5) ** alpha / linear.weight.abs().amax(0).clamp(min=1e-5) ** (1 - alpha))
                s = s.clamp(min=1e-5)
                linear.weight.data *= s[None, :]
                inverse = 1.0 / s
            q = torch.ao.quantization.quantize_dynamic(
                wrapped, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8
            )[0]
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else tower, child, q if inverse is None else Smoothed(inverse, q))
        return tower, len(targets)

    result = {
        "benchmark": "int8_variants",
        "model": "prism-demo-minilm (all-MiniLM-L6-v2 text tower + projection)",
        "queries": len(queries), "gallery": len(gallery), "calibration": len(calibration),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": threads,
                    "load_average_at_start": os.getloadavg()[0]},
        "variants": {},
    }
    if args.sensitivity:
        errors = {}
        for name in linear_names:
            tower, _ = quantised(re.escape(name) + "$", None)
            v = embedder(tower).encode_texts(queries)
            errors[name] = round(float(np.mean(1 - (v * fp32_queries).sum(1))), 6)
        result["sensitivity_mean_cosine_error"] = dict(sorted(errors.items(), key=lambda kv: -kv[1]))

    def per_token(smoothed: bool):
        """What Prism ships (`quantise_linear_int8`), smoothed from its own calibration texts or not."""
        from embedder.precision import quantise_linear_int8

        tower = copy.deepcopy(fp32_text)
        _, layers, _, _ = quantise_linear_int8(tower, embedder(tower).calibration_pass if smoothed else None)
        return tower, layers

    towers = {"fp32": (fp32_text, 0)} | {name: quantised(*spec) for name, spec in VARIANTS.items()} | {
        "all Linear, per token": per_token(False),
        f"all Linear, per token, smoothed a={SMOOTHING_ALPHA} (shipped)": per_token(True),
    }
    embedders = {name: embedder(tower) for name, (tower, _) in towers.items()}
    times: dict[str, list[float]] = {name: [] for name in embedders}
    for e in embedders.values():
        for text in queries[:5]:
            e.encode_texts([text])  # first calls allocate
    for start in range(0, len(queries), 10):
        for name, e in embedders.items():
            for text in queries[start : start + 10]:
                t0 = time.perf_counter()
                e.encode_texts([text])
                times[name].append(time.perf_counter() - t0)
    fp32_p50 = statistics.median(times["fp32"])
    for name, e in embedders.items():
        q = one_by_one(e, queries)
        own_gallery = e.encode_texts(gallery, batch_size=128)
        cos = (q * fp32_queries).sum(1)
        p50 = statistics.median(times[name])
        result["variants"][name] = {
            "quantised_linear_layers": towers[name][1],
            "p50_ms_batch1": round(p50 * 1000, 2),
            "speedup_vs_fp32": round(fp32_p50 / p50, 2),
            "top10_overlap_vs_fp32_on_fp32_gallery": _overlap(_top10(q, fp32_gallery), fp32_rank),
            "top10_overlap_vs_fp32_on_own_gallery": _overlap(_top10(q, own_gallery), fp32_rank),
            "cosine_vs_fp32_min": round(float(cos.min()), 5),
            "cosine_vs_fp32_mean": round(float(cos.mean()), 5),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'variant':<44} {'layers':>6} {'p50 ms':>7} {'x fp32':>6} {'top10 fp32 gal':>14} {'top10 own gal':>13} {'cos min':>8} {'cos mean':>8}")
    for name, row in result["variants"].items():
        print(f"{name:<44} {row['quantised_linear_layers']:>6} {row['p50_ms_batch1']:>7} {row['speedup_vs_fp32']:>6} "
              f"{row['top10_overlap_vs_fp32_on_fp32_gallery']:>14} {row['top10_overlap_vs_fp32_on_own_gallery']:>13} "
              f"{row['cosine_vs_fp32_min']:>8} {row['cosine_vs_fp32_mean']:>8}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
