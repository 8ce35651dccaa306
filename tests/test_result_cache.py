"""Ranked pages of repeated text queries (search/results.py): a repeat skips the ranking, any
catalog change made through another worker is searched on the next query, filters are part of
what is cached, and the cache can be turned off. Real indexes, the tiny model, two apps on one
database as `--workers 2` runs them."""

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from search.results import ResultCache

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "result-cache-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def settings(build_serving_home):
    return build_serving_home("result-cache", admin_token=TOKEN)


def _search(client, q: str, **params) -> dict:
    r = client.get("/v1/search", params={"q": q, "k": 5, **params})
    assert r.status_code == 200, r.text
    return r.json()


def _ids(body: dict) -> list[str]:
    return [hit["product_id"] for hit in body["results"]]


def test_a_repeat_is_answered_from_the_cache_and_a_change_elsewhere_is_searched_next(settings):
    with TestClient(create_app(settings), headers=ADMIN) as writer, TestClient(create_app(settings)) as reader:
        pages = reader.app.state.services.engine.results
        first = _search(reader, "NEW-ITEM-77", target="text")
        assert "ann" in first["timings_ms"] and pages.stats()["misses"] == 1
        again = _search(reader, "NEW-ITEM-77", target="text")
        # No ranking ran: neither the identifier SQL and query vector (prepare) nor the ANN search.
        assert "ann" not in again["timings_ms"] and "prepare" not in again["timings_ms"]
        assert pages.stats()["hits"] == 1
        assert _ids(again) == _ids(first) and [h["score"] for h in again["results"]] == [h["score"] for h in first["results"]]
        assert again["query_id"] != first["query_id"]  # every search is its own, logged one
        assert "NEW-ITEM-77" not in _ids(first)

        # A product whose id is the query, written through the other worker: an exact identifier
        # match ranks first, so a page cached before the change would miss it.
        r = writer.put("/v1/products/NEW-ITEM-77", json={
            "title": "a product written after the page was cached", "description": "", "category": "shoes",
            "brand": "Later", "price": 10.0, "currency": "EUR", "stock": 3, "attributes": {}})
        assert r.status_code in (200, 201), r.text
        after = _search(reader, "NEW-ITEM-77", target="text")
        assert _ids(after)[0] == "NEW-ITEM-77"
        assert "ann" in after["timings_ms"] and pages.stats()["invalidations"] >= 1
        assert _ids(_search(reader, "NEW-ITEM-77", target="text"))[0] == "NEW-ITEM-77"
        assert pages.stats()["hits"] == 2

        # The counts reach /metrics.
        metrics = reader.get("/metrics").text
        assert "prism_result_cache_hits_total 2.0" in metrics


def test_filters_and_pages_are_cached_apart(settings):
    with TestClient(create_app(settings)) as client:
        everything = _search(client, "red running shoes")
        category = everything["results"][-1]["category"]
        filtered = _search(client, "red running shoes", category=category)
        assert "ann" in filtered["timings_ms"]  # not the unfiltered page
        assert filtered["results"] and all(hit["category"] == category for hit in filtered["results"])
        second_page = _search(client, "red running shoes", offset=5)
        assert "ann" in second_page["timings_ms"] and not set(_ids(second_page)) & set(_ids(everything))
        assert _ids(_search(client, "red running shoes", category=category)) == _ids(filtered)
        assert _ids(_search(client, "red running shoes")) == _ids(everything)
        assert client.app.state.services.engine.results.stats()["hits"] == 2


def test_result_cache_off_ranks_every_search(build_serving_home):
    settings = build_serving_home("result-cache-off", result_cache_entries=0)
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            assert "ann" in _search(client, "blue leather bag")["timings_ms"]
        assert client.app.state.services.engine.results.stats() == {
            "max_entries": 0, "entries": 0, "hits": 0, "misses": 0, "invalidations": 0}


def test_one_catalog_state_at_a_time_and_least_recently_used_first():
    cache = ResultCache(max_entries=2)
    cache.put(("v1", 5), ("a",), [(1, 0.9, {})])
    cache.put(("v1", 5), ("b",), [(2, 0.8, {})])
    assert cache.get(("v1", 5), ("a",)) == [(1, 0.9, {})]
    cache.put(("v1", 5), ("c",), [(3, 0.7, {})])  # "b" was used least recently
    assert cache.get(("v1", 5), ("b",)) is None and cache.get(("v1", 5), ("c",)) is not None
    # A journal entry (seq 6) makes every page of seq 5 unreachable, and a page a slower search
    # ranked at seq 5 after that is not stored.
    assert cache.get(("v1", 6), ("a",)) is None
    cache.put(("v1", 5), ("a",), [(1, 0.9, {})])
    assert cache.get(("v1", 6), ("a",)) is None and cache.stats()["entries"] == 0
    # A version swap likewise.
    cache.put(("v1", 6), ("a",), [(1, 0.9, {})])
    assert cache.get(("v2", 6), ("a",)) is None
    assert cache.stats()["invalidations"] == 2
