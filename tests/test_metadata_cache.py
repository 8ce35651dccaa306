"""Hit metadata comes from a per-process cache kept current with the catalog journal
(search/metadata.py): a change made through one worker shows in the next search of every other."""

import pytest
from fastapi.testclient import TestClient

from api.app import create_app

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "metadata-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def settings(build_serving_home):
    return build_serving_home("metadata-cache", admin_token=TOKEN)


def _first(client, product_id: str) -> dict | None:
    # A query equal to a product id puts that product first (exact identifier), whatever the model.
    results = client.get("/v1/search", params={"q": product_id, "target": "text", "k": 3}).json()["results"]
    return next((r for r in results if r["product_id"] == product_id), None)


def test_a_change_through_one_worker_shows_in_the_next_search_of_another(settings):
    # Two apps on one database: two workers, each with its own engine and cache, as `--workers 2` runs them.
    with TestClient(create_app(settings), headers=ADMIN) as writer, TestClient(create_app(settings)) as reader:
        cache = reader.app.state.services.engine.metadata
        before = _first(reader, "P00040")
        assert before is not None
        hits_before = cache.stats()["hits"]
        assert _first(reader, "P00040") == before
        assert cache.stats()["hits"] > hits_before  # served from the cache, not read again

        # PATCH (metadata only: no vector changes, only the journal says anything happened)
        r = writer.patch("/v1/products/P00040", json={"price": 4321.5, "stock": 0, "brand": "Cachebuster"})
        assert r.status_code == 200, r.text
        after = _first(reader, "P00040")
        assert (after["price"], after["stock"], after["brand"]) == (4321.5, 0, "Cachebuster")

        # PUT (a full replacement, re-embedded)
        product = writer.get("/v1/products/P00040").json()
        put = {k: product[k] for k in ("title", "description", "category", "brand", "price", "currency", "stock", "attributes")}
        r = writer.put("/v1/products/P00040", json={**put, "title": "renamed through the writer"})
        assert r.status_code == 200, r.text
        assert _first(reader, "P00040")["title"] == "renamed through the writer"

        # DELETE
        assert writer.delete("/v1/products/P00040").status_code == 204
        assert _first(reader, "P00040") is None
        assert reader.get("/v1/search", params={"q": "renamed through the writer", "target": "text"}).status_code == 200


def test_metadata_cache_off_reads_every_time(build_serving_home):
    settings = build_serving_home("metadata-off", metadata_cache_entries=0)
    with TestClient(create_app(settings)) as client:
        assert _first(client, "P00041") is not None and _first(client, "P00041") is not None
        assert client.app.state.services.engine.metadata.stats() == {
            "enabled": False, "max_entries": 0, "entries": 0, "hits": 0, "misses": 0}


def test_a_swap_refill_gives_way_to_an_invalidation_made_while_it_read(settings):
    """`reread` (a swap's loading thread) then a journal invalidation, then `refill` (the swap):
    the re-read record may predate the change, so the cache is emptied, not refilled."""
    from search.metadata import MetadataCache
    from store import Store

    store = Store.open(settings.db_url)
    try:
        row = store.get_product("P00042").row_id
        cache = MetadataCache(store)
        cache.products([row])
        assert cache.refill(cache.reread()) == 1  # nothing changed meanwhile: renewed in place
        assert cache.stats()["entries"] == 1
        reread = cache.reread()
        cache.invalidate([row])
        assert cache.refill(reread) == 0
        assert cache.stats()["entries"] == 0
    finally:
        store.close()
