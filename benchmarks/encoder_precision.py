"""Encoder precision: text-encoder q/s at batch 1 (a search query) and ranking agreement with fp32.

For each model, the text tower at fp32, int8 (Linear weights quantised, `embedder.precision`) and
bf16 (CPU autocast; only where the CPU has native bf16 kernels, else reported unsupported):

    q/s        one query per call, the queries round-robin over the precisions in blocks so that
               machine noise hits each alike; torch threads as PRISM_THREADS (default 2)
    top-10     mean overlap of each query's top 10 over a gallery of demo titles, the gallery and
               the query embedded at that precision (what an index built at it serves), against fp32
    cosine     of each query's vector at that precision with its fp32 vector (min, mean)

Models: the demo architecture (`prism-demo-minilm`: the pretrained all-MiniLM-L6-v2 text tower the
demo model locks, LiT-style; the demo's trained projection is one Linear more, so its speed is
this one's) or a trained demo model version with `--demo-home`, and ViT-B-32's text tower
(`ViT-B-32:random`: speed and quantisation noise do not depend on the weights' values).
Queries: demo-style emoji names (the `emoji` package's English names, as the demo titles are).

    python benchmarks/encoder_precision.py [--queries 120] [--gallery 800] [--demo-home prism-data]
                                          [--image-queries 30]

With --demo-home, each precision's held-out recall@10 (the demo's test split, both towers at that
precision, as `prism eval --precision` computes it); with --image-queries, the image tower's
batch-1 speed and cosine to fp32 at each precision.

Writes benchmarks/results/encoder_precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

PRECISIONS = ("fp32", "int8", "bf16")


def demo_titles(n: int) -> list[str]:
    """Distinct English emoji names (no skin-tone variants), in the package's order."""
    import emoji

    seen: dict[str, None] = {}
    for data in emoji.EMOJI_DATA.values():
        name = data["en"].strip(":").replace("_", " ")
        if "skin tone" not in name and name not in seen:
            seen[name] = None
    return list(seen)[:n]


def load(model: str, precision: str, demo_home: Path | None):
    from embedder import load_embedder, wrap_open_clip
    from embedder.factory import create_base_model

    if model == "demo" and demo_home is None:
        base, preprocess, tokenizer = create_base_model("prism-demo-minilm", device="cpu")
        return wrap_open_clip(base, preprocess, tokenizer, name="prism-demo-minilm", precision=precision)
    spec = "demo" if model == "demo" else model
    models_dir = demo_home / "models" if demo_home else None
    return load_embedder(spec, device="cpu", models_dir=models_dir, precision=precision)


def top10(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]


