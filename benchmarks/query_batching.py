"""HTTP text-query latency and throughput with query micro-batching on and off, in one run.

Two `prism serve` processes over the same PRISM_HOME, one with PRISM_QUERY_BATCHING=true and one
with false, take turns (on, off, on, off, ...) under a closed-loop load generator on loopback:
C clients, each sending its next GET /v1/search as soon as the previous answer arrives, for a
fixed time. The generator is a few lines of asyncio over keep-alive sockets, so it costs the
2-core host little next to the server. Reported per concurrency: QPS and p50/p95/p99 latency.

Targets (issue 6): QPS at concurrency 32 with batching >= 2x without; lone-query (concurrency 1)
p50 with batching within 1.1x of without.

Two setups, each its own PRISM_HOME:
    demo       the demo home (`prism demo --no-serve`): MiniLM-L6 text tower, 4k products;
    vit-b-32   ViT-B-32 (seeded random weights: the same text-tower cost as a pretrained CLIP) over
               1,000 generated products, built on first use.

Both servers run with the query and result caches off: the clients cycle through the same titles.
Also, per setup: image uploads (POST /v1/search/image of the home's product images, batching on
vs off, `--image-clients`, target >= 1.5x at 32); a Zipf(1.0) stream over the titles with the
caches on vs off (`--zipf-clients`); `--swaps N` activations of the home's two newest index
versions under 32 clients against the same load without swaps (target: p99 <= 1.5x, 0 failures).

    python benchmarks/query_batching.py [--demo-home prism-data] [--seconds 8] [--rounds 2]
        [--setups demo vit-b-32] [--image-clients 32] [--zipf-clients 32] [--swaps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from embed_throughput import machine_info  # noqa: E402
from prism_server import PrismServer  # noqa: E402
from serve_latency import percentile  # noqa: E402

CONCURRENCY = (1, 8, 32)


def vit_home(home: Path, model: str, n: int) -> Path:
    """A home with `n` generated products indexed by `model` (reused when already built)."""
    import warnings

    from embedder import load_embedder
    from indexer import CatalogIndexer, IndexOptions
    from sample_catalog import make_catalog
    from store import Store

    warnings.filterwarnings("ignore", message=".*random weights.*")
    store = Store.open(f"sqlite:///{(home / 'prism.db').resolve()}")
    try:
        if store.active_index_version() is None:
            print(f"building a {n}-product index with {model} in {home} ...", flush=True)
            catalog = make_catalog(home / "catalog", n, image_size=64)
            CatalogIndexer(home=home, store=store, embedder=load_embedder(model, device="cpu"),
                           options=IndexOptions(batch_size=32)).run(catalog)
    finally:
        store.close()
    return home


def query_words(home: Path, limit: int = 2000) -> list[str]:
    """Real shopper-like queries: the demo catalog's titles (or any catalog's), shuffled."""
    from store import Store

    store = Store.open(f"sqlite:///{(home / 'prism.db').resolve()}", apply_migrations=False)
    titles = [p.title for p in store.live_products() if p.title][:limit]
    store.close()
    if not titles:
        raise SystemExit(f"no products in {home}: run `prism demo --no-serve` first")
    random.Random(0).shuffle(titles)
    return titles


def zipf_requests(titles: list[str], n: int = 20_000, s: float = 1.0, seed: int = 0) -> list[bytes]:
    """`n` text queries drawn from Zipf(s) over the titles (the i-th most popular with weight 1/i^s):
    a few head queries make most of the stream, and a long tail is asked once or never."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** s for i in range(len(titles))]
    return text_requests(rng.choices(titles, weights=weights, k=n))


