"""Bounded work per request and per-query cost that does not grow with the catalog: the result
window, paging from one ranking, metadata-only updates, in-memory filters kept current by the
change journal, and tombstones only for indexed products. Real indexes built by the tiny model;
nothing in Prism is mocked."""

import base64
import random

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from indexer import AnnConfig, CatalogIndexer, CatalogUpdater, IndexOptions
from encoder_calls import count_encoder_calls
from prism_cli import run_prism
from sample_catalog import BRANDS, CATEGORIES, draw_product_image, make_catalog
from search import MAX_RESULT_WINDOW, QueryError, SearchEngine
from store import ProductFilter, ProductInput, Store

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _engine(settings, embedder) -> tuple[Store, SearchEngine]:
    """A store and engine of their own, as one server worker has."""
    store = Store.open(settings.db_url)
    engine = SearchEngine(store, indexes_dir=settings.indexes_dir, device="cpu")
    engine._embedders[embedder.name] = embedder
    assert engine.refresh()
    return store, engine


def _ids(result) -> list[str]:
    return [h.product.product_id for h in result.hits]


def _item(product, **changes) -> ProductInput:
    fields = dict(
        product_id=product.product_id, title=product.title, description=product.description,
        category=product.category, brand=product.brand, price=product.price, currency=product.currency,
        attributes=dict(product.attributes),
    )
    return ProductInput(**{**fields, **changes})


@pytest.fixture(scope="module")
def served(build_serving_home, tiny_embedder):
    settings = build_serving_home("costs-home", admin_token=TOKEN)
    store, engine = _engine(settings, tiny_embedder)
    yield settings, store, engine
    store.close()


# ---------------------------------------------------------------- 1. the result window


def test_offset_plus_k_is_capped_in_the_engine(served):
    _, _, engine = served
    assert len(engine.search(text="hat", k=10, offset=MAX_RESULT_WINDOW - 10).hits) == 0  # 120 products
    for k, offset in ((10, MAX_RESULT_WINDOW - 9), (MAX_RESULT_WINDOW, 1), (2, MAX_RESULT_WINDOW - 1)):
        with pytest.raises(QueryError, match=f"offset \\+ k is {k + offset}.*{MAX_RESULT_WINDOW}"):
            engine.search(text="hat", k=k, offset=offset)


def test_offset_plus_k_over_the_window_is_a_422_with_a_detail_everywhere(served, small_catalog):
    settings, _, _ = served
    image = (small_catalog.parent / "images" / "00003.png").read_bytes()
    with TestClient(create_app(settings), headers=ADMIN) as client:
        answers = [
            client.get("/v1/search", params={"q": "hat", "k": 10, "offset": 995}),
            client.post("/v1/search", json={"text": "hat", "k": 10, "offset": 995}),
            client.post("/v1/search", json={"similar_to": "P00003", "k": 500, "offset": 501}),
            client.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "10", "offset": "995"}),
        ]
        for r in answers:
            assert r.status_code == 422, r.text
            assert "offset + k" in r.json()["detail"] and str(MAX_RESULT_WINDOW) in r.json()["detail"]
        for params in ({"k": 10, "offset": 990}, {"k": MAX_RESULT_WINDOW, "offset": 0}):
            assert client.get("/v1/search", params={"q": "hat", **params}).status_code == 200
        # Over the window on its own: the field says so.
        r = client.get("/v1/search", params={"q": "hat", "offset": MAX_RESULT_WINDOW})
        assert r.status_code == 422 and "query.offset" in r.json()["detail"]
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        for model in ("SearchRequest", "SearchParams"):
            if model in schema:
                assert str(MAX_RESULT_WINDOW) in schema[model]["properties"]["offset"]["description"]


def test_the_cli_refuses_the_same_window(served, databases):
    settings, _, _ = served
    proc = run_prism(["search", "hat", "--offset", "995", "-k", "10"], databases.env(settings.home), check=False)
    assert proc.returncode != 0 and "offset + k is 1005" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("target", ["image", "text", "hybrid"])
