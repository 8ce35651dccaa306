"""Millions of products on one machine: `prism index --vectors` on a synthetic catalog, then serving.

    python benchmarks/scale.py --n 1000000             # ~15 minutes here
    python benchmarks/scale.py --n 10000000            # the issue's size: ~10 GB of float16 input
    python benchmarks/scale.py --n 1000000 --n 10000000  # growth, side by side

For each size, in --work (default /tmp/prism-scale, never inside the repo):
1. generate, chunk by chunk (never all in RAM), a catalog Parquet (product_id, title, category:
   ten categories, `c0` holds 10% of products; price) and a vectors Parquet (product_id,
   image_vector: fixed-size list of float16, written with `use_dictionary=False`), from one
   `ClipLikeWorld`; the exact top-10 of 1,000 queries from the same world is computed chunk-wise
   on the float16-rounded vectors as they are written;
2. run `prism index CATALOG --vectors VECTORS --model ViT-B-32:random --json` in a subprocess
   (its own PRISM_HOME): wall time and peak RSS (the child's VmHWM, polled);
3. load the active version the way `prism serve` does (SearchEngine) and measure: resident memory
   added by the index (RSS after load and 1,000 queries, minus before), its bytes on disk,
   recall@10 against the exact top-10, batch-1 single-thread q/s of the ANN search, p50 of
   `similar_to` searches through the engine (sync, filter, ANN, metadata) unfiltered and with
   the 10% category filter, and again after deleting 100,000 products (journal replay, masked);
4. re-run `prism index` with a vectors file in which 1% of the vectors changed: how many were new,
   and the time.

Prints a table and writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from ann_scale import ClipLikeWorld  # noqa: E402
from indexer.ann import ExactTopK, resident_mb  # noqa: E402
from ann_scale import machine_info  # noqa: E402

DIM = 512
QUERIES = 1_000
CHUNK = 250_000
CATEGORIES = 10  # c0: 10% of products, the filter's category


def _rss_split_mb() -> dict:
    """Resident memory split into private (anonymous) and file-backed pages: the memory-mapped
    re-rank codes are file-backed (page cache any process shares, dropped under pressure)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Anonymous"):
                fields[name] = int(rest.split()[0]) / 1024
    return {"anonymous": round(fields.get("Anonymous", 0.0), 1),
            "file_backed": round(fields.get("Rss", 0.0) - fields.get("Anonymous", 0.0), 1)}


def index_parts_mb(ann) -> dict:
    """What each array of an IVF-PQ AnnIndex holds, from its sizes: where the serving memory goes."""
    import faiss

    n = ann.ntotal
    ivf = faiss.extract_index_ivf(ann.index)
    mb = 1 / 2**20
    return {
        "ivf_codes": round(ivf.code_size * n * mb, 1),
        "ivf_list_ids": round(8 * n * mb, 1),
        "direct_map": round(8 * n * mb, 1),
        "idmap_row_ids": round(8 * n * mb, 1),
        "sorted_ids_and_order": round(16 * n * mb, 1) if ann._ids is not None else 0.0,
        "centroids": round(ivf.nlist * ivf.d * 4 * mb, 1),
        "rerank_codes": round(ann.refine.code_size * n * mb, 1),
        "base_norms": round(ann.base_norms.nbytes * mb, 1) if ann.base_norms is not None else 0.0,
    }


