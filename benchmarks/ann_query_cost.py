"""Where one batch-1 ANN query's time goes, in a served index (issue 16: Prism's IVF-PQ answers far
fewer queries a second than HNSW32 at batch 1; this says which step costs what).

For the image index of the active version in --home, each query is timed whole (`AnnIndex.search`,
k=10, single thread, as the engine calls it) and step by step as `AnnIndex._search` runs it
unfiltered:

  scan             the fast-scan IVF scan: k x rerank_factor candidates, their distances, positions
  re-rank decode   the candidates' re-rank codes (residual scalar quantizer)
  score            q.b from the scan's distance and the stored norm, + q.r; top k

and, beside it, the re-rank of the release before (index format 3), which decoded each candidate's
IVF-PQ reconstruction b from the fast-scan blocks instead of reading q.b off the scan:

  base decode      the candidates' IVF-PQ reconstructions
  decode re-rank   the whole search that way (scan, both decodes, score)

With --retune (needs --truth) the build's tuner runs again on this index over the first half of the
queries, as the current code would tune it, and the other half is measured: how a tuner change
plays on an index too large to rebuild for the purpose. Nothing is written to the index version.

With --truth (benchmarks/scale.py's truth.npy: each query's exact top-10 as catalog positions, row
id = position + 1 there) it reports recall@10 of both re-ranks. Queries come from --queries (an
.npy of float32 rows) or are stored vectors of the index with noise. The ways of one query run back
to back, so host noise hits each alike, and the two whole searches take turns going first (the
first reads the query's lists from memory, the second finds some in the CPU caches). Prints a
table and writes JSON.

    python benchmarks/ann_query_cost.py --home /tmp/prism-scale/n10000000/home \
        --queries /tmp/prism-scale/n10000000/queries.npy --truth /tmp/prism-scale/n10000000/truth.npy \
        --out benchmarks/results/ann_query_cost_10m.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ann_scale import machine_info  # noqa: E402

STEPS = ("scan", "re-rank decode", "score")


def _queries(ann, path: Path | None, count: int) -> np.ndarray:
    if path is not None:
        queries = np.load(path).astype(np.float32)[:count]
    else:
        rng = np.random.default_rng(0)
        picks = rng.choice(ann.ids(), size=min(count, ann.ntotal), replace=False)
        queries = ann.reconstruct(picks) + rng.normal(0, 0.02, (len(picks), ann.info.dim)).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _decode_rerank(ann, q: np.ndarray, fetch: int, k: int) -> np.ndarray:
    """The previous release's re-rank: b decoded from the fast-scan codes, scored as q.(b + r)."""
    _, positions = ann._ivf_candidates(q, fetch, None, None)
    positions = positions[0][positions[0] >= 0]
    vectors = ann.index.index.reconstruct_batch(positions) + ann.refine.reconstruct_batch(positions)
    top = np.argsort(-(vectors @ q[0]), kind="stable")[:k]
    return ann._row_ids_at(positions[top])