def test_pages_are_disjoint_slices_of_one_ranking(served, target):
    """Hybrid fusion used to rank at depth offset + k, so a deeper page re-fused and could repeat
    what page 1 had shown."""
    _, _, engine = served
    for query in ("red shoe", "green hat model 7"):
        whole = _ids(engine.search(text=query, target=target, k=120))
        for k in (7, 25):
            pages = [_ids(engine.search(text=query, target=target, k=k, offset=o)) for o in range(0, 126, k)]
            flat = [pid for page in pages for pid in page]
            assert len(flat) == len(set(flat)) == 120
            assert flat == whole


def test_pages_of_an_ivfpq_index_never_repeat(tmp_path, store, tiny_embedder):
    """An approximate index: a deeper search finds what a shallower one missed."""
    catalog = make_catalog(tmp_path / "catalog", 300)
    options = IndexOptions(batch_size=64, ann=AnnConfig(flat_threshold=0, recall_target=0.9))
    summary = CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder, options=options).run(catalog)
    assert summary.indexes["image"]["kind"] == "ivfpq"
    engine = SearchEngine(store, indexes_dir=tmp_path / "home" / "indexes", device="cpu")
    engine._embedders[tiny_embedder.name] = tiny_embedder
    assert engine.refresh()
    for target in ("image", "hybrid"):
        for query in ("red shoe", "blue bag", "yellow watch"):
            whole = _ids(engine.search(text=query, target=target, k=300))
            flat = [pid for o in range(0, 300, 30) for pid in _ids(engine.search(text=query, target=target, k=30, offset=o))]
            assert len(flat) == len(set(flat)) and flat == whole


# ---------------------------------------------------------------- 2. metadata-only updates


def test_a_price_only_put_embeds_nothing_and_is_seen_by_every_worker(build_serving_home, tiny_embedder, small_catalog, monkeypatch):
    settings = build_serving_home("meta-home")
    store, engine = _engine(settings, tiny_embedder)
    other_store, other = _engine(settings, tiny_embedder)  # a second worker
    try:
        image = str(small_catalog.parent / "images" / "00010.png")
        product = store.get_product("P00010")
        updater = CatalogUpdater(home=settings.home, store=store)
        calls = count_encoder_calls(monkeypatch, tiny_embedder)
        outcome = updater.upsert(_item(product, price=987.5, brand="newbrand", attributes={"size": "L"}), tiny_embedder)
        assert calls == {"encode_texts": 0, "encode_images": 0}
        assert outcome.image_action == "keep" and not outcome.created and outcome.metadata_only
        assert [c.op for c in store.catalog_changes(outcome.seq - 1)] == ["meta"]
        monkeypatch.undo()

        for worker in (engine, other):
            hit = worker.search(image=image, k=1).hits[0]
            assert hit.product.product_id == "P00010" and hit.product.price == 987.5
            assert hit.score == pytest.approx(1.0, abs=1e-4)  # still the indexed vector: nothing moved
            stats = worker.stats()
            assert stats["overlay_vectors"] == {"image": 0, "text": 0} and stats["masked"] == {"image": 0, "text": 0}
            priced = worker.search(text="anything", k=10, filters=ProductFilter(price_min=900))
            assert _ids(priced) == ["P00010"]
            assert _ids(worker.search(text="anything", k=10, filters=ProductFilter(brands=("newbrand",)))) == ["P00010"]
            cheap = worker.search(text="anything", k=120, filters=ProductFilter(price_max=400))
            assert "P00010" not in _ids(cheap) and len(cheap.hits) == 119

        # A new title is embedded again; so is a product being restored.
        calls = count_encoder_calls(monkeypatch, tiny_embedder)
        updater.upsert(_item(store.get_product("P00010"), title="a new title"), tiny_embedder)
        assert calls["encode_texts"] == 1
        store.soft_delete_product("P00011")
        updater.upsert(_item(store.get_product("P00011", include_deleted=True), price=1.0), tiny_embedder)
        assert calls["encode_texts"] == 2
    finally:
        for s in (store, other_store):
            s.close()