def generate(work: Path, n: int, *, changed_fraction: float = 0.01) -> dict:
    """Catalog, vectors, vectors with `changed_fraction` changed, and the exact top-10 (by position)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work.mkdir(parents=True, exist_ok=True)
    done = work / "generated.json"
    inputs = [work / name for name in ("catalog.parquet", "vectors.parquet", "vectors-changed.parquet", "truth.npy",
                                       "queries.npy")]
    # A file removed since (10 GB each at 10M, deleted to free a disk) means generating again.
    if done.is_file() and all(p.is_file() for p in inputs):
        return json.loads(done.read_text())
    world = ClipLikeWorld(DIM, clusters=max(1, min(n // 100, 100_000)))
    queries = world.draw(QUERIES, seed=2)
    truth = ExactTopK(queries, 10)
    started = time.perf_counter()
    vector_type = pa.list_(pa.float16(), DIM)
    catalog_schema = pa.schema([("product_id", pa.string()), ("title", pa.string()), ("category", pa.string()),
                                ("price", pa.float64())])
    vectors_schema = pa.schema([("product_id", pa.string()), ("image_vector", vector_type)])
    rng = np.random.default_rng(7)
    changed_rows = np.sort(rng.choice(n, size=max(1, int(n * changed_fraction)), replace=False))
    with pq.ParquetWriter(work / "catalog.parquet", catalog_schema) as catalog, \
            pq.ParquetWriter(work / "vectors.parquet", vectors_schema, use_dictionary=False) as vectors, \
            pq.ParquetWriter(work / "vectors-changed.parquet", vectors_schema, use_dictionary=False) as changed:
        for chunk_no, start in enumerate(range(0, n, CHUNK)):
            stop = min(n, start + CHUNK)
            ids = [f"S{i:09d}" for i in range(start, stop)]
            positions = np.arange(start, stop)
            catalog.write_table(pa.table({
                "product_id": ids,
                "title": [f"synthetic product {i}" for i in range(start, stop)],
                # c0 takes every 10th product: 10% of the catalog, spread over the whole index
                "category": [f"c{i % CATEGORIES}" for i in range(start, stop)],
                "price": (positions % 997).astype(np.float64),
            }, schema=catalog_schema), row_group_size=50_000)
            x = world.draw(stop - start, seed=1000 + chunk_no).astype(np.float16)
            vectors.write_table(pa.table({"product_id": ids, "image_vector": pa.FixedSizeListArray.from_arrays(
                pa.array(x.reshape(-1)), DIM)}, schema=vectors_schema), row_group_size=50_000)
            xf = x.astype(np.float32)
            truth.add(xf / np.linalg.norm(xf, axis=1, keepdims=True), np.arange(start, stop))
            local = changed_rows[(changed_rows >= start) & (changed_rows < stop)] - start
            x2 = x.copy()
            x2[local] = world.draw(len(local), seed=5000 + chunk_no).astype(np.float16)
            changed.write_table(pa.table({"product_id": ids, "image_vector": pa.FixedSizeListArray.from_arrays(
                pa.array(x2.reshape(-1)), DIM)}, schema=vectors_schema), row_group_size=50_000)
            print(f"  generated {stop:,} / {n:,}", flush=True)
    np.save(work / "truth.npy", truth.ids())
    np.save(work / "queries.npy", queries)
    info = {"n": n, "changed": int(len(changed_rows)), "seconds": round(time.perf_counter() - started, 1),
            "vectors_bytes": (work / "vectors.parquet").stat().st_size}
    done.write_text(json.dumps(info))
    return info


def run_index(home: Path, catalog: Path, vectors: Path) -> dict:
    env = {**os.environ, "PRISM_HOME": str(home), "PRISM_MODEL": "ViT-B-32:random", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("PRISM_DATABASE_URL", None)
    log = home.parent / f"index-{vectors.stem}.log"
    started = time.perf_counter()
    peak_kb = 0
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "api.cli", "index", str(catalog), "--vectors", str(vectors),
                                 "--json"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        # The child's own high-water mark (VmHWM is reset by exec): wait4's ru_maxrss also counts
        # the image of this process that the fork copied, gigabytes after a generation.
        while proc.poll() is None:
            peak_kb = max(peak_kb, _hwm_kb(proc.pid))
            time.sleep(0.2)
    seconds = time.perf_counter() - started
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"prism index failed:\n{text[-3000:]}")
    summary = json.loads(text[text.index("{\n"):])
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024, 1), "summary": summary}


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def serve_measurements(home: Path, work: Path, n: int) -> dict:
    import faiss

    from search import SearchEngine
    from store import ProductFilter, Store

    faiss.omp_set_num_threads(1)
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    store = Store.open(f"sqlite:///{home.resolve() / 'prism.db'}")
    engine = SearchEngine(store, indexes_dir=home / "indexes", models_dir=home / "models", device="cpu",
                          verify_files=False)
    # The model first, so that what the load adds is the index (and the filter columns).
    engine.embedder_for(store.active_index_version().model_version)
    before, split_before = resident_mb(), _rss_split_mb()
    engine.refresh()
    loaded = resident_mb()
    ann = engine.serving.version.indexes["image"]
    # Row ids follow catalog order here (one load into an empty home): position i -> row id i + 1.
    row_of_position = np.sort(ann.ids())
    started = time.perf_counter()
    found = np.vstack([ann.search(q[None], 10)[1] for q in queries])
    qps = len(queries) / (time.perf_counter() - started)
    truth_rows = row_of_position[truth]
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth_rows)]))
    served, split_served = resident_mb(), _rss_split_mb()
    breakdown = {"index_arrays_mb": index_parts_mb(ann),
                 "rss_added_mb": {k: round(split_served[k] - split_before[k], 1) for k in split_served}}

    product_ids = [f"S{i:09d}" for i in np.random.default_rng(3).choice(n, size=300, replace=False)]

    def p50(filters=None) -> float:
        times = []
        for pid in product_ids:
            t0 = time.perf_counter()
            engine.search(similar_to=pid, target="image", k=10, filters=filters)
            times.append(time.perf_counter() - t0)
        return round(float(np.median(times)) * 1000, 3)

    def p50_side_by_side(*filters) -> list[float]:
        """p50 of each filter, the queries alternating between them (the order turning each time):
        a busy host slows both alike, where blocks run one after the other compared two loads
        (the 10M row's 49.5 against 14.2 ms was measured that way beside a test suite)."""
        times = [[] for _ in filters]
        for i, pid in enumerate(product_ids):
            turn = range(len(filters)) if i % 2 == 0 else reversed(range(len(filters)))
            for j in turn:
                t0 = time.perf_counter()
                engine.search(similar_to=pid, target="image", k=10, filters=filters[j])
                times[j].append(time.perf_counter() - t0)
        return [round(float(np.median(t)) * 1000, 3) for t in times]

    category = ProductFilter(categories=("c0",))
    p50(None), p50(category)  # warm: the filter structures (the filter's bitmap), the metadata cache
    unfiltered, filtered = p50_side_by_side(None, category)
    deleted = [f"S{i:09d}" for i in np.random.default_rng(4).choice(n, size=min(100_000, n // 10), replace=False)]
    keep = set(product_ids)
    deleted = [d for d in deleted if d not in keep]
    t0 = time.perf_counter()
    store.soft_delete_products(deleted)
    delete_seconds = time.perf_counter() - t0
    engine.sync()
    after_delete = p50(None)
    files = engine.serving.version.path
    disk = sum(p.stat().st_size for p in files.iterdir() if p.name.startswith("image."))
    out = {
        "ann": {k: ann.info.to_dict()[k] for k in ("factory", "nlist", "nprobe", "rerank_store", "rerank_factor",
                                                  "recall_at_10", "build_seconds")},
        "ann_stage_seconds": ann.info.tuning.get("stage_seconds"),
        # `prism index`'s resident memory at the end of each stage of this index's build
        "ann_stage_rss_mb": ann.info.tuning.get("stage_rss_mb"),
        "recall_at_10": round(recall, 4),
        "batch1_qps_single_thread": round(qps, 1),
        "serving_rss_mb": round(served - before, 1),
        "rss_after_load_mb": round(loaded - before, 1),
        "index_bytes_on_disk": disk,
        "memory_breakdown": breakdown,
        "float32_bytes": n * DIM * 4,
        "p50_ms_unfiltered": unfiltered,
        "p50_ms_category_10pct": filtered,
        "deleted": len(deleted),
        "delete_seconds": round(delete_seconds, 1),
        "p50_ms_after_delete": after_delete,
    }
    engine.close()
    store.close()
    return out


def one_size(work_root: Path, n: int, report, *, rerun: bool = True, earlier: dict | None = None) -> dict:
    """Each phase's figures are reported as soon as they exist (`report` writes the JSON), so a
    run stopped part-way still leaves what it measured. `earlier`: this size's row from a run
    whose index is still in its home: serving is measured again over it, nothing is re-indexed."""
    work = work_root / f"n{n}"
    home = work / "home"
    if earlier is not None:
        row = {k: earlier[k] for k in ("n", "generate", "index") if k in earlier}
    else:
        row = {"n": n, "generate": generate(work, n)}
        report(row)
        if home.exists():
            import shutil

            shutil.rmtree(home)
        first = run_index(home, work / "catalog.parquet", work / "vectors.parquet")
        row["index"] = {k: first[k] for k in ("seconds", "peak_rss_mb")}
        row["index"]["summary_seconds"] = first["summary"]["seconds"]
        # catalog (file -> SQL), vectors (--vectors file -> cache), build (train, add, tune, publish)
        row["index"]["stage_seconds"] = first["summary"].get("stage_seconds", {})
        report(row)
    row["serve"] = serve_measurements(home, work, n)
    report(row)
    if not rerun:
        return row
    again = run_index(home, work / "catalog.parquet", work / "vectors-changed.parquet")
    row["rerun_1pct"] = {"seconds": again["seconds"], "peak_rss_mb": again["peak_rss_mb"],
                         "new_vectors": again["summary"]["images_supplied"],
                         "cached_vectors": again["summary"]["images_cached"], "changed": row["generate"]["changed"]}
    report(row)
    return row


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="prism index --vectors at scale (ViT-B-32 width, synthetic CLIP-like vectors)")
    for col in ("products", "index s", "peak RSS GB", "serving GB (x float32)", "recall@10", "q/s batch-1",
                "p50 ms", "p50 10% filter", "p50 after deletes", "rerun 1%: new / s"):
        table.add_column(col)
    for r in rows:
        s = r["serve"]
        table.add_row(
            f"{r['n']:,}", f"{r['index']['seconds']:.0f}", f"{r['index']['peak_rss_mb'] / 1024:.2f}",
            f"{s['serving_rss_mb'] / 1024:.2f} ({s['serving_rss_mb'] * 2**20 / s['float32_bytes']:.3f})",
            f"{s['recall_at_10']:.3f}", f"{s['batch1_qps_single_thread']:.0f}", f"{s['p50_ms_unfiltered']:.2f}",
            f"{s['p50_ms_category_10pct']:.2f}", f"{s['p50_ms_after_delete']:.2f} ({s['deleted']:,} deleted)",
            f"{r['rerun_1pct']['new_vectors']:,} / {r['rerun_1pct']['seconds']:.0f}" if "rerun_1pct" in r else "not run",
        )
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append", help="catalog sizes (repeatable); default 1,000,000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prism-scale"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    parser.add_argument("--rerun-up-to", type=int, default=None,
                        help="re-index with 1%% changed vectors only for sizes up to this (default: every size)")
    parser.add_argument("--serve-only", action="store_true",
                        help="measure serving (and the rerun, unless --rerun-up-to excludes it) over the index an "
                        "earlier run left in --work, keeping that run's index figures")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    sizes = set(args.n or [1_000_000])
    # Sizes not run this time keep their last figures (a 1M rerun must not erase the 10M row),
    # each with the machine it was measured on.
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {"sizes": []}
    kept = [{**r, "machine": r.get("machine", earlier.get("machine"))} for r in earlier["sizes"] if r["n"] not in sizes]

    def report(row: dict) -> None:
        done = [r for r in rows if r is not row] + [row]
        ordered = sorted(kept + [{**r, "machine": machine_info()} for r in done], key=lambda r: -r["n"])
        args.out.write_text(json.dumps({"machine": machine_info(), "sizes": ordered}, indent=2))

    for n in args.n or [1_000_000]:
        reuse = None
        if args.serve_only:
            reuse = next((r for r in earlier["sizes"] if r["n"] == n and "index" in r), None)
            if reuse is None or not (args.work / f"n{n}" / "home" / "prism.db").is_file():
                raise SystemExit(f"--serve-only: no earlier index of {n:,} products in {args.out} and {args.work}")
        rows.append(one_size(args.work, n, report, rerun=args.rerun_up_to is None or n <= args.rerun_up_to,
                             earlier=reuse))
    print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    main()
