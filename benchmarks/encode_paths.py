"""Where a server's extra encode time comes from (issue 20: server encode stage p50 23.5 ms against
21.4 ms for encode + ANN in-process, ViT-B-32). The same text encode, batch 1, called:

  (A) directly on this thread,
  (B) through a ModelThread hop,
  (C) through the QueryBatcher as a server runs it (dispatcher + model thread),
  (D) as C, with a second Python thread doing request-like work (JSON + small numpy) meanwhile.

Blocks of 25 queries alternate between the paths so host noise hits each alike. Prints a table
and writes JSON.

    python benchmarks/encode_paths.py [--model ViT-B-32:random] [--out benchmarks/results/encode_paths.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BLOCK = 25
QUERIES = 300
WARM_UP = 10


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


class _BusyNeighbour:
    """A daemon thread that, while switched on, does what a request thread does between encodes."""

    def __init__(self):
        import numpy as np

        self._on = threading.Event()

        def work() -> None:
            while True:
                self._on.wait()
                json.dumps({"results": [{"id": i, "score": float(i)} for i in range(10)]})
                np.arange(1000).sum()
                time.sleep(0.0005)

        threading.Thread(target=work, daemon=True).start()

    def __enter__(self) -> "_BusyNeighbour":
        self._on.set()
        return self

    def __exit__(self, *exc) -> None:
        self._on.clear()


def measure(model: str) -> dict:
    from api.settings import PrismSettings

    PrismSettings(model=model, device="cpu", database_url=None).apply_threads()  # PRISM_THREADS, as a server
    from embedder import ModelThread, load_embedder
    from search.batcher import BatchConfig, QueryBatcher
    from serve_latency import queries

    embedder = load_embedder(model, device="cpu")
    thread = ModelThread()
    bound = thread.bind(embedder)
    batcher = QueryBatcher(BatchConfig(enabled=True), run=thread.run)

    def direct(q: str) -> float:
        started = time.perf_counter()
        embedder.encode_texts([q])
        return _ms(started)

    def model_thread(q: str) -> float:
        started = time.perf_counter()
        bound.encode_texts([q])
        return _ms(started)

    def through_batcher(q: str) -> tuple[float, float]:
        started = time.perf_counter()
        with batcher.expecting(True) as submit:
            _, stats = submit(bound.unbound, q, lambda v: v)
        return _ms(started), stats.encode_ms

    texts = queries(QUERIES + WARM_UP)
    for q in texts[:WARM_UP]:
        direct(q), model_thread(q), through_batcher(q)
    neighbour = _BusyNeighbour()
    times: dict[str, list[float]] = {k: [] for k in (
        "direct", "model_thread", "batcher_total", "batcher_encode", "batcher+busy_total", "batcher+busy_encode")}
    for start in range(WARM_UP, WARM_UP + QUERIES, BLOCK):
        block = texts[start:start + BLOCK]
        times["direct"] += [direct(q) for q in block]
        times["model_thread"] += [model_thread(q) for q in block]
        for prefix, busy in (("batcher", False), ("batcher+busy", True)):
            with neighbour if busy else contextlib.nullcontext():
                for q in block:
                    total, encode = through_batcher(q)
                    times[f"{prefix}_total"].append(total)
                    times[f"{prefix}_encode"].append(encode)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "encode_paths.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from embed_throughput import machine_info

    times = measure(args.model)
    out = {"benchmark": "encode_paths", "model": args.model, "queries_per_path": len(times["direct"]),
           "p50_ms": {k: round(statistics.median(v), 2) for k, v in times.items()},
           "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()], "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"{'path':<22} {'p50 ms':>8}")
    for path, p50 in out["p50_ms"].items():
        print(f"{path:<22} {p50:>8.2f}")
    print(f"load average at end: {out['load_average_1_5_15_at_end']}; wrote {args.out}")


if __name__ == "__main__":
    main()
