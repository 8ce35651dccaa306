"""A newly activated version is loaded (and warmed) in the background and swapped in by reference:
no request loads it, and requests keep answering from the version serving until the swap."""

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from indexer import CatalogIndexer, IndexOptions
from waiting import eventually

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")


def test_requests_answer_from_the_old_version_while_the_new_one_loads(build_serving_home, tiny_embedder):
    settings = build_serving_home("background-swap")
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.services.engine
        store = client.app.state.services.store
        old = client.get("/readyz").json()["index_version"]
        # Held by the test: the loader thread, started by the next request's sync, waits on it,
        # so the new version cannot be ready before the requests below, whatever the timing.
        with engine._loading:
            new = CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder,
                                 options=IndexOptions(batch_size=32)).run(None).index_version
            assert store.active_index_version().index_version == new
            for _ in range(3):
                r = client.get("/v1/search", params={"q": "red shoe", "k": 3})
                assert r.status_code == 200 and r.json()["index_version"] == old
            assert engine._loader is not None and engine._loader.is_alive()
        # Released: the loader loads, warms and swaps; the next requests see the new version.
        assert eventually(lambda: client.get("/v1/search", params={"q": "red shoe", "k": 3}).json()["index_version"] == new,
                          timeout_s=60)
        assert client.get("/readyz").json()["index_version"] == new


def test_a_new_index_of_the_serving_model_swaps_without_an_encode_and_keeps_hits_cached(build_serving_home, tiny_embedder):
    """An activation that changes the index but not the model warms the new index with ANN searches
    alone (the model is warm from the queries it serves), and the hit records cached before the
    swap are re-read on the loading thread, not dropped: searches after it read nothing by SQL.
    What indexing wrote outside the journal (an image's state) still shows from the swap on."""
    from store import ImageState

    settings = build_serving_home("swap-same-model")
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.services.engine
        store = client.app.state.services.store
        query = {"q": "P00040", "target": "text", "k": 3}
        first = client.get("/v1/search", params=query).json()
        hit = next(r for r in first["results"] if r["product_id"] == "P00040")
        assert hit["image_url"] is not None  # its image is usable
        row = store.get_product("P00040")
        new = CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder,
                             options=IndexOptions(batch_size=32)).run(None).index_version
        # As an indexing run records what it found about an image: outside the journal.
        store.record_image_states([ImageState(row.row_id, row.image_hash, "broken", "found broken")],
                                  seen={row.row_id: (row.image_uri, row.image_hash)})
        assert engine.refresh()  # as the activate route loads a version
        swap = engine.last_swap
        assert swap["index_version"] == new
        assert swap["warm_encoded"] is False and swap["warm_ms"] is not None
        assert swap["metadata_refilled"] >= 3
        misses = engine.metadata.stats()["misses"]
        again = client.get("/v1/search", params=query).json()
        assert again["index_version"] == new
        assert engine.metadata.stats()["misses"] == misses  # every hit from the refilled cache
        # no longer usable: the hit names no image URL
        assert next(r for r in again["results"] if r["product_id"] == "P00040")["image_url"] is None
