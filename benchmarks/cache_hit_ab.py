"""A repeated text query (cache hit) over HTTP: this tree's server against another tree's, interleaved.

On a shared, loaded host the absolute latency of one request moves with everyone else's work
(BENCHMARKS.md notes load averages of 8-14 on 2 cores); two runs minutes apart cannot tell a code
change from a change in load. This starts `prism serve` from this tree and from `--baseline-root`
(e.g. `git archive <commit> | tar -x -C DIR`) over the same PRISM_HOME and asks both the same
repeated queries in alternating order, request by request, with the same keep-alive httpx client
as benchmarks/serve_latency.py, so that noise hits both alike. GET /healthz is timed the same way
as the floor of an HTTP round trip on each.

    python benchmarks/cache_hit_ab.py --home HOME --baseline-root DIR [-n 400]

Writes benchmarks/results/cache_hit_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import prism_server  # noqa: E402
from embed_throughput import machine_info  # noqa: E402
from serve_latency import summary  # noqa: E402

REPEATED = ["red running shoes", "leather bag", "wool hat for kids", "blue summer shirt", "desk lamp"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True, help="an indexed PRISM_HOME (SQLite)")
    parser.add_argument("--baseline-root", type=Path, required=True, help="a source tree of the code to compare with")
    parser.add_argument("-n", type=int, default=400, help="requests per server and path")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cache_hit_ab.json")
    args = parser.parse_args()

    import httpx

    env = {**os.environ, "PRISM_HOME": str(args.home.resolve()), "PRISM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("PRISM_DATABASE_URL", None)
    ours_root = prism_server.ROOT
    servers = {}
    try:
        servers["this tree"] = prism_server.PrismServer(env).start(timeout_s=300)
        prism_server.ROOT = args.baseline_root.resolve()  # read by start(): the tree `prism serve` runs from
        servers["baseline"] = prism_server.PrismServer(env).start(timeout_s=300)
    finally:
        prism_server.ROOT = ours_root
    try:
        clients = {name: httpx.Client(base_url=s.url, timeout=30) for name, s in servers.items()}
        for client in clients.values():  # warm-up; every repeated query is cached from here on
            for _ in range(3):
                for q in REPEATED:
                    client.get("/v1/search", params={"q": q, "k": 10}).raise_for_status()
                client.get("/healthz")
        hit = {name: [] for name in clients}
        health = {name: [] for name in clients}
        order = list(clients)
        for i in range(args.n):
            for name in (order if i % 2 == 0 else order[::-1]):
                client = clients[name]
                t0 = time.perf_counter()
                r = client.get("/v1/search", params={"q": REPEATED[i % len(REPEATED)], "k": 10})
                hit[name].append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200 and "encode" not in r.json()["timings_ms"], r.text
                t0 = time.perf_counter()
                client.get("/healthz")
                health[name].append((time.perf_counter() - t0) * 1000)
    finally:
        for s in servers.values():
            s.stop()
    result = {
        "benchmark": "cache_hit_ab",
        "baseline_root": args.baseline_root.name,
        "requests_per_path": args.n,
        "cache_hit": {name: summary(v) for name, v in hit.items()},
        "healthz": {name: summary(v) for name, v in health.items()},
        "machine": machine_info(),
    }
    result["cache_hit_p50_ratio_this_over_baseline"] = round(
        result["cache_hit"]["this tree"]["p50_ms"] / result["cache_hit"]["baseline"]["p50_ms"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name in clients:
        c, h = result["cache_hit"][name], result["healthz"][name]
        print(f"{name:<10} cache hit p50 {c['p50_ms']:.2f} ms p90 {c['p90_ms']:.2f} p99 {c['p99_ms']:.2f} | "
              f"/healthz p50 {h['p50_ms']:.2f} ms")
    print(f"cache-hit p50 this/baseline: {result['cache_hit_p50_ratio_this_over_baseline']}; wrote {args.out}")


if __name__ == "__main__":
    main()
