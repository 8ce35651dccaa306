"""Search-log rows written in groups off the request path (feedback/search_log.py): events are
accepted as soon as a search answered, and no queued row is lost on a graceful shutdown."""

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from prism_server import PrismServer
from store import Store

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

WORDS = ["red shoe", "blue lamp", "green mug", "black bag", "white shirt", "yellow hat", "wooden chair", "steel pan"]


def _click(body: dict, n: int) -> list[dict]:
    hit = body["results"][0]
    now = datetime.now(timezone.utc).isoformat()
    return [{"event_id": f"{body['query_id']}-{n}-{kind}", "type": kind, "query_id": body["query_id"],
             "product_id": hit["product_id"], "position": hit["rank"], "ts": now} for kind in ("impression", "click")]


@pytest.fixture(scope="module")
def slow_flush_home(build_serving_home):
    # An interval no test waits out: a row is written only when a group fills, events ask, or shutdown.
    return build_serving_home("search-log-home", search_log_flush_ms=60_000, search_log_group_rows=10_000)


def test_events_right_after_each_search_are_accepted_while_rows_are_still_queued(slow_flush_home):
    with TestClient(create_app(slow_flush_home)) as client:
        services = client.app.state.services
        assert services.search_log.grouped
        query_ids = []
        for i in range(24):
            body = client.get("/v1/search", params={"q": WORDS[i % len(WORDS)] + f" {i}", "k": 3}).json()
            # Answered, and the row is still only queued: the events below must make it durable.
            assert services.store.get_search(body["query_id"]) is None
            query_ids.append(body["query_id"])
            r = client.post("/v1/events", json=_click(body, i))
            assert r.status_code == 200, r.text
            assert r.json() == {"stored": 2, "duplicates": 0}
        assert set(services.store.searches_by_ids(query_ids)) == set(query_ids)

        # Many searches from many threads, then the events of each at once, from many threads too.
        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(lambda i: client.get("/v1/search", params={"q": WORDS[i % 8], "k": 2}).json(), range(64)))
            assert all(services.store.get_search(b["query_id"]) is None for b in bodies[-4:])
            answers = list(pool.map(lambda pair: client.post("/v1/events", json=_click(pair[1], pair[0])), enumerate(bodies)))
        assert [a.status_code for a in answers] == [200] * 64, [a.text for a in answers if a.status_code != 200][:3]


def test_graceful_shutdown_writes_every_queued_row(slow_flush_home):
    store = Store.open(slow_flush_home.db_url)
    try:
        with TestClient(create_app(slow_flush_home)) as client:
            with ThreadPoolExecutor(6) as pool:
                ids = list(pool.map(
                    lambda i: client.get("/v1/search", params={"q": WORDS[i % 8], "k": 2}).json()["query_id"], range(90)))
            assert client.app.state.services.search_log.stats()["queued"] == 90
            assert store.searches_by_ids(ids) == {}  # nothing written yet: the interval never passed
        assert set(store.searches_by_ids(ids)) == set(ids)
    finally:
        store.close()


def test_sigterm_to_prism_serve_writes_every_queued_row(build_serving_home, databases, tmp_path):
    """The real server, two workers: SIGTERM (`PrismServer.stop`) runs each worker's shutdown."""
    settings = build_serving_home("search-log-sigterm")
    env = databases.env(settings.home, PRISM_DEVICE="cpu", PRISM_THREADS="1",
                        PRISM_SEARCH_LOG_FLUSH_MS="60000", PRISM_SEARCH_LOG_GROUP_ROWS="10000")
    with PrismServer(env, workers=2, log=tmp_path / "serve.log").start(timeout_s=120) as server:
        # A fresh connection per request, so the kernel spreads them over both workers.
        ids = [httpx.get(server.url + "/v1/search", params={"q": WORDS[i % 8], "k": 2}).json()["query_id"]
               for i in range(40)]
        store = Store.open(databases.url(settings.home))
        try:
            assert len(store.searches_by_ids(ids)) == 0
        finally:
            store.close()
        server.stop()
    store = Store.open(databases.url(settings.home))
    try:
        assert set(store.searches_by_ids(ids)) == set(ids)
    finally:
        store.close()


def test_events_reach_another_worker_than_the_search_did(build_serving_home, databases, tmp_path):
    """With two workers an event can land on the worker that did not answer its search, which cannot
    flush its peer's queue: it looks again for a moment (`peer_wait_s`) instead of refusing."""
    settings = build_serving_home("search-log-peers")
    env = databases.env(settings.home, PRISM_DEVICE="cpu", PRISM_THREADS="1", PRISM_SEARCH_LOG_FLUSH_MS="400")
    with PrismServer(env, workers=2, log=tmp_path / "serve.log").start(timeout_s=120) as server:
        statuses = []
        for i in range(30):
            body = httpx.get(server.url + "/v1/search", params={"q": WORDS[i % 8], "k": 2}).json()
            statuses.append(httpx.post(server.url + "/v1/events", json=_click(body, i)).status_code)
        assert statuses == [200] * 30
        # Unknown ids are still refused, after looking again for a peer's group.
        bogus = {**_click(body, 99)[0], "query_id": "0" * 32, "event_id": "bogus"}
        r = httpx.post(server.url + "/v1/events", json=[bogus])
        assert r.status_code == 422 and "unknown query_id" in r.text


def _row(i: int) -> dict:
    return dict(query_id=f"q{i:05d}", query_text=f"query {i}", image_hash=None, query_product_id=None, target="image",
                filters={}, k=10, offset=0, model_version="m", index_version="v", result_ids=["A", "B"], took_ms=1.0,
                ts=datetime.now(timezone.utc))


def test_groups_are_written_when_full_asked_for_or_closed_and_the_queue_is_bounded(store):
    from feedback import SearchLogWriter

    writer = SearchLogWriter(store, flush_ms=60_000, max_rows=4, max_queued=8)
    try:
        for i in range(3):
            writer.add(_row(i))
        assert store.searches_by_ids(["q00000"]) == {}  # under a group, before the interval
        assert writer.ensure_written(["q00001"])  # asked for: written now, with the rows before it
        assert set(store.searches_by_ids(["q00000", "q00001", "q00002"])) == {"q00000", "q00001", "q00002"}
        assert writer.ensure_written(["never-queued"])  # nothing to wait for
        for i in range(3, 40):  # ten times the queue's bound from one thread: groups make room
            writer.add(_row(i))
        assert writer.stats()["queued"] <= 8
    finally:
        writer.close()
    assert len(store.searches_by_ids([f"q{i:05d}" for i in range(40)])) == 40
    assert writer.stats()["rows_written"] == 40 and writer.stats()["rows_failed"] == 0
    logged = store.get_search("q00007")
    assert logged["result_ids"] == ["A", "B"] and logged["filters"] == {} and logged["query_text"] == "query 7"


def test_flush_ms_zero_writes_in_the_request(store):
    from feedback import SearchLogWriter

    writer = SearchLogWriter(store, flush_ms=0)
    writer.add(_row(1))
    assert store.get_search("q00001") is not None and not writer.grouped
    writer.close()