def start_server(home: Path, batching: bool, extra_env: dict, caches: bool = False, root: Path | None = None) -> PrismServer:
    env = {
        **os.environ, **extra_env, "PRISM_HOME": str(home), "PRISM_QUERY_BATCHING": "true" if batching else "false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }
    if not caches:
        # Every query encoded: the clients cycle through the same titles and images, and a cached
        # vector or page would measure the caches, not the batching of encodes.
        env |= {"PRISM_QUERY_CACHE_ENTRIES": "0", "PRISM_RESULT_CACHE_ENTRIES": "0"}
    # log_level "info": the server as users run it (access log included), as this benchmark always measured it.
    return PrismServer(env, log_level="info", root=root).start(timeout_s=120)


def text_requests(queries: list[str]) -> list[bytes]:
    return [f"GET /v1/search?q={urllib.parse.quote(q)}&k=10 HTTP/1.1\r\nHost: bench\r\n\r\n".encode() for q in queries]


def image_files(home: Path, limit: int = 300) -> list[Path]:
    """Product images under the home (the demo's glyphs, a generated catalog's pictures), sorted."""
    found = sorted(p for ext in ("png", "jpg", "jpeg", "webp") for p in home.rglob(f"*.{ext}")
                   if "indexes" not in p.parts and "embeddings" not in p.parts)
    if not found:
        raise SystemExit(f"no product images under {home} for the image-upload queries")
    return found[:limit]


def image_requests(files: list[Path]) -> list[bytes]:
    """POST /v1/search/image (multipart, as the search page uploads) for each image."""
    boundary = "prism-bench-boundary"
    out = []
    for path in files:
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n10\r\n--{boundary}--\r\n").encode()
        head = (f"POST /v1/search/image HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={boundary}"
                f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        out.append(head + body)
    return out


async def _client(port: int, queries: list[bytes], offset: int, stop_at: float, latencies: list[float], errors: list[str],
                  stamps: list[tuple[float, float]] | None = None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < stop_at:
            request = queries[i % len(queries)]
            i += 1
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            if status != 200:
                errors.append(str(status))
                continue
            latencies.append((time.perf_counter() - started) * 1000.0)
            if stamps is not None:
                stamps.append((started, latencies[-1]))
    finally:
        writer.close()


async def _load(port: int, queries: list[bytes], concurrency: int, seconds: float,
                stamps: list[tuple[float, float]] | None = None) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    # Warm-up: every client's connection and a first query, not counted.
    await asyncio.gather(*(_client(port, queries, c * 997, time.perf_counter() + 0.3, [], []) for c in range(concurrency)))
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(_client(port, queries, c * 997 + 1, stop_at, latencies, errors, stamps) for c in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": len(errors), "elapsed": elapsed}


def summarise(runs: list[dict]) -> dict:
    latencies = [x for r in runs for x in r["latencies"]]
    total_s = sum(r["elapsed"] for r in runs)
    return {
        "qps": round(len(latencies) / total_s, 1),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p95_ms": round(percentile(latencies, 0.95), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "requests": len(latencies),
        "errors": sum(r["errors"] for r in runs),
        "qps_per_round": [round(len(r["latencies"]) / r["elapsed"], 1) for r in runs],
    }


def _alternating_rounds(start: Callable[[str], PrismServer], queries: list, levels: tuple[int, ...],
                        seconds: float, rounds: int, label: str) -> dict[str, dict[int, list[dict]]]:
    """Load runs against two servers, "on" and "off" (`start(mode)` starts each), per concurrency
    level and round; which mode goes first alternates, so drift in machine load hits both alike."""
    servers: dict[str, PrismServer] = {}
    runs: dict[str, dict[int, list[dict]]] = {mode: {c: [] for c in levels} for mode in ("on", "off")}
    try:
        for mode in ("on", "off"):
            servers[mode] = start(mode)
        for round_no in range(rounds):
            for c in levels:
                for mode in (("on", "off") if round_no % 2 == 0 else ("off", "on")):
                    result = asyncio.run(_load(servers[mode].port, queries, c, seconds))
                    runs[mode][c].append(result)
                    print(f"  round {round_no + 1} {label} {mode:3} concurrency {c:2}: "
                          f"{len(result['latencies']) / result['elapsed']:.1f} q/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return runs


def measure(home: Path, env: dict, seconds: float, rounds: int, kind: str = "text",
            levels: tuple[int, ...] = CONCURRENCY) -> dict:
    queries = text_requests(query_words(home)) if kind == "text" else image_requests(image_files(home))
    runs = _alternating_rounds(lambda mode: start_server(home.resolve(), mode == "on", env),
                               queries, levels, seconds, rounds, f"{kind} batching")
    table = {mode: {str(c): summarise(runs[mode][c]) for c in levels} for mode in runs}
    return {
        "home": str(home),
        "queries": kind,
        "batching_on": table["on"],
        "batching_off": table["off"],
        "qps_ratio_on_over_off": {str(c): round(table["on"][str(c)]["qps"] / table["off"][str(c)]["qps"], 2) for c in levels},
        "p50_ratio_on_over_off": {str(c): round(table["on"][str(c)]["p50_ms"] / table["off"][str(c)]["p50_ms"], 3) for c in levels},
    }


def measure_zipf(home: Path, env: dict, seconds: float, rounds: int, levels: tuple[int, ...]) -> dict:
    """A Zipf(1.0) stream over the titles against two servers (batching on in both): the query and
    result caches on (the defaults) and off, taking turns as the batching modes do."""
    queries = zipf_requests(query_words(home))
    runs = _alternating_rounds(lambda mode: start_server(home.resolve(), True, env, caches=mode == "on"),
                               queries, levels, seconds, rounds, "zipf caches")
    table = {mode: {str(c): summarise(runs[mode][c]) for c in levels} for mode in runs}
    return {
        "home": str(home),
        "queries": "zipf(1.0) text stream",
        "distinct_queries_in_stream": len(set(queries)),
        "caches_on": table["on"],
        "caches_off": table["off"],
        "qps_ratio_on_over_off": {str(c): round(table["on"][str(c)]["qps"] / table["off"][str(c)]["qps"], 2) for c in levels},
        "p50_ratio_on_over_off": {str(c): round(table["on"][str(c)]["p50_ms"] / table["off"][str(c)]["p50_ms"], 3) for c in levels},
    }


def _swap_pair(home: Path) -> tuple[str, str]:
    """The home's active index version and the newest other one, which the swap runs alternate."""
    from store import Store

    store = Store.open(f"sqlite:///{(home / 'prism.db').resolve()}", apply_migrations=False)
    versions = [v.index_version for v in store.list_index_versions()]
    active = store.active_index_version().index_version
    store.close()
    if len(versions) < 2:
        raise SystemExit(f"{home} has one index version: build another (`prism index`) for the swap run")
    return active, next(v for v in reversed(versions) if v != active)


def _swap_result(home, root, clients, activated, steady_s, during_s, *, method: str | None = None) -> dict:
    """One swap run's figures; failures are the errors of the requests made during the swaps."""
    return {
        "home": str(home),
        "code": str(root) if root else "this tree",
        **({"method": method} if method else {}),
        "clients": clients,
        "activations": len(activated),
        "activation_s_p50": round(statistics.median(activated), 3) if activated else None,
        "steady": steady_s,
        "during_swaps": during_s,
        "p99_ratio_swaps_over_steady": round(during_s["p99_ms"] / steady_s["p99_ms"], 3),
        "failures": during_s["errors"],
        "targets": {"p99_ratio": "<= 1.5", "failures": 0},
    }


def measure_swaps(home: Path, env: dict, seconds: float, clients: int, swaps: int, root: Path | None = None) -> dict:
    """`swaps` activations (alternating the home's two newest index versions) spread over
    `seconds` x 2 while `clients` send text queries, against the same load with no swap first.
    Every activation goes through POST /v1/models/{version}/activate; the version loads in the
    background of the searches (the activating request waits for it, searches do not)."""
    import httpx

    active, other = _swap_pair(home)
    token = "query-batching-swaps"
    queries = text_requests(query_words(home))
    server = start_server(home.resolve(), True, {**env, "PRISM_ADMIN_TOKEN": token}, root=root)
    activated: list[float] = []
    try:
        steady = asyncio.run(_load(server.port, queries, clients, seconds))

        async def swapping() -> dict:
            window = 2 * seconds
            started = time.perf_counter()

            async def swapper() -> None:
                async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                             headers={"Authorization": f"Bearer {token}"}) as client:
                    for i in range(swaps):
                        await asyncio.sleep(max(0.0, started + window * (i + 0.5) / swaps - time.perf_counter()))
                        t0 = time.perf_counter()
                        r = await client.post(f"/v1/models/{(other, active)[i % 2]}/activate")
                        r.raise_for_status()
                        assert r.json()["serving"], r.text
                        activated.append(time.perf_counter() - t0)

            load = asyncio.create_task(_load(server.port, queries, clients, window))
            await swapper()
            return await load

        during = asyncio.run(swapping())
    finally:
        server.stop()
    steady_s, during_s = summarise([steady]), summarise([during])
    return _swap_result(home, root, clients, activated, steady_s, during_s)


def measure_swaps_interleaved(home: Path, env: dict, clients: int, swaps: int, slot_s: float,
                              root: Path | None = None) -> dict:
    """The swap run for a noisy host: one load of 2 x `swaps` slots of `slot_s`, quiet and swap
    slots alternating (an activation at the start of each swap slot). Requests are classed by
    the slot they started in, so "steady" and "during swaps" share the host's load, second by
    second, instead of one following the other."""
    import httpx

    active, other = _swap_pair(home)
    token = "query-batching-swaps"
    queries = text_requests(query_words(home))
    server = start_server(home.resolve(), True, {**env, "PRISM_ADMIN_TOKEN": token}, root=root)
    activated: list[float] = []
    stamps: list[tuple[float, float]] = []
    clock: dict[str, float] = {}
    try:
        async def run() -> dict:
            load = asyncio.create_task(_load(server.port, queries, clients, 2 * swaps * slot_s, stamps))
            await asyncio.sleep(0.35)  # _load's own warm-up (0.3 s) before its measured window
            clock["started"] = started = time.perf_counter()
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         headers={"Authorization": f"Bearer {token}"}) as client:
                for i in range(swaps):
                    await asyncio.sleep(max(0.0, started + (2 * i + 1) * slot_s - time.perf_counter()))
                    t0 = time.perf_counter()
                    r = await client.post(f"/v1/models/{(other, active)[i % 2]}/activate")
                    r.raise_for_status()
                    assert r.json()["serving"], r.text
                    activated.append(time.perf_counter() - t0)
            return await load

        total = asyncio.run(run())
    finally:
        server.stop()
    quiet: list[float] = []
    swapping: list[float] = []
    for at, ms in stamps:
        slot = int((at - clock["started"]) // slot_s)
        if 0 <= slot < 2 * swaps:
            (swapping if slot % 2 else quiet).append(ms)
    half = total["elapsed"] / 2
    steady_s = summarise([{"latencies": quiet, "errors": 0, "elapsed": half}])
    during_s = summarise([{"latencies": swapping, "errors": total["errors"], "elapsed": half}])
    method = f"interleaved: {swaps} quiet and {swaps} swap slots of {slot_s} s, requests by the slot they started in"
    return _swap_result(home, root, clients, activated, steady_s, during_s, method=method)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo-home", type=Path, default=Path("prism-data"), help="a PRISM_HOME with the demo indexed")
    parser.add_argument("--vit-home", type=Path, default=Path("prism-data-bench-vit"), help="built on first use")
    parser.add_argument("--vit-model", default="ViT-B-32:random")
    parser.add_argument("--vit-products", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency level, per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--setups", nargs="+", default=["demo", "vit-b-32"], choices=["demo", "vit-b-32"])
    parser.add_argument("--clients", type=int, nargs="*", default=list(CONCURRENCY),
                        help="concurrency levels of the text run, batching on vs off (none: no such run)")
    parser.add_argument("--image-clients", type=int, nargs="*", default=[32],
                        help="concurrency levels of the image-upload run per setup (none: no image run)")
    parser.add_argument("--zipf-clients", type=int, nargs="*", default=[],
                        help="concurrency levels of a Zipf(1.0) title stream, caches on vs off (none: no such run)")
    parser.add_argument("--swaps", type=int, default=0,
                        help="activations (the home's two newest index versions, alternating) under 32 clients")
    parser.add_argument("--swap-slot", type=float, default=0.0,
                        help="seconds: measure the swaps in alternating quiet and swap slots of this length, one "
                        "load (for a noisy host); 0: a steady run, then a swap run")
    parser.add_argument("--swap-baseline", type=Path, default=None,
                        help="a source tree (e.g. `git archive` of the commit before a change) whose server runs "
                        "the same swap run, alternating with this tree's, for a before/after in one run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "query_batching.json")
    args = parser.parse_args()

    setups = {}
    if "demo" in args.setups:
        if (args.demo_home / "prism.db").exists():
            setups["demo"] = (args.demo_home, {})
        else:
            print(f"no demo home at {args.demo_home}: run `prism demo --no-serve` for the demo setup")
    if "vit-b-32" in args.setups:
        setups["vit-b-32"] = (vit_home(args.vit_home, args.vit_model, args.vit_products),
                              {"PRISM_MODEL": args.vit_model, "PRISM_DEVICE": "cpu"})
    result = {
        "benchmark": "query_batching",
        "seconds_per_level_per_round": args.seconds,
        "rounds": args.rounds,
        "setups": {},
        "zipf": {},
        "swaps": {},
        "swap_comparison": {},
        "targets": {"qps_ratio_at_32": ">= 2.0", "lone_query_p50_ratio": "<= 1.1", "image_qps_ratio_at_32": ">= 1.5"},
        "machine": machine_info(),
        # The host's load around the run (other work on a shared machine): read ratios against it.
        "load_average_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for name, (home, env) in setups.items():
        print(f"[{name}] {home}", flush=True)
        if args.clients:
            result["setups"][name] = measure(home, env, args.seconds, args.rounds, levels=tuple(args.clients))
        if args.image_clients:
            result["setups"][f"{name} image uploads"] = measure(home, env, args.seconds, args.rounds, "image",
                                                                tuple(args.image_clients))
        def swap_run(root: Path | None) -> dict:
            if args.swap_slot > 0:
                return measure_swaps_interleaved(home, env, 32, args.swaps, args.swap_slot, root=root)
            return measure_swaps(home, env, args.seconds, 32, args.swaps, root=root)

        if args.swaps and args.swap_baseline:
            # Before/after: baseline and this tree take turns, the first of each round alternating.
            runs = []
            for round_no in range(args.rounds):
                for root in ((args.swap_baseline, None) if round_no % 2 == 0 else (None, args.swap_baseline)):
                    runs.append(swap_run(root))
                    print(f"  round {round_no + 1} swaps ({runs[-1]['code']}): p99 ratio "
                          f"{runs[-1]['p99_ratio_swaps_over_steady']}", flush=True)
            result["swaps"][name] = next(r for r in runs if r["code"] == "this tree")
            result["swap_comparison"][name] = runs
        elif args.swaps:
            result["swaps"][name] = swap_run(None)
        if args.zipf_clients:
            result["zipf"][name] = measure_zipf(home, env, args.seconds, args.rounds, tuple(args.zipf_clients))
    result["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    from rich.console import Console
    from rich.table import Table

    for name, setup in result["setups"].items():
        out = Table(title=f"{name}: HTTP {setup['queries']} queries, micro-batching on vs off ({args.rounds} rounds x {args.seconds:.0f} s)")
        for col in ("clients", "batching", "q/s", "p50 ms", "p95 ms", "p99 ms", "errors"):
            out.add_column(col, justify="right")
        for c in map(int, setup["qps_ratio_on_over_off"]):
            for mode in ("on", "off"):
                row = setup[f"batching_{mode}"][str(c)]
                out.add_row(str(c), mode, f"{row['qps']:.1f}", f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}",
                            f"{row['p99_ms']:.1f}", str(row["errors"]))
            out.add_row("", "on/off", f"{setup['qps_ratio_on_over_off'][str(c)]:.2f}x",
                        f"{setup['p50_ratio_on_over_off'][str(c)]:.2f}x", "", "", "")
        Console().print(out)
    for name, setup in result["zipf"].items():
        out = Table(title=f"{name}: Zipf(1.0) title stream, {setup['distinct_queries_in_stream']} distinct queries, "
                    "query + result caches on vs off (batching on)")
        for col in ("clients", "caches", "q/s", "p50 ms", "p99 ms", "errors"):
            out.add_column(col, justify="right")
        for c in setup["qps_ratio_on_over_off"]:
            for mode in ("on", "off"):
                row = setup[f"caches_{mode}"][c]
                out.add_row(c, mode, f"{row['qps']:.1f}", f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}", str(row["errors"]))
        Console().print(out)
    for name, runs in result["swap_comparison"].items():
        for run in runs:
            print(f"{name} [{run['code']}]: p99 {run['during_swaps']['p99_ms']:.1f} ms during vs "
                  f"{run['steady']['p99_ms']:.1f} steady ({run['p99_ratio_swaps_over_steady']:.2f}x), "
                  f"q/s {run['during_swaps']['qps']:.1f} vs {run['steady']['qps']:.1f}, {run['failures']} failures, "
                  f"activation p50 {run['activation_s_p50']} s")
    for name, setup in result["swaps"].items():
        print(f"{name}: {setup['activations']} activations under {setup['clients']} clients: p99 "
              f"{setup['during_swaps']['p99_ms']:.1f} ms during the swaps vs {setup['steady']['p99_ms']:.1f} steady "
              f"({setup['p99_ratio_swaps_over_steady']:.2f}x, target <= 1.5), {setup['failures']} failures; "
              f"q/s {setup['during_swaps']['qps']:.1f} vs {setup['steady']['qps']:.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
