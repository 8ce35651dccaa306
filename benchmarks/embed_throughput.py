"""End-to-end image embedding throughput vs the model's bare forward pass, on the same batches.

    end-to-end = read file + sha256 + decode + preprocess (worker threads) + encode + write cache shard
    bare       = model.encode_image on already preprocessed tensors, nothing else

Both run in one process, alternating, on identical batches; the ratio is the figure of merit
(target: end-to-end >= 0.9 x bare). Usage:

    python benchmarks/embed_throughput.py [--model ViT-B-32:random] [-n 256] [--batch-size 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def machine_info() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("-n", type=int, default=256, help="images")
    parser.add_argument("--image-size", type=int, default=256, help="side of the catalog images in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "embed_throughput.json")
    args = parser.parse_args()

    import warnings

    import torch

    from embedder import VectorCache, decode_image, load_embedder, read_image_bytes
    from sample_catalog import make_catalog

    warnings.filterwarnings("ignore", message=".*random weights.*")
    work = Path(tempfile.mkdtemp(prefix="prism-bench-"))
    make_catalog(work / "catalog", args.n, image_size=args.image_size)
    paths = sorted(str(p) for p in (work / "catalog" / "images").glob("*.png"))[: args.n]
    embedder = load_embedder(args.model, device=args.device)
    batches = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    tensors = [
        embedder.stack([embedder.preprocess(decode_image(read_image_bytes(p, embedder.image_limits), embedder.image_limits)) for p in b])
        for b in batches
    ]
    model = embedder.model

    def bare() -> float:
        started = time.perf_counter()
        with torch.inference_mode(), embedder.autocast():
            for t in tensors:
                model.encode_image(t.to(embedder.device)).float().cpu()
        return len(paths) / (time.perf_counter() - started)

    def end_to_end(round_no: int) -> float:
        cache = VectorCache(work / f"cache-{round_no}", embedder.dim)  # fresh: every image is really encoded
        started = time.perf_counter()
        encoded = 0
        for batch in embedder.embed_images(((p, p) for p in paths), batch_size=args.batch_size, cache=cache):
            encoded += batch.encoded
        cache.flush()
        elapsed = time.perf_counter() - started
        assert encoded == len(paths), encoded
        return len(paths) / elapsed

    with torch.inference_mode():  # warm-up: first-call allocations are not throughput
        model.encode_image(tensors[0].to(embedder.device))
    bare_runs, e2e_runs = [], []
    for r in range(args.rounds):
        bare_runs.append(bare())
        e2e_runs.append(end_to_end(r))
    bare_ips, e2e_ips = statistics.median(bare_runs), statistics.median(e2e_runs)
    result = {
        "benchmark": "embed_throughput",
        "model": args.model,
        "device": embedder.device,
        "images": len(paths),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "bare_forward_images_per_s": round(bare_ips, 2),
        "end_to_end_images_per_s": round(e2e_ips, 2),
        "ratio_end_to_end_over_bare": round(e2e_ips / bare_ips, 3),
        "target_ratio": 0.9,
        "runs": {"bare": [round(x, 2) for x in bare_runs], "end_to_end": [round(x, 2) for x in e2e_runs]},
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"embedding throughput: {args.model}, {len(paths)} images, batch {args.batch_size}, {embedder.device}")
    table.add_column("path")
    table.add_column("images/s", justify="right")
    table.add_column("runs", justify="right")
    table.add_row("bare forward", f"{bare_ips:.2f}", ", ".join(f"{x:.2f}" for x in bare_runs))
    table.add_row("end-to-end", f"{e2e_ips:.2f}", ", ".join(f"{x:.2f}" for x in e2e_runs))
    table.add_row("ratio", f"{e2e_ips / bare_ips:.3f}", "target >= 0.9")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
