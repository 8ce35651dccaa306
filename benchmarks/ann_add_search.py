"""How widely an add walks the HNSW coarse quantizer (`AnnConfig.add_ef_search`), against the add's
time and the index's recall, in one run.

From 4,096 lists (about 2.1M vectors) an IVF-PQ build finds each vector's list through an HNSW
graph over the centroids, the same graph the queries walk. The add is most of a large build (10M:
1,080 s of 1,318), and most of the add is that walk. A narrower walk is faster but may put a vector
in a list that is not its nearest; the queries then miss it unless they probe more lists, which the
tuner pays for in nprobe. So each setting is reported three ways:

  add s            the build's add stage (codes, re-rank codes, the tuner's exact top-10)
  recall fixed     recall@10 of held-out queries at one fixed (nprobe, re-rank depth) for all
                   builds: what the list assignment alone costs
  tuned            the tuner's choice (depth, nprobe), its recall on held-out queries and batch-1
                   single-thread q/s there: what a user of the build gets

Vectors are CLIP-shaped (`ann_scale.clip_like`), held in memory (4.5 GB at 2.2M); truth is exact
search. Prints a table and writes JSON.

    python benchmarks/ann_add_search.py                       # 2,200,000 x 512, efSearch 32 and 64
    python benchmarks/ann_add_search.py --n 2200000 --ef 16 --ef 32 --ef 64
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

FIXED_NPROBE, FIXED_FACTOR = 64, 8
QUERIES = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_200_000, help="vectors (from ~2.1M a build uses the HNSW quantizer)")
    parser.add_argument("--ef", type=int, action="append", help="add-time efSearch values (repeatable); default 32, 64")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ann_add_search.json")
    args = parser.parse_args()
    settings = args.ef or [32, 64]

    import faiss

    from ann_scale import ClipLikeWorld, qps, recall
    from embed_throughput import machine_info
    from indexer.ann import AnnConfig, AnnIndex, plan_factory

    d = 512
    plan = plan_factory(args.n, d, AnnConfig())
    if "_HNSW" not in plan.factory:
        raise SystemExit(f"{args.n:,} vectors get {plan.factory}: no HNSW quantizer, nothing to measure (use --n >= 2,100,000)")
    world = ClipLikeWorld(d, clusters=max(1, args.n // 100))
    started = time.perf_counter()
    x = world.draw(args.n, seed=1)
    queries = world.draw(QUERIES, seed=2)
    _, truth = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    print(f"{args.n:,} vectors and exact truth in {time.perf_counter() - started:.0f} s; plan {plan.factory}", flush=True)
    tuning, held_out = queries[: QUERIES // 2], np.arange(QUERIES // 2, QUERIES)
    ids = np.arange(args.n, dtype=np.int64)

    rows = []
    for ef in settings:
        print(f"building with add_ef_search={ef} ...", flush=True)
        ann = AnnIndex.build(x, ids, AnnConfig(add_ef_search=ef), tuning_queries=tuning)
        stages = ann.info.tuning["stage_seconds"]
        fixed = ann.search(queries[held_out], 10, nprobe=FIXED_NPROBE, rerank_factor=FIXED_FACTOR)[1]
        tuned = ann.search(queries[held_out], 10)[1]
        search = lambda q, ann=ann: ann.search(q, 10)  # noqa: E731
        row = {
            "add_ef_search": ef, "add_s": stages["add"], "build_s": ann.info.build_seconds,
            "recall_fixed": round(recall(fixed, truth[held_out]), 4),
            "tuned_nprobe": ann.info.nprobe, "tuned_rerank_factor": ann.info.rerank_factor,
            "tuned_recall_tuner": ann.info.recall_at_10, "tuned_recall_held_out": round(recall(tuned, truth[held_out]), 4),
            "tuned_qps_b1": round(qps(search, queries[held_out], 1), 1), "stage_seconds": stages,
        }
        rows.append(row)
        print(f"  add {row['add_s']:.0f} s, recall at nprobe {FIXED_NPROBE} x{FIXED_FACTOR} {row['recall_fixed']:.4f}, "
              f"tuned nprobe {row['tuned_nprobe']} x{row['tuned_rerank_factor']}: {row['tuned_recall_held_out']:.4f}, "
              f"{row['tuned_qps_b1']:.0f} q/s", flush=True)
        del ann

    print_table(args.n, plan.factory, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "ann_add_search", "n": args.n, "dim": d, "factory": plan.factory, "queries": QUERIES,
              "held_out": len(held_out), "fixed": {"nprobe": FIXED_NPROBE, "rerank_factor": FIXED_FACTOR},
              "rows": rows, "machine": machine_info()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def print_table(n: int, factory: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"add-time efSearch: {n:,} x 512, {factory}")
    for column in ("efSearch", "add s", f"recall@10 nprobe {FIXED_NPROBE} x{FIXED_FACTOR}", "tuned", "recall@10 tuned",
                   "q/s b1 tuned"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["add_ef_search"]), f"{r['add_s']:.0f}", f"{r['recall_fixed']:.4f}",
                      f"nprobe {r['tuned_nprobe']} x{r['tuned_rerank_factor']}", f"{r['tuned_recall_held_out']:.4f}",
                      f"{r['tuned_qps_b1']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
