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