def image_tower(embedders: dict, n: int) -> dict:
    """The image tower at each precision: batch-1 images/s over `n` seeded random pictures (speed
    does not depend on the pixels), blocks alternating, and cosine with the fp32 vectors."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]
    vectors = {p: e.encode_images(images) for p, e in embedders.items()}
    times: dict[str, list[float]] = {p: [] for p in embedders}
    for e in embedders.values():
        e.encode_images(images[:2])
    for start in range(0, n, 5):
        for p, e in embedders.items():
            for image in images[start : start + 5]:
                t0 = time.perf_counter()
                e.encode_images([image])
                times[p].append(time.perf_counter() - t0)
    fp32 = statistics.median(times["fp32"])
    out = {}
    for p in embedders:
        cos = (vectors[p] * vectors["fp32"]).sum(axis=1)
        out[p] = {"images_per_s_batch1": round(1.0 / statistics.median(times[p]), 1),
                  "speedup_vs_fp32": round(fp32 / statistics.median(times[p]), 2),
                  "cosine_vs_fp32_min": round(float(cos.min()), 5), "cosine_vs_fp32_mean": round(float(cos.mean()), 5)}
    return out


def held_out_recall(embedders: dict, demo_home: Path) -> dict:
    """Recall@10 and MRR on the demo's held-out test split (`prism eval`'s numbers), both towers at
    each precision: text->image (a shopper's query) and image->text."""
    from feedback import evaluate_demo
    from indexer import load_demo_catalog

    catalog = load_demo_catalog(demo_home / "demo")
    out = {}
    for p, e in embedders.items():
        report = evaluate_demo(e, catalog)["test"]
        out[p] = {"queries": report.text_to_image.queries, "gallery": report.gallery,
                  "text_to_image_recall_at_10": round(report.text_to_image.at(10), 4),
                  "text_to_image_mrr": round(report.text_to_image.mrr, 4),
                  "image_to_text_recall_at_10": round(report.image_to_text.at(10), 4)}
    for p, row in out.items():
        row["text_to_image_recall_at_10_points_vs_fp32"] = round(
            100 * (row["text_to_image_recall_at_10"] - out["fp32"]["text_to_image_recall_at_10"]), 2)
    return out


def measure(model: str, args, bf16_ok: bool) -> dict:
    titles = demo_titles(args.gallery + args.queries)
    gallery_texts, query_texts = titles[: args.gallery], titles[args.gallery :]
    wanted = [p for p in PRECISIONS if p != "bf16" or bf16_ok]
    embedders = {p: load(model, p, args.demo_home) for p in wanted}
    used = {p: e.precision for p, e in embedders.items()}
    rankings, vectors = {}, {}
    for p, e in embedders.items():
        vectors[p] = e.encode_texts(query_texts)
        rankings[p] = top10(vectors[p], e.encode_texts(gallery_texts, batch_size=128))
    times: dict[str, list[float]] = {p: [] for p in embedders}
    for p, e in embedders.items():  # warm-up: first calls allocate
        for q in query_texts[:5]:
            e.encode_texts([q])
    block = 10
    for start in range(0, len(query_texts), block):
        for p, e in embedders.items():
            for q in query_texts[start : start + block]:
                t0 = time.perf_counter()
                e.encode_texts([q])
                times[p].append(time.perf_counter() - t0)
    out = {"model": model, "gallery": len(gallery_texts), "queries": len(query_texts), "precisions": {}}
    for p in embedders:
        overlap = [len(set(a) & set(b)) / 10 for a, b in zip(rankings[p], rankings["fp32"])]
        cos = (vectors[p] * vectors["fp32"]).sum(axis=1)
        out["precisions"][p] = {
            "used": used[p],
            "qps_batch1": round(1.0 / statistics.median(times[p]), 1),
            "p50_ms": round(statistics.median(times[p]) * 1000, 2),
            "top10_overlap_vs_fp32": round(float(np.mean(overlap)), 4),
            "cosine_vs_fp32_min": round(float(cos.min()), 5),
            "cosine_vs_fp32_mean": round(float(cos.mean()), 5),
        }
    fp32_qps = out["precisions"]["fp32"]["qps_batch1"]
    for p, row in out["precisions"].items():
        row["speedup_vs_fp32"] = round(row["qps_batch1"] / fp32_qps, 2)
    if args.image_queries:
        out["image_tower"] = image_tower(embedders, args.image_queries)
    if model == "demo" and args.demo_home is not None:
        out["held_out"] = held_out_recall(embedders, args.demo_home)
    if not bf16_ok:
        out["precisions"]["bf16"] = {"unsupported": True}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["demo", "ViT-B-32:random"])
    parser.add_argument("--queries", type=int, default=120)
    parser.add_argument("--gallery", type=int, default=800)
    parser.add_argument("--demo-home", type=Path, default=None, help="a home where `prism demo` trained `demo`; "
                        "adds the held-out test split's recall@10 at each precision")
    parser.add_argument("--image-queries", type=int, default=0, help="also time the image tower on this many images")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "encoder_precision.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*random weights.*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from embedder import bf16_support

    threads = int(os.environ.get("PRISM_THREADS") or 2)
    torch.set_num_threads(threads)
    bf16_ok, bf16_why = bf16_support()
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": threads, "load_average_at_start": os.getloadavg()[0]},
        "bf16": {"supported": bf16_ok, "why": bf16_why},
        "models": [measure(m, args, bf16_ok) for m in args.models],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"bf16: {'supported' if bf16_ok else 'unsupported on this CPU'} ({bf16_why}); torch threads {threads}")
    print(f"{'model':<18} {'precision':<9} {'q/s b=1':>8} {'p50 ms':>7} {'x fp32':>7} {'top10':>6} {'cos min':>8}")
    for m in result["models"]:
        for p, row in m["precisions"].items():
            if row.get("unsupported"):
                print(f"{m['model']:<18} {p:<9} unsupported on this CPU")
                continue
            print(f"{m['model']:<18} {p:<9} {row['qps_batch1']:>8} {row['p50_ms']:>7} {row['speedup_vs_fp32']:>7} "
                  f"{row['top10_overlap_vs_fp32']:>6} {row['cosine_vs_fp32_min']:>8}")
    for m in result["models"]:
        for p, row in m.get("image_tower", {}).items():
            print(f"{m['model']:<18} {p:<9} image tower: {row['images_per_s_batch1']} img/s b=1, x{row['speedup_vs_fp32']}, "
                  f"cos min {row['cosine_vs_fp32_min']}")
        for p, row in m.get("held_out", {}).items():
            print(f"{m['model']:<18} {p:<9} held-out recall@10 text->image {row['text_to_image_recall_at_10']} "
                  f"({row['text_to_image_recall_at_10_points_vs_fp32']:+} points vs fp32), image->text "
                  f"{row['image_to_text_recall_at_10']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
