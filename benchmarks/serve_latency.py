"""Latency of a text query through HTTP against the cost of encoding + ANN alone, in one run.

    http        = client-side wall time of GET /v1/search?q=...&target=image&k=10 against `prism serve`
                  (a separate process): HTTP + validation + journal sync + encode + filter + ANN +
                  metadata fetch + search_log write + JSON
    encode+ANN  = in this process, on the same index: encode_texts([q]) + AnnIndex.search, nothing else
    cache hit   = client-side wall time of GET /v1/search for a query the server answered before
                  (its vector comes from the query cache: no encode, ANN + metadata + log only)

All three run in the same blocks, alternating, so that machine noise hits them alike; the
distinct queries are never repeated (no cache hit among them). Usage:

    python benchmarks/serve_latency.py [--model ViT-B-32:random] [-n 1000] [--queries 300]
    python benchmarks/serve_latency.py --home DEMO_HOME     # a home `prism demo --no-serve` made: the demo model
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

COLOURS = ["red", "blue", "green", "black", "white", "yellow", "purple", "grey", "orange", "pink"]
THINGS = ["running shoes", "leather bag", "wool hat", "summer shirt", "wrist watch", "coffee mug",
          "rain jacket", "desk lamp", "travel backpack", "silk scarf"]
STYLES = ["", "for kids", "vintage", "waterproof", "cheap", "premium", "with pockets", "lightweight"]


def queries(n: int) -> list[str]:
    combos = [" ".join(filter(None, (c, t, s))) for s, c, t in itertools.product(STYLES, COLOURS, THINGS)]
    return combos[:n]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float]) -> dict:
    return {
        "p50_ms": round(percentile(values, 0.50), 3),
        "p90_ms": round(percentile(values, 0.90), 3),
        "p99_ms": round(percentile(values, 0.99), 3),
        "mean_ms": round(statistics.fmean(values), 3),
        "n": len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("-n", type=int, default=1000, help="catalog products")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--block", type=int, default=25, help="queries per alternating block")
    parser.add_argument("--home", type=Path, default=None, help="reuse this PRISM_HOME (built if empty); a demo home "
                        "serves the demo model")
    parser.add_argument("--repeated", type=int, default=5, help="distinct queries repeated for the cache-hit path")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_latency.json")
    args = parser.parse_args()

    import warnings

    import httpx

    from api.settings import PrismSettings
    from embed_throughput import machine_info
    from embedder import load_embedder
    from indexer import CatalogIndexer, IndexOptions
    from prism_server import PrismServer
    from sample_catalog import make_catalog
    from search import SearchEngine
    from store import Store

    warnings.filterwarnings("ignore", message=".*random weights.*")
    home = args.home or Path(tempfile.mkdtemp(prefix="prism-serve-bench-"))
    settings = PrismSettings(home=home, model=args.model, device="cpu", database_url=None)
    settings.apply_threads()
    store = Store.open(settings.db_url)
    if store.active_index_version() is None:
        print(f"building a {args.n}-product index with {args.model} in {home} ...", flush=True)
        catalog = make_catalog(home / "catalog", args.n, image_size=64)
        embedder = load_embedder(args.model, device="cpu")
        CatalogIndexer(home=home, store=store, embedder=embedder, options=IndexOptions(batch_size=32)).run(catalog)

    engine = SearchEngine(store, indexes_dir=settings.indexes_dir, models_dir=settings.models_dir, device="cpu")
    engine.refresh()
    serving = engine.serving
    ann = serving.version.indexes["image"]

    model = serving.version.model_version
    env = {**os.environ, "PRISM_HOME": str(home), "PRISM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("PRISM_DATABASE_URL", None)
    with PrismServer(env).start(timeout_s=300) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        texts = queries(args.queries + args.repeated)
        texts, repeated = texts[: args.queries], texts[args.queries :]
        # Warm-up both paths (first calls allocate) with queries measured nowhere else; the
        # repeated ones are answered once here, so every later ask is a cache hit.
        for q in [f"warm-up {i} {t}" for i, t in enumerate(COLOURS)] + repeated:
            client.get("/v1/search", params={"q": q, "target": "image", "k": 10})
            ann.search(serving.embedder.encode_texts([q]), 10)

        http_ms, inproc_ms, server_ms, hit_ms = [], [], [], []
        stages: dict[str, list[float]] = {}
        hit_stages: dict[str, list[float]] = {}

        def get(q: str, into: dict[str, list[float]]) -> tuple[float, dict]:
            t0 = time.perf_counter()
            r = client.get("/v1/search", params={"q": q, "target": "image", "k": 10})
            ms = (time.perf_counter() - t0) * 1000
            body = r.json()
            assert r.status_code == 200 and len(body["results"]) == 10, r.text
            for stage, value in body["timings_ms"].items():
                into.setdefault(stage, []).append(value)
            return ms, body

        for start in range(0, len(texts), args.block):
            block = texts[start : start + args.block]
            for q in block:
                ms, body = get(q, stages)
                http_ms.append(ms)
                server_ms.append(body["took_ms"] + body["timings_ms"].get("log", 0.0))
                assert "encode" in body["timings_ms"], "a distinct query was answered from the cache"
            for q in block:
                t0 = time.perf_counter()
                scores, ids = ann.search(serving.embedder.encode_texts([q]), 10)
                inproc_ms.append((time.perf_counter() - t0) * 1000)
                assert (ids >= 0).all()
            for i in range(len(block)):
                ms, body = get(repeated[(start + i) % len(repeated)], hit_stages)
                hit_ms.append(ms)
                assert "encode" not in body["timings_ms"], "a repeated query was encoded again"

    http, inproc, hit = summary(http_ms), summary(inproc_ms), summary(hit_ms)
    result = {
        "benchmark": "serve_latency",
        "model": model,
        "products": store.count_products(),
        "index": ann.info.factory,
        "queries": len(http_ms),
        "http_text_query": http,
        "server_took_ms": summary(server_ms),
        "encode_plus_ann": inproc,
        "stage_p50_ms": {stage: round(percentile(v, 0.5), 3) for stage, v in stages.items()},
        "http_cache_hit": hit,
        "cache_hit_stage_p50_ms": {stage: round(percentile(v, 0.5), 3) for stage, v in hit_stages.items()},
        "overhead_p50_ms": round(http["p50_ms"] - inproc["p50_ms"], 3),
        "ratio_p50_http_over_encode_ann": round(http["p50_ms"] / inproc["p50_ms"], 3),
        "ratio_p99_http_over_encode_ann": round(http["p99_ms"] / inproc["p99_ms"], 3),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"text query latency: {model}, {result['products']} products, {ann.info.factory}, CPU")
    for col in ("path", "p50 ms", "p90 ms", "p99 ms", "mean ms"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for name, s in (("HTTP GET /v1/search", http), ("server took_ms + log", result["server_took_ms"]),
                    ("encode + ANN alone", inproc), ("HTTP, repeated query (cache hit)", hit)):
        table.add_row(name, f"{s['p50_ms']:.2f}", f"{s['p90_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['mean_ms']:.2f}")
    table.add_row("ratio HTTP / (encode+ANN)", f"{result['ratio_p50_http_over_encode_ann']:.3f}", "",
                  f"{result['ratio_p99_http_over_encode_ann']:.3f}", "")
    Console().print(table)
    Console().print("server stage p50 (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in result["stage_p50_ms"].items()))
    Console().print("cache-hit stage p50 (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in result["cache_hit_stage_p50_ms"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