def measure(ann, queries: np.ndarray, truth_rows: np.ndarray | None, k: int = 10) -> dict:
    """Microseconds per query: the whole search, each step of its unfiltered IVF-PQ path, and the
    previous release's decoding re-rank; recall@10 of both where the truth is known."""
    import faiss

    if ann.info.kind != "ivfpq" or ann.refine is None:
        raise SystemExit(f"the active image index is {ann.info.kind!r} without re-rank codes: nothing to break down")
    if ann.base_norms is None:
        raise SystemExit("the active image index scans by inner product (format 2): no stored norms to break down")
    faiss.omp_set_num_threads(1)
    fetch = min(max(k * ann.info.rerank_factor, 40), ann.ntotal)
    times: dict[str, list[float]] = {name: [] for name in ("search", *STEPS, "base decode", "decode re-rank")}
    found_served, found_decoded = [], []
    for q in queries[:20]:  # warm: the memory-mapped re-rank pages, the sorted ids
        ann.search(q[None], k)
        _decode_rerank(ann, q[None], fetch, k)
    for i, q in enumerate(queries):
        q = q[None]
        # Turns, not a fixed order: see the module docstring.
        if i % 2:
            t5 = time.perf_counter()
            found_decoded.append(_decode_rerank(ann, q, fetch, k))
            t6 = time.perf_counter()
        t0 = time.perf_counter()
        found_served.append(ann.search(q, k)[1][0])
        t1 = time.perf_counter()
        distances, positions = ann._ivf_candidates(q, fetch, None, None)
        t2 = time.perf_counter()
        at = np.maximum(positions, 0)
        residuals = ann.refine.reconstruct_batch(at.reshape(-1)).reshape(1, fetch, -1)
        t3 = time.perf_counter()
        scores = (1.0 + ann.base_norms[at] - distances) * 0.5 + np.einsum("qfd,qd->qf", residuals, q)
        np.argsort(-scores, axis=1, kind="stable")[:, :k]
        t4 = time.perf_counter()
        ann.index.index.reconstruct_batch(at.reshape(-1))
        t4b = time.perf_counter()
        if not i % 2:
            t5 = time.perf_counter()
            found_decoded.append(_decode_rerank(ann, q, fetch, k))
            t6 = time.perf_counter()
        for name, (a, b) in zip(times, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t4b), (t5, t6))):
            times[name].append(b - a)
    us = lambda xs: round(statistics.median(xs) * 1e6, 1)  # noqa: E731
    out = {
        "factory": ann.info.factory, "ntotal": ann.ntotal, "nlist": ann.info.nlist, "nprobe": ann.info.nprobe,
        "rerank_store": ann.info.rerank_store, "rerank_factor": ann.info.rerank_factor, "candidates": fetch,
        "index_format": ann.info.format, "queries": len(queries),
        "search_us_p50": us(times["search"]), "qps_batch1": round(len(queries) / sum(times["search"]), 1),
        "decode_rerank_us_p50": us(times["decode re-rank"]),
        "decode_rerank_qps_batch1": round(len(queries) / sum(times["decode re-rank"]), 1),
        "steps_us_p50": {name: us(times[name]) for name in (*STEPS, "base decode")},
    }
    if truth_rows is not None:
        def recall(found):
            return round(float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth_rows)])), 4)
        out["recall_at_10"] = recall(found_served)
        out["decode_rerank_recall_at_10"] = recall(found_decoded)
    return out


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one batch-1 query, {result['ntotal']:,} vectors, {result['factory']} "
                        f"nprobe {result['nprobe']}, {result['candidates']} candidates re-ranked")
    for column in ("step", "p50 us", "note"):
        table.add_column(column, justify="left" if column != "p50 us" else "right")
    for name, value in result["steps_us_p50"].items():
        table.add_row(name, f"{value:.0f}", "the previous release's re-rank only" if name == "base decode" else "")
    recall = lambda key: f", recall@10 {result[key]:.4f}" if key in result else ""  # noqa: E731
    table.add_row("AnnIndex.search, whole", f"{result['search_us_p50']:.0f}",
                  f"{result['qps_batch1']:.0f} q/s{recall('recall_at_10')}")
    table.add_row("decoding re-rank, whole", f"{result['decode_rerank_us_p50']:.0f}",
                  f"{result['decode_rerank_qps_batch1']:.0f} q/s{recall('decode_rerank_recall_at_10')}")
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="a PRISM_HOME with an active IVF-PQ image index")
    parser.add_argument("--queries", type=Path, default=None, help=".npy of query vectors (default: noisy stored ones)")
    parser.add_argument("--truth", type=Path, default=None,
                        help="benchmarks/scale.py's truth.npy (exact top-10 as catalog positions) for recall@10")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--retune", action="store_true",
                        help="re-run the tuner on the first half of the queries, measure on the second half")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ann_query_cost.json")
    args = parser.parse_args()

    from search import SearchEngine
    from store import Store

    home = args.home.resolve()
    store = Store.open(f"sqlite:///{home / 'prism.db'}")
    engine = SearchEngine(store, indexes_dir=home / "indexes", models_dir=home / "models", device="cpu",
                          verify_files=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights model of a synthetic catalog
        engine.refresh()
    ann = engine.serving.version.indexes["image"]
    queries = _queries(ann, args.queries, args.count)
    # benchmarks/scale.py loads its catalog into an empty home: position i is row id i + 1.
    truth = None if args.truth is None else np.sort(ann.ids())[np.load(args.truth)[:len(queries)]]
    retuned = None
    if args.retune:
        if truth is None:
            raise SystemExit("--retune needs --truth")
        from indexer import AnnConfig

        built = {"rerank_factor": ann.info.rerank_factor, "nprobe": ann.info.nprobe,
                 "recall_at_10": ann.info.recall_at_10}
        half = len(queries) // 2
        started = time.perf_counter()
        ann._tune(queries[:half], truth[:half], AnnConfig(), "benchmark queries")
        retuned = {"as_built": built, "seconds": round(time.perf_counter() - started, 1),
                   "tuning_queries": half, "curve": ann.info.tuning["curve"]}
        queries, truth = queries[half:], truth[half:]
    result = {**measure(ann, queries, truth), "machine": machine_info()}
    if retuned is not None:
        result["retuned"] = retuned
    engine.close()
    store.close()
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
