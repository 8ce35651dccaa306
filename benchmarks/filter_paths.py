"""Filtered ANN search: a filter applied after an over-fetched scan against a FAISS selector.

`AnnIndex.search` applies a filter (or the deletion mask) that leaves at least
`POST_FILTER_MIN_KEPT_SHARE` of the index after the scan: it fetches `k x factor / share` candidates
unfiltered and drops the rest by the filter's bitmap; narrower filters pass an `IDSelectorBitmap`
to the fast-scan IVF search. This script measures both paths on the same index and queries, for
filters keeping 5%, 10% and 50% of the vectors, with the unfiltered search as the baseline: CPU
time per query (process time, so other jobs on the host inflate it less than wall time), one
faiss thread, batch 1, and the top-10 overlap of the two paths.

    python benchmarks/filter_paths.py                 # 200k CLIP-like vectors (~1 minute)
    python benchmarks/filter_paths.py -n 1000000      # the 1M of ann_scale --full

Prints a table and writes benchmarks/results/filter_paths.json.
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

from ann_scale import clip_like, machine_info  # noqa: E402

SHARES = (0.05, 0.10, 0.50)  # members above exact_subset_max (4,096) at 200k, so the ANN paths run
K = 10


def cpu_ms_per_query(search, queries: np.ndarray) -> float:
    started = time.process_time()
    for q in queries:
        search(q[None])
    return round((time.process_time() - started) / len(queries) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "filter_paths.json")
    args = parser.parse_args()

    import faiss

    import indexer.ann as ann_module
    from indexer import AnnConfig, AnnIndex, IdSet

    faiss.omp_set_num_threads(1)
    clusters = max(1, args.n // 100)
    vectors = clip_like(args.n, 512, seed=1, clusters=clusters)
    queries = clip_like(args.queries, 512, seed=2, clusters=clusters)
    tuning = clip_like(500, 512, seed=3, clusters=clusters)
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    started = time.perf_counter()
    ann = AnnIndex.build(vectors, ids, AnnConfig(), tuning_queries=tuning)
    build_s = time.perf_counter() - started
    del vectors
    rng = np.random.default_rng(0)
    threshold = ann_module.POST_FILTER_MIN_KEPT_SHARE

    rows = []
    unfiltered = cpu_ms_per_query(lambda q: ann.search(q, K), queries)
    for share in SHARES:
        allowed = IdSet(np.sort(ids[rng.random(args.n) < share]))
        timings, found = {}, {}
        # Alternating rounds: the host's noise falls on both paths alike.
        for round_ in range(2):
            for path, cutoff in (("after_scan", 0.0), ("selector", 2.0)):
                ann_module.POST_FILTER_MIN_KEPT_SHARE = cutoff
                ms = cpu_ms_per_query(lambda q: ann.search(q, K, allowed=allowed), queries)
                timings[path] = min(timings.get(path, ms), ms)
                if round_ == 0:
                    found[path] = np.vstack([ann.search(q[None], K, allowed=allowed)[1] for q in queries])
        ann_module.POST_FILTER_MIN_KEPT_SHARE = threshold
        overlap = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found["after_scan"], found["selector"])]))
        rows.append({
            "share": share, "members": len(allowed), "unfiltered_cpu_ms": unfiltered,
            "selector_cpu_ms": timings["selector"], "after_scan_cpu_ms": timings["after_scan"],
            "after_scan_vs_selector": round(timings["after_scan"] / timings["selector"], 3),
            "after_scan_vs_unfiltered": round(timings["after_scan"] / unfiltered, 3),
            "top10_overlap": round(overlap, 4),
            "all_members": bool(allowed.contains(found["after_scan"][found["after_scan"] >= 0]).all()),
        })

    result = {
        "machine": machine_info(), "n": args.n, "queries": args.queries,
        "ann": {k: ann.info.to_dict()[k] for k in ("factory", "nlist", "nprobe", "rerank_factor", "recall_at_10")},
        "build_seconds": round(build_s, 1), "post_filter_min_kept_share": threshold, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['ann']['factory']}  nprobe {result['ann']['nprobe']}  n {args.n:,}  (CPU ms a query, batch 1)")
    print(f"{'kept':>6} {'unfiltered':>11} {'selector':>9} {'after scan':>11} {'ratio':>6} {'overlap':>8}")
    for r in rows:
        print(f"{r['share']:>6.0%} {r['unfiltered_cpu_ms']:>11} {r['selector_cpu_ms']:>9} {r['after_scan_cpu_ms']:>11} "
              f"{r['after_scan_vs_selector']:>6} {r['top10_overlap']:>8}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