def test_a_price_only_put_over_http(build_serving_home, small_catalog, monkeypatch):
    settings = build_serving_home("meta-http-home", admin_token=TOKEN)
    with TestClient(create_app(settings), headers=ADMIN) as client:
        before = client.get("/v1/products/P00020").json()
        embedder = client.app.state.services.engine.serving.embedder
        calls = count_encoder_calls(monkeypatch, embedder)
        body = {k: before[k] for k in ("title", "description", "category", "brand", "currency", "attributes")}
        r = client.put("/v1/products/P00020", json={**body, "price": 4321.0})
        assert r.status_code == 200 and r.json()["image_action"] == "keep" and r.json()["price"] == 4321.0
        assert calls == {"encode_texts": 0, "encode_images": 0}
        monkeypatch.undo()
        image = (small_catalog.parent / "images" / "00020.png").read_bytes()
        found = client.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "1"}).json()
        assert found["results"][0]["product_id"] == "P00020" and found["results"][0]["price"] == 4321.0
        r = client.get("/v1/search", params={"q": "x", "price_min": 4000})
        assert [h["product_id"] for h in r.json()["results"]] == ["P00020"]
        assert client.get("/readyz").json()["overlay_vectors"] == {"image": 0, "text": 0}


# ---------------------------------------------------------------- 3. filters in memory


def _random_filter(rng: random.Random) -> ProductFilter:
    categories = [*CATEGORIES, "lamps", "never-seen"]
    brands = [*BRANDS, "newbrand", "never-seen"]
    low = rng.choice([None, 0.0, 5.0, 50.0, 120.3, 199.0])
    high = rng.choice([None, 10.0, 60.0, 150.0, 1000.0])
    if low is not None and high is not None and low > high:
        low, high = high, low
    # Shoppers and feeds spell values in any case: filters match them all alike.
    spell = lambda v: rng.choice([v, v.upper(), v.title(), f" {v} "])  # noqa: E731
    flt = ProductFilter(
        categories=tuple(spell(v) for v in rng.sample(categories, rng.choice([0, 0, 1, 2]))),
        brands=tuple(spell(v) for v in rng.sample(brands, rng.choice([0, 0, 1, 2]))),
        price_min=low,
        price_max=high,
    )
    return flt if not flt.is_empty() else ProductFilter(categories=(rng.choice(categories),))


def _check_filters(engine, store, rng, n=60) -> None:
    engine.sync()
    for _ in range(n):
        flt = _random_filter(rng)
        mine, reference = engine.serving.filters.row_ids(flt), store.filter_row_ids(flt)
        assert mine.dtype == np.int64 and mine.tolist() == reference.tolist(), flt


