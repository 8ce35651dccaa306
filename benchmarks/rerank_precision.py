"""What limits Prism's IVF-PQ at 1M vectors: the candidates the scan finds, or the precision of the
re-rank that orders them? One index, one set of candidates, several re-rank codes, side by side.

Issue 16 asks for HNSW32's batch-1 q/s (3,085 at 1M x 512) at recall@10 >= 0.95 within 0.25x the
bytes of float32 vectors. Prism's tuner reaches 0.95 at nprobe 64 (~1.5 ms a query). This script
builds the index as `prism index` does (`AnnIndex.build`), takes each held-out query's k x 8
fast-scan candidates at several nprobe, and ranks the same candidates by:

  exact            the float vectors: recall is what the candidates hold (the scan's limit)
  residual-SQ6     what Prism stores from 500k vectors (6 bits a dimension of x - b, 384 B)
  SQ6 per-vector   the residual divided by its own norm before the 6-bit code, the norm kept
                   beside it (388 B): ranges fit every vector, not the widest
  residual-SQ8     8 bits a dimension (512 B): over the memory budget with the IVF-PQ codes
  residual-SQ4     4 bits a dimension (256 B)

b (the IVF-PQ reconstruction's score) is read off the scan's distance in every column, as
`AnnIndex._rerank` does. Also reported: the scan's time per query (batch 1, one thread) at each
nprobe, and each re-rank code's index bytes as a share of float32 (IVF-PQ codes, ids, norms and
re-rank codes).

Then what a user gets from each re-rank setting Prism offers (`PRISM_RERANK_COMPACT_FROM`):
the index built again with 8-bit residuals, both builds tuned on the same queries, and each
measured at its tuned setting on the held-out queries (recall@10, batch-1 single-thread q/s,
alternating rounds). Prints tables and writes JSON.

    python benchmarks/rerank_precision.py              # 1,000,000 x 512 CLIP-shaped vectors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

QUERIES = 1000
FACTOR = 8
NPROBES = (16, 32, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "rerank_precision.json")
    args = parser.parse_args()

    import faiss

    from ann_scale import ClipLikeWorld, qps, recall
    from embed_throughput import machine_info
    from indexer.ann import AnnConfig, AnnIndex, residual_quantizer

    d, k = 512, 10
    world = ClipLikeWorld(d, clusters=max(1, args.n // 100))
    x = world.draw(args.n, seed=1)
    queries = world.draw(QUERIES, seed=2)
    _, truth = faiss.knn(queries, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    tuning, held = queries[: QUERIES // 2], np.arange(QUERIES // 2, QUERIES)
    started = time.perf_counter()
    # 6-bit residuals as Prism stores them from 500,000 vectors; at a smaller --n too, so that the
    # columns are what they say.
    ann = AnnIndex.build(x, np.arange(args.n, dtype=np.int64),
                         AnnConfig(compact_threshold=min(args.n, AnnConfig().compact_threshold)), tuning_queries=tuning)
    print(f"built {ann.info.factory} + {ann.info.rerank_store} in {time.perf_counter() - started:.0f} s; "
          f"tuned nprobe {ann.info.nprobe} x{ann.info.rerank_factor}", flush=True)
    ivf = faiss.extract_index_ivf(ann.index)
    residuals = np.empty_like(x)
    for lo in range(0, args.n, 100_000):
        hi = min(args.n, lo + 100_000)
        residuals[lo:hi] = x[lo:hi] - ivf.reconstruct_batch(np.arange(lo, hi, dtype=np.int64))
    norms = np.linalg.norm(residuals, axis=1, keepdims=True).astype(np.float32)

    def codec(bits: str, data: np.ndarray):
        sq = residual_quantizer(d, bits)  # as a build makes it
        sq.train(data[:200_000])
        sq.add(data)
        return sq

    codes = {"residual-SQ6": (ann.refine, None), "SQ6 per-vector": (codec("SQ6", residuals / np.maximum(norms, 1e-12)), norms),
             "residual-SQ8": (codec("SQ8", residuals), None), "residual-SQ4": (codec("SQ4", residuals), None)}
    del residuals
    ann.ids()  # the sorted ids a serving index holds, counted in its bytes
    other_bytes = sum(v for name, v in _index_bytes(ann).items() if name != "rerank_codes")
    shares = {name: round((other_bytes + args.n * (sq.code_size + (4 if scale is not None else 0))) / (args.n * d * 4), 3)
              for name, (sq, scale) in codes.items()}

    rows = []
    fetch = k * FACTOR
    q = queries[held]
    for nprobe in NPROBES:
        distances, positions = ann._ivf_candidates(q, fetch, nprobe, None)
        scan_us = 1e6 / qps(lambda b, nprobe=nprobe: ann._ivf_candidates(b, fetch, nprobe, None), q, 1)
        base = (1.0 + ann.base_norms[positions] - distances) * 0.5

        def ranked(scores: np.ndarray) -> np.ndarray:
            return np.take_along_axis(positions, np.argsort(-scores, axis=1)[:, :k], axis=1)

        row = {"nprobe": nprobe, "scan_us": round(scan_us, 1),
               "exact": round(recall(ranked(np.einsum("qfd,qd->qf", x[positions], q)), truth[held]), 4)}
        for name, (sq, scale) in codes.items():
            r = sq.reconstruct_batch(positions.reshape(-1)).reshape(len(q), fetch, d)
            if scale is not None:
                r *= scale[positions]
            row[name] = round(recall(ranked(base + np.einsum("qfd,qd->qf", r, q)), truth[held]), 4)
        rows.append(row)
        print(row, flush=True)

    print_table(args.n, ann.info.factory, rows, shares)
    del codes
    started = time.perf_counter()
    wide = AnnIndex.build(x, np.arange(args.n, dtype=np.int64), AnnConfig(compact_threshold=args.n + 1),
                          tuning_queries=tuning)
    print(f"built {wide.info.factory} + {wide.info.rerank_store} in {time.perf_counter() - started:.0f} s; "
          f"tuned nprobe {wide.info.nprobe} x{wide.info.rerank_factor}", flush=True)
    wide.ids()
    settings = _tuned_side_by_side({"residual-SQ6": ann, "residual-SQ8": wide}, q, truth[held])
    for name, index in (("residual-SQ6", ann), ("residual-SQ8", wide)):
        settings[name]["bytes_vs_float32"] = round(sum(_index_bytes(index).values()) / (args.n * d * 4), 3)
    print_settings(settings)
    result = {"benchmark": "rerank_precision", "n": args.n, "dim": d, "factory": ann.info.factory,
              "tuned": {"nprobe": ann.info.nprobe, "rerank_factor": ann.info.rerank_factor},
              "rerank_factor": FACTOR, "held_out_queries": len(held), "bytes_vs_float32": shares, "rows": rows,
              "settings": settings, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _tuned_side_by_side(indexes: dict, queries: np.ndarray, truth: np.ndarray, rounds: int = 3) -> dict:
    """Each index at its tuned setting: recall@10, and batch-1 q/s as the median of alternating rounds."""
    from ann_scale import qps, recall

    speeds: dict[str, list[float]] = {name: [] for name in indexes}
    for _ in range(rounds):
        for name, index in indexes.items():
            speeds[name].append(qps(lambda b, index=index: index.search(b, 10), queries, 1, 2.0))
    return {name: {"nprobe": index.info.nprobe, "rerank_factor": index.info.rerank_factor,
                   "recall_at_10": round(recall(index.search(queries, 10)[1], truth), 4),
                   "qps_b1": round(float(np.median(speeds[name])), 1)} for name, index in indexes.items()}


def print_settings(settings: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="each re-rank setting at its tuned point (held-out queries)")
    for column in ("re-rank", "bytes vs float32", "tuned", "recall@10", "q/s b1"):
        table.add_column(column, justify="right")
    for name, r in settings.items():
        table.add_row(name, f"{r['bytes_vs_float32']:.3f}", f"nprobe {r['nprobe']} x{r['rerank_factor']}",
                      f"{r['recall_at_10']:.4f}", f"{r['qps_b1']:.0f}")
    Console().print(table)


def _index_bytes(ann) -> dict:
    from scale import index_parts_mb

    return {name: mb * 1024 * 1024 for name, mb in index_parts_mb(ann).items()}


def print_table(n: int, factory: str, rows: list[dict], shares: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(shares)
    table = Table(title=f"recall@10 of the same {FACTOR * 10} candidates per query, by re-rank code: {n:,} x 512, {factory}")
    table.add_column("nprobe", justify="right")
    table.add_column("scan us", justify="right")
    table.add_column("exact", justify="right")
    for name in names:
        table.add_column(f"{name} ({shares[name]:.3f}x)", justify="right")
    for r in rows:
        table.add_row(str(r["nprobe"]), f"{r['scan_us']:.0f}", f"{r['exact']:.4f}", *(f"{r[name]:.4f}" for name in names))
    Console().print(table)


if __name__ == "__main__":
    main()
