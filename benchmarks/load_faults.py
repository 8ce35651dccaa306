"""Faults under load against a real `prism serve`: event durability through SIGKILL, hot swaps.

Two scenarios, each a function that returns a plain dict of what it measured; the test suite runs
them small (tests/test_reliability.py) and `make reliability` runs them at full size
(benchmarks/reliability.py writes docs/reliability.md).

durability  N events from C concurrent clients in batches through POST /v1/events. Every client
            re-posts some acknowledged batches verbatim (a retry after a lost answer) and keeps
            re-posting batches that failed. Optionally the whole server (its process group) is
            SIGKILLed once part of the stream is acknowledged, and restarted on the same port while
            the clients keep going. Afterwards the database must hold exactly N events, every
            acknowledged one among them.
hot_swap    C clients stream text and image searches while index versions are activated over
            HTTP, back and forth; every query must answer 200 from one of the versions.
"""

from __future__ import annotations

import asyncio
import base64
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from prism_server import PrismServer  # noqa: E402
from serve_latency import percentile, queries  # noqa: E402

ADMIN_TOKEN = "reliability-admin-token"


# ---------------------------------------------------------------- durability


def served_slots(base_url: str, n_searches: int, k: int = 10) -> list[tuple[str, str, int]]:
    """(query_id, product_id, rank) of real served results: what events may refer to."""
    import httpx

    slots = []
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for q in (queries(10_000) * (n_searches // 800 + 1))[:n_searches]:
            r = client.get("/v1/search", params={"q": q, "k": k})
            r.raise_for_status()
            body = r.json()
            slots += [(body["query_id"], hit["product_id"], hit["rank"]) for hit in body["results"]]
    return slots


def make_events(slots: list[tuple[str, str, int]], n: int, tag: str) -> list[dict]:
    """n distinct events over the served slots: an impression of each, then clicks, round after round."""
    now = datetime.now(timezone.utc).isoformat()
    events = []
    for i in range(n):
        query_id, product_id, rank = slots[i % len(slots)]
        kind = "impression" if (i // len(slots)) % 2 == 0 else "click"
        events.append({"event_id": f"{tag}-{i:07d}", "type": kind, "query_id": query_id, "product_id": product_id,
                       "position": rank, "ts": now})
    return events


@dataclass
class _Stream:
    batches: list[list[dict]]
    acked: set[str] = field(default_factory=set)
    stored: int = 0
    duplicates: int = 0
    posts: int = 0
    retries_after_ack: int = 0
    retry_duplicates_ok: int = 0
    retry_problems: list[str] = field(default_factory=list)
    failed_posts: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)


async def _post_events(base_url: str, stream: _Stream, pending: list[list[dict]], seed: int, retry_fraction: float,
                       deadline: float) -> None:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        while pending and time.monotonic() < deadline:
            batch = pending[0]
            started = time.perf_counter()
            try:
                r = await client.post("/v1/events", json=batch)
            except httpx.TransportError as exc:
                # The server is down (killed) or the answer was lost: the batch may or may not be
                # stored; a client retries it verbatim, and event_ids make that safe.
                stream.failed_posts += 1
                stream.failures[type(exc).__name__] = stream.failures.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(0.2)
                continue
            stream.posts += 1
            if r.status_code != 200:
                stream.failed_posts += 1
                stream.failures[str(r.status_code)] = stream.failures.get(str(r.status_code), 0) + 1
                await asyncio.sleep(0.2)
                continue
            stream.latencies_ms.append((time.perf_counter() - started) * 1000.0)
            body = r.json()
            stream.stored += body["stored"]
            stream.duplicates += body["duplicates"]
            stream.acked.update(e["event_id"] for e in batch)
            pending.pop(0)
            if rng.random() < retry_fraction:
                stream.retries_after_ack += 1
                await _retry_acknowledged(client, stream, batch, deadline)


async def _retry_acknowledged(client, stream: _Stream, batch: list[dict], deadline: float) -> None:
    """Post an acknowledged batch again, as a client that lost the answer would, until it is answered."""
    import httpx

    while time.monotonic() < deadline:
        try:
            again = await client.post("/v1/events", json=batch)
        except httpx.TransportError:
            await asyncio.sleep(0.2)  # the server is down: try again once it is back
            continue
        if again.status_code == 200 and again.json() == {"stored": 0, "duplicates": len(batch)}:
            stream.retry_duplicates_ok += 1
        else:
            stream.retry_problems.append(f"{again.status_code} {again.text[:200]}")
        return
    stream.retry_problems.append("no answer before the deadline")


def durability(
    env: dict[str, str],
    db_url: str,
    *,
    events: int = 20_000,
    clients: int = 32,
    batch_size: int = 25,
    retry_fraction: float = 0.1,
    kill_at_fraction: float | None = 0.4,
    workers: int = 1,
    searches: int | None = None,
    timeout_s: float = 900.0,
    log: Path | None = None,
) -> dict:
    """Post `events` events from `clients` clients; SIGKILL the server once `kill_at_fraction` of
    them are acknowledged (None: no kill). Returns counts; `lost` must be 0 and `rows_added` equal `events`."""
    from store import Store

    tag = f"dur{int(time.time() * 1000) % 10**9}"
    store = Store.open(db_url)
    try:
        rows_before = sum(store.count_events().values())
    finally:
        store.close()
    server = PrismServer({**env, "PRISM_ADMIN_TOKEN": ADMIN_TOKEN}, workers=workers, log=log).start()
    kills: list[dict] = []
    try:
        slots = served_slots(server.url, searches or max(1, events // 20))
        all_events = make_events(slots, events, tag)
        stream = _Stream([all_events[i : i + batch_size] for i in range(0, events, batch_size)])

        async def killer() -> None:
            if kill_at_fraction is None:
                return
            while len(stream.acked) < kill_at_fraction * events:
                await asyncio.sleep(0.005)
            acked_before = set(stream.acked)
            server.kill()
            down_at = time.monotonic()
            kills.append({"acked_at_kill": len(acked_before)})
            await asyncio.sleep(1.0)  # clients hit a dead port meanwhile
            await asyncio.to_thread(server.start)
            kills[-1]["downtime_s"] = round(time.monotonic() - down_at, 2)
            kills[-1]["acked_ids"] = acked_before

        async def run() -> None:
            deadline = time.monotonic() + timeout_s
            await asyncio.gather(killer(), *(
                _post_events(server.url, stream, stream.batches[c::clients], c, retry_fraction, deadline) for c in range(clients)
            ))

        started = time.perf_counter()
        asyncio.run(run())
        elapsed = time.perf_counter() - started
    finally:
        server.stop()

    store = Store.open(db_url)
    try:
        ids = [e["event_id"] for e in all_events]
        kept = store.stored_event_ids(ids)
        total_rows = sum(store.count_events().values())
    finally:
        store.close()
    acked_at_kill = kills[0].pop("acked_ids") if kills else set()
    return {
        "events": events,
        "clients": clients,
        "batch_size": batch_size,
        "workers": workers,
        "database": db_url.split(":", 1)[0],
        "seconds": round(elapsed, 1),
        "events_per_s": round(events / elapsed, 1),
        "acknowledged": len(stream.acked),
        "rows_for_these_events": len(kept),
        "rows_added": total_rows - rows_before,
        "lost": len(stream.acked - kept),
        "lost_acknowledged_before_kill": len(acked_at_kill - kept),
        "never_acknowledged": events - len(stream.acked),
        "stored_answers": stream.stored,
        "duplicate_answers": stream.duplicates,
        "retries_after_ack": stream.retries_after_ack,
        "retries_answered_all_duplicates": stream.retry_duplicates_ok,
        "retry_problems": stream.retry_problems[:5],
        "failed_posts": stream.failed_posts,
        "failures": stream.failures,
        "kills": kills,
        "post_p50_ms": round(percentile(stream.latencies_ms, 0.5), 1) if stream.latencies_ms else None,
        "post_p99_ms": round(percentile(stream.latencies_ms, 0.99), 1) if stream.latencies_ms else None,
    }


# ---------------------------------------------------------------- hot swap


async def _search_stream(base_url: str, stop: asyncio.Event, client_no: int, image: bytes, out: dict) -> None:
    import httpx

    words = queries(400)
    i = client_no * 37
    payload = base64.b64encode(image).decode()
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            i += 1
            out["queries"] += 1
            started = time.perf_counter()
            try:
                if i % 4 == 0:  # a quarter image queries: the swap must hold for both towers
                    r = await client.post("/v1/search", json={"image_b64": payload, "target": "image", "k": 10})
                else:
                    r = await client.get("/v1/search", params={"q": words[i % len(words)], "k": 10})
            except httpx.TransportError as exc:
                out["failed"].append(type(exc).__name__)
                continue
            out["latencies_ms"].append((time.perf_counter() - started) * 1000.0)
            if r.status_code != 200:
                out["failed"].append(f"{r.status_code} {r.text[:120]}")
                continue
            body = r.json()
            if len(body["results"]) == 0:
                out["failed"].append("no results")
            out["versions"][body["index_version"]] = out["versions"].get(body["index_version"], 0) + 1


def hot_swap(
    env: dict[str, str],
    versions: list[str],
    *,
    swaps: int = 20,
    interval_s: float = 1.5,
    clients: int = 16,
    workers: int = 1,
    image: bytes,
    log: Path | None = None,
    replica_homes: list[Path] | None = None,
) -> dict:
    """Stream searches from `clients` clients while activating `versions` in turn, `swaps` times.

    `replica_homes`: run one server per home instead of one, as replicas: each its own PRISM_HOME,
    all sharing the database and, as PRISM_SHARED_DIR, the home in `env` that holds the versions.
    Clients are spread over the replicas and activations sent to each in turn; every replica
    copies, loads and swaps in each version in the background while it keeps answering."""
    import contextlib

    import httpx

    out: dict = {"queries": 0, "failed": [], "latencies_ms": [], "versions": {}}
    activations: list[dict] = []
    base_env = {**env, "PRISM_ADMIN_TOKEN": ADMIN_TOKEN}
    if replica_homes:
        shared = Path(env["PRISM_HOME"]).resolve()
        url = env.get("PRISM_DATABASE_URL") or f"sqlite:///{shared / 'prism.db'}"
        server_envs = [{**base_env, "PRISM_HOME": str(h), "PRISM_SHARED_DIR": str(shared), "PRISM_DATABASE_URL": url}
                       for h in replica_homes]
    else:
        server_envs = [base_env]
    n = len(server_envs)
    if log is None or n == 1:
        logs = [log] * n
    else:
        logs = [log.with_name(f"{log.stem}-replica{i}{log.suffix}") for i in range(n)]
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(PrismServer(e, workers=workers, log=log_file))
                   for e, log_file in zip(server_envs, logs)]

        async def run() -> None:
            stop = asyncio.Event()
            streams = [asyncio.create_task(_search_stream(servers[c % len(servers)].url, stop, c, image, out))
                       for c in range(clients)]
            await asyncio.sleep(interval_s)
            for n in range(swaps):
                target = versions[(n + 1) % len(versions)]
                started = time.perf_counter()
                async with httpx.AsyncClient(base_url=servers[n % len(servers)].url, timeout=120) as admin:
                    r = await admin.post(f"/v1/models/{target}/activate", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                activations.append({"version": target, "status": r.status_code,
                                    "ms": round((time.perf_counter() - started) * 1000.0, 1)})
                await asyncio.sleep(interval_s)
            stop.set()
            await asyncio.gather(*streams)

        started = time.perf_counter()
        asyncio.run(run())
        elapsed = time.perf_counter() - started
    lat = out["latencies_ms"]
    return {
        "clients": clients,
        "workers": workers,
        "replicas": len(server_envs),
        "swaps": swaps,
        "activations_ok": sum(a["status"] == 200 for a in activations),
        "activation_ms_max": max((a["ms"] for a in activations), default=None),
        "seconds": round(elapsed, 1),
        "queries": out["queries"],
        "failed": len(out["failed"]),
        "failures": out["failed"][:10],
        "versions_served": out["versions"],
        "p50_ms": round(percentile(lat, 0.5), 1) if lat else None,
        "p99_ms": round(percentile(lat, 0.99), 1) if lat else None,
        "max_ms": round(max(lat), 1) if lat else None,
    }