def test_in_memory_filters_equal_sql_after_puts_and_deletes(build_serving_home, tiny_embedder, monkeypatch):
    settings = build_serving_home("filters-home")
    store, engine = _engine(settings, tiny_embedder)
    rng = random.Random(7)
    updater = CatalogUpdater(home=settings.home, store=store)
    try:
        _check_filters(engine, store, rng)
        for step in range(40):
            pid = f"P{rng.randrange(120):05d}"
            current = store.get_product(pid, include_deleted=True)
            roll = rng.random()
            if roll < 0.15 and current.deleted_at is None:
                store.soft_delete_product(pid)
            elif roll < 0.55:  # metadata only (or a restore, when deleted)
                updater.upsert(_item(
                    current, category=rng.choice([*CATEGORIES, "lamps", None]), brand=rng.choice([*BRANDS, "newbrand", None]),
                    price=rng.choice([None, 0.0, 59.99, 60.0, 150.0, 999.0]),
                ), tiny_embedder)
            elif roll < 0.75:  # a new product, new values
                updater.upsert(ProductInput(product_id=f"NEW-{step}", title=f"new thing {step}",
                                            category=("lamps", "Lamps", "LAMPS")[step % 3],
                                            brand="newbrand", price=float(step)), tiny_embedder)
            else:  # text and metadata
                updater.upsert(_item(current, title=f"retitled {step}", price=float(rng.randrange(300))), tiny_embedder)
            if step % 8 == 7:
                _check_filters(engine, store, rng)
        _check_filters(engine, store, rng)
        # A worker that starts now loads the same state from the table and the journal.
        fresh_store, fresh = _engine(settings, tiny_embedder)
        try:
            _check_filters(fresh, fresh_store, random.Random(7))
        finally:
            fresh_store.close()
        # And a filtered search asks SQL nothing for its filter.
        monkeypatch.setattr(store, "filter_row_ids", lambda flt: pytest.fail("a filtered query scanned SQL"))
        # Text target: the lamps added above have no image.
        result = engine.search(text="thing", target="text", k=50, filters=ProductFilter(categories=("lamps",), price_max=20))
        assert result.hits and all(h.product.category.lower() == "lamps" and h.product.price <= 20 for h in result.hits)
    finally:
        store.close()


# ---------------------------------------------------------------- 4. tombstones


def test_only_indexed_deleted_products_are_masked(build_serving_home, tiny_embedder):
    settings = build_serving_home("tombstone-home")
    store, engine = _engine(settings, tiny_embedder)
    try:
        # Products no index ever held, deleted: nothing for a server to mask.
        store.upsert_products([ProductInput(product_id=f"GONE-{i}", title=f"gone {i}") for i in range(50)])
        for i in range(50):
            store.soft_delete_product(f"GONE-{i}")
        for pid in ("P00001", "P00002"):
            store.soft_delete_product(pid)
        gone = {store.get_product(p, include_deleted=True).row_id for p in ("P00001", "P00002")}
        fresh_store, fresh = _engine(settings, tiny_embedder)  # loads, then replays the deletes
        try:
            for worker in (engine, fresh):
                worker.sync()
                assert {m: set(worker.serving.overlay.masked(m).ids.tolist()) for m in ("image", "text")} == {
                    "image": gone, "text": gone
                }
                assert "P00001" not in _ids(worker.search(image=draw_product_image(1), k=10))
            # A version built after the deletes holds none of them: no tombstone at all.
            rebuilt = CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder,
                                     options=IndexOptions()).run(None).index_version
            for worker in (engine, fresh):
                assert worker.wait_until_serving(rebuilt)  # loaded in the background, then swapped
                assert worker.stats()["masked"] == {"image": 0, "text": 0}
                assert len(worker.search(text="x", k=200).hits) == 118
        finally:
            fresh_store.close()
    finally:
        store.close()


def test_put_of_a_new_product_with_an_image_is_filtered_by_its_category(build_serving_home, tiny_embedder):
    """The full (embedding) path also feeds the filters: new row ids beyond the loaded ones."""
    settings = build_serving_home("new-row-home", admin_token=TOKEN)
    with TestClient(create_app(settings), headers=ADMIN) as client:
        import io

        buf = io.BytesIO()
        draw_product_image(5005).save(buf, format="PNG")
        r = client.put("/v1/products/LAMP-1", json={"title": "desk lamp", "category": "lamps", "price": 30,
                                                    "image_b64": base64.b64encode(buf.getvalue()).decode()})
        assert r.status_code == 201
        found = client.get("/v1/search", params={"q": "lamp", "category": "lamps", "k": 5}).json()
        assert [h["product_id"] for h in found["results"]] == ["LAMP-1"]
        assert client.delete("/v1/products/LAMP-1").status_code == 204
        assert client.get("/v1/search", params={"q": "lamp", "category": "lamps"}).json()["results"] == []
