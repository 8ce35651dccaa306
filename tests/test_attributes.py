"""Attribute filters, `in_stock` and facet counts (issue 19, item 4).

The in-memory FilterIndex is checked against the SQL reference (`Store.filter_row_ids`, and
facet counts recounted here from the products table) on random filters, before and after
journaled changes and in a freshly started worker; the HTTP contract (POST, GET `attr.NAME`,
the upload form) and its refusals are checked over a real server app. Real indexes built by the
tiny model; nothing in Prism is mocked."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import PrismSettings
from indexer import CatalogIndexer, CatalogUpdater, IndexOptions
from sample_catalog import make_catalog, product_row
from search import SearchEngine
from store import AttributeCondition, ProductFilter, ProductInput, Store, attribute_keys
from waiting import eventually

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "attr-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TINY = "prism-tiny-vit:random"
COLORS = ["red", "Blue", "green", "BLACK"]
SIZES = [38, 40, 42.0, "44", 46]
TAGS = ["sale", "new", "eco"]
N = 150


def _attributes(i: int) -> dict:
    attrs = {"color": COLORS[i % 4], "size": SIZES[i % 5]}
    if i % 3 == 0:
        attrs["tags"] = [TAGS[i % 3], TAGS[(i + 1) % 3]]
    if i % 7 == 0:
        attrs["dims"] = {"w": 3}  # nested: kept, never filterable
    return attrs


def _row(i: int, image: str) -> dict:
    row = product_row(i, image)
    row["price"] = float(row["price"])
    row["attributes"] = _attributes(i)
    if i % 4 != 3:  # every fourth product has unknown stock
        row["stock"] = i % 5  # 0 = out of stock
    return row


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_embedder, databases):
    root = tmp_path_factory.mktemp("attr-catalog")
    make_catalog(root, N)
    catalog = root / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(_row(i, f"images/{i:05d}.png")) + "\n" for i in range(N)))
    home = tmp_path_factory.mktemp("attr-home")
    store = Store.open(databases.url(home))
    try:
        CatalogIndexer(home=home, store=store, embedder=tiny_embedder, options=IndexOptions(batch_size=32)).run(catalog)
    finally:
        store.close()
    return PrismSettings(home=home, device="cpu", model=TINY, database_url=databases.url(home), admin_token=TOKEN)


def _engine(settings, embedder) -> tuple[Store, SearchEngine]:
    store = Store.open(settings.db_url)
    engine = SearchEngine(store, indexes_dir=settings.indexes_dir, device="cpu")
    engine._embedders[embedder.name] = embedder
    assert engine.refresh()
    return store, engine


def _random_filter(rng: random.Random) -> ProductFilter:
    conditions = []
    if rng.random() < 0.6:
        spell = rng.choice([str.lower, str.upper, str.title])
        conditions.append(AttributeCondition("color", values=tuple(sorted(
            {spell(c).casefold() for c in rng.sample([*COLORS, "mauve"], rng.choice([1, 2]))}))))
    if rng.random() < 0.4:
        low, high = rng.choice([None, 38, 40.5, 42]), rng.choice([None, 41, 44, 100])
        if low is not None and high is not None and low > high:
            low, high = high, low
        conditions.append(AttributeCondition("size", numeric=True, low=low, high=high))
    if rng.random() < 0.3:
        conditions.append(AttributeCondition("size", values=tuple(sorted({k for v in rng.sample(SIZES, 2)
                                                                         for k in attribute_keys(v)}))))
    if rng.random() < 0.3:
        conditions.append(AttributeCondition("tags", values=(rng.choice([*TAGS, "rare"]),)))
    if rng.random() < 0.1:
        conditions.append(AttributeCondition(rng.choice(["nope", "dims"]), values=("3",)))
    flt = ProductFilter(
        categories=tuple(rng.sample(["shoes", "bags", "hats", "lamps"], rng.choice([0, 0, 1, 2]))),
        price_max=rng.choice([None, None, 60.0, 150.0]),
        attributes=tuple(conditions),
        in_stock=rng.choice([None, None, True, False]),
    )
    return flt if not flt.is_empty() else ProductFilter(in_stock=True)


FACETS = ["category", "brand", "in_stock", "attributes.color", "attributes.size", "attributes.tags", "attributes.nope"]


def _reference_facets(store: Store, flt: ProductFilter) -> dict[str, dict[str, int]]:
    """Facet counts recounted from the products table, values compared case-insensitively."""
    rows = set(store.filter_row_ids(flt).tolist()) if not flt.is_empty() else None
    out = {name: Counter() for name in FACETS}
    for chunk in store.iter_live_products():
        for p in chunk:
            if rows is not None and p.row_id not in rows:
                continue
            if p.category:
                out["category"][p.category.casefold()] += 1
            if p.brand:
                out["brand"][p.brand.casefold()] += 1
            out["in_stock"]["unknown" if p.stock is None else "true" if p.stock > 0 else "false"] += 1
            for name in ("color", "size", "tags"):
                for key in attribute_keys(p.attributes.get(name)):
                    out[f"attributes.{name}"][key] += 1
    return {name: dict(counts) for name, counts in out.items()}


def _folded(facets: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out = {}
    for name, values in facets.items():
        counts = Counter()
        for value, count in values.items():
            (key,) = attribute_keys(value) if name.startswith("attributes.") else [value.casefold()]
            counts[key] += count
        out[name] = dict(counts)
    return out


def _check(engine: SearchEngine, store: Store, rng: random.Random, n: int = 40) -> None:
    engine.sync()
    index = engine.serving.filters
    for _ in range(n):
        flt = _random_filter(rng)
        assert index.row_ids(flt).tolist() == store.filter_row_ids(flt).tolist(), flt
        assert _folded(index.facets(flt, FACETS, limit=1000)) == _reference_facets(store, flt), flt
    assert _folded(index.facets(ProductFilter(), FACETS, limit=1000)) == _reference_facets(store, ProductFilter())


def test_in_memory_attribute_filters_and_facets_equal_sql_after_changes(home, tiny_embedder):
    store, engine = _engine(home, tiny_embedder)
    rng = random.Random(19)
    updater = CatalogUpdater(home=home.home, store=store)
    try:
        _check(engine, store, rng)
        for step in range(40):
            pid = f"P{rng.randrange(N):05d}"
            current = store.get_product(pid)
            roll = rng.random()
            if current is None:
                continue
            if roll < 0.1:
                store.soft_delete_product(pid)
            elif roll < 0.7:  # metadata only: new attribute values and names, stock changes
                attrs = dict(current.attributes)
                attrs["color"] = rng.choice([*COLORS, "Mauve", None])
                if rng.random() < 0.3:
                    attrs["tags"] = rng.sample([*TAGS, "rare"], 2)
                if rng.random() < 0.2:
                    attrs["material"] = rng.choice(["wool", "Cotton"])
                updater.patch(pid, {"attributes": attrs, "stock": rng.choice([None, 0, 3])}, None)
            else:
                updater.upsert(ProductInput(product_id=f"NEW-{step}", title=f"new thing {step}", category="lamps",
                                            attributes={"color": "mauve", "size": 40 + step % 3, "tags": ["rare"]},
                                            stock=step % 2), tiny_embedder)
            if step % 10 == 9:
                _check(engine, store, rng, n=15)
        # A worker that starts now loads the same state from the table and the journal.
        fresh_store, fresh = _engine(home, tiny_embedder)
        try:
            _check(fresh, fresh_store, random.Random(19))
        finally:
            fresh_store.close()
    finally:
        store.close()


def test_facets_are_capped_and_most_frequent_first(home, tiny_embedder):
    store, engine = _engine(home, tiny_embedder)
    try:
        index = engine.serving.filters
        full = index.facets(ProductFilter(), ["attributes.color"], limit=1000)["attributes.color"]
        top = index.facets(ProductFilter(), ["attributes.color"], limit=2)["attributes.color"]
        assert len(top) == 2 and list(top.values()) == sorted(full.values(), reverse=True)[:2]
        assert list(full.values()) == sorted(full.values(), reverse=True)
    finally:
        store.close()


# ---------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def client(home):
    with TestClient(create_app(home), headers=ADMIN) as c:
        yield c


def _ids(response) -> set[str]:
    assert response.status_code == 200, response.text
    return {h["product_id"] for h in response.json()["results"]}


def _refused(response, *words: str) -> str:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and all(w in detail for w in words), detail
    return detail


def test_post_get_and_upload_filter_by_attributes_and_count_facets(client, small_catalog):
    body = {"text": "item", "target": "text", "k": 100,
            "filters": {"attributes": {"color": ["RED"], "size": {"min": 39, "max": 42}}, "in_stock": True},
            "facets": ["category", "attributes.color", "attributes.size", "in_stock"]}
    r = client.post("/v1/search", json=body)
    hits = r.json()["results"]
    assert hits and all(h["attributes"]["color"] == "red" and 39 <= float(h["attributes"]["size"]) <= 42
                        and (h["stock"] is None or h["stock"] > 0) for h in hits)
    facets = r.json()["facets"]
    assert facets["attributes.color"] == {"red": len(hits)}  # every match, here all on one page
    assert sum(facets["in_stock"].values()) == len(hits) and "false" not in facets["in_stock"]
    assert set(facets["attributes.size"]) <= {"40", "42"}

    # GET: attr.NAME=VALUE, repeatable; facets comma-separated.
    r = client.get("/v1/search", params=[("q", "item"), ("target", "text"), ("k", "100"), ("attr.color", "red"),
                                         ("attr.color", "blue"), ("facets", "attributes.color,brand")])
    assert r.status_code == 200, r.text
    assert {h["attributes"]["color"] for h in r.json()["results"]} == {"red", "Blue"}
    assert set(r.json()["facets"]) == {"attributes.color", "brand"}
    assert set(r.json()["facets"]["attributes.color"]) == {"red", "Blue"}

    # The upload form: the same fields.
    image = (small_catalog.parent / "images" / "00004.png").read_bytes()
    r = client.post("/v1/search/image", files={"file": ("q.png", image, "image/png")},
                    data={"k": "50", "attr.tags": "sale", "in_stock": "false", "facets": "attributes.tags"})
    assert r.status_code == 200, r.text
    assert r.json()["results"] and all("sale" in h["attributes"]["tags"] and h["stock"] == 0 for h in r.json()["results"])
    assert r.json()["facets"]["attributes.tags"]["sale"] == len(r.json()["results"])

    # Without `facets`, none are counted.
    assert client.post("/v1/search", json={"text": "item"}).json()["facets"] is None


def test_attribute_filters_on_unknown_names_match_nothing(client):
    r = client.post("/v1/search", json={"text": "item", "filters": {"attributes": {"no-such-thing": ["x"]}},
                                        "facets": ["attributes.no-such-thing"]})
    assert _ids(r) == set() and r.json()["facets"] == {"attributes.no-such-thing": {}}
    # A nested attribute is stored but not filterable: matches nothing either.
    assert _ids(client.post("/v1/search", json={"text": "item", "filters": {"attributes": {"dims": ["3"]}}})) == set()


HOSTILE = [
    ({"attributes": {"color": {"name": "red"}}}, ["body.filters.attributes", "color", "unknown key", "nested"]),
    ({"attributes": {"color": [["red"]]}}, ["body.filters.attributes", "color", "not filterable"]),
    ({"attributes": {"color": [{"a": 1}]}}, ["body.filters.attributes", "color", "not filterable"]),
    ({"attributes": {"color": []}}, ["body.filters.attributes", "color", "at least one"]),
    ({"attributes": {"color": [None]}}, ["body.filters.attributes", "color"]),
    ({"attributes": {"size": {"min": 5, "max": 1}}}, ["body.filters.attributes", "above max"]),
    ({"attributes": {"size": {"min": "big"}}}, ["body.filters.attributes", "size", "number"]),
    ({"attributes": {"size": {"min": True}}}, ["body.filters.attributes", "size"]),
    ({"attributes": {"_image_rejected": ["x"]}}, ["body.filters.attributes", "Prism's own"]),
    ({"attributes": {"": ["x"]}}, ["body.filters.attributes", "1 to 256"]),
    ({"attributes": {"c": ["x" * 300]}}, ["body.filters.attributes", "at most 256"]),
    ({"attributes": {"c": ["a\x00b"]}}, ["body.filters.attributes", "NUL"]),
    ({"attributes": {f"a{i}": ["x"] for i in range(17)}}, ["body.filters.attributes", "at most 16"]),
    ({"attributes": {"c": ["x"] * 101}}, ["body.filters.attributes", "limit is 100"]),
    ({"attributes": ["color"]}, ["body.filters.attributes", "must be an object"]),
    ({"in_stock": "maybe"}, ["body.filters.in_stock"]),
]


@pytest.mark.parametrize("filters, words", HOSTILE)
def test_hostile_attribute_filters_are_refused_with_detail(client, filters, words):
    _refused(client.post("/v1/search", json={"text": "item", "filters": filters}), *words)


def test_hostile_facet_lists_are_refused_with_detail(client):
    _refused(client.post("/v1/search", json={"text": "item", "facets": [f"attributes.a{i}" for i in range(9)]}),
             "body.facets", "at most 8")
    _refused(client.post("/v1/search", json={"text": "item", "facets": ["colour"]}), "body.facets", "unknown facet")
    _refused(client.post("/v1/search", json={"text": "item", "facets": ["attributes."]}), "unknown facet")
    _refused(client.post("/v1/search", json={"text": "item", "facets": "category"}), "body.facets")
    _refused(client.post("/v1/search", json={"text": "item", "facets": [{"name": "category"}]}), "body.facets")
    _refused(client.get("/v1/search", params={"q": "item", "facets": ",".join(["category"] * 3 + [f"attributes.{i}" for i in range(8)])}),
             "query.facets", "at most 8")
    _refused(client.get("/v1/search", params={"q": "item", "facets": "price"}), "query.facets", "unknown facet")
    _refused(client.get("/v1/search", params=[("q", "item"), ("facets", "category"), ("facets", "brand")]),
             "query.facets", "give it once")
    _refused(client.get("/v1/search", params={"q": "item", "attributes": "x"}), "attributes", "attr.NAME=VALUE")
    _refused(client.get("/v1/search", params={"q": "item", "attr._x": "y"}), "Prism's own")
    _refused(client.post("/v1/search/image", files={"file": ("q.png", b"x", "image/png")},
                         data={"facets": "nope"}), "body.facets", "unknown facet")


def test_stock_is_stored_returned_and_filtered(client):
    r = client.put("/v1/products/STOCK-1", json={"title": "stocked lamp", "category": "lamps", "stock": 0})
    assert r.status_code == 201 and r.json()["stock"] == 0, r.text
    assert client.get("/v1/products/STOCK-1").json()["stock"] == 0
    hidden = client.post("/v1/search", json={"text": "lamp", "target": "text", "k": 200,
                                             "filters": {"category": "lamps", "in_stock": True}})
    assert "STOCK-1" not in _ids(hidden)
    shown = client.post("/v1/search", json={"text": "lamp", "target": "text", "k": 200,
                                            "filters": {"category": "lamps", "in_stock": False}})
    assert "STOCK-1" in _ids(shown)
    _refused(client.put("/v1/products/STOCK-2", json={"title": "t", "stock": -1}), "body.stock")
    _refused(client.put("/v1/products/STOCK-2", json={"title": "t", "stock": 1.5}), "body.stock")
    _refused(client.put("/v1/products/STOCK-2", json={"title": "t", "stock": True}), "body.stock")
    assert client.get("/v1/products/STOCK-2").status_code == 404


def test_catalog_stock_column_is_checked_per_row(tmp_path):
    from indexer import RowError, read_catalog

    path = tmp_path / "c.csv"
    path.write_text("product_id,title,stock\nA,a,3\nB,b,\nC,c,-1\nD,d,2.5\nE,e,lots\n")
    rows = list(read_catalog(path))
    good = {r.product.product_id: r.product.stock for r in rows if not isinstance(r, RowError)}
    bad = {r.product_id: r.reason for r in rows if isinstance(r, RowError)}
    assert good == {"A": 3, "B": None}
    assert set(bad) == {"C", "D", "E"} and all("stock" in reason for reason in bad.values())


def test_a_feed_without_stock_keeps_the_stock_an_inventory_system_patched(tmp_path, databases):
    """A nightly feed that carries no stock says nothing about it: the stock PATCHed since stays.
    An empty stock value (the column is there) still clears it."""
    from datetime import datetime, timedelta, timezone

    from indexer import RowError, read_catalog
    from store import SourcePreference, Store

    def load(store, name, text):
        path = tmp_path / name
        path.write_text(text)
        rows = [r.product for r in read_catalog(path) if not isinstance(r, RowError)]
        later = datetime.now(timezone.utc) + timedelta(hours=1)  # a feed newer than any edit
        store.upsert_products(rows, feed_time=later, prefer=SourcePreference.NEWER)

    store = Store.open(databases.url(tmp_path))
    try:
        load(store, "first.csv", "product_id,title,stock\nA,a,3\nB,b,4\n")
        store.patch_product_metadata("A", {"stock": 0})
        load(store, "feed.csv", "product_id,title,price\nA,a,9.5\nB,b,1\n")
        load(store, "feed.jsonl", '{"product_id": "B", "title": "b", "price": 2}\n')
        assert (store.get_product("A").stock, store.get_product("A").price) == (0, 9.5)
        assert (store.get_product("B").stock, store.get_product("B").price) == (4, 2)
        load(store, "cleared.jsonl", '{"product_id": "A", "title": "a", "price": 9.5, "stock": null}\n')
        assert store.get_product("A").stock is None
    finally:
        store.close()


def test_cli_search_takes_attribute_filters_in_stock_and_facets(home, client, databases):
    from prism_cli import run_prism

    env = databases.env(home.home)
    args = ["search", "item", "--target", "text", "-k", "50", "--attr", "color=red", "--attr", "size=39..42",
            "--in-stock", "--facets", "attributes.color,in_stock"]
    done = run_prism([*args, "--json"], env, check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    http = client.post("/v1/search", json={
        "text": "item", "target": "text", "k": 50, "facets": ["attributes.color", "in_stock"],
        "filters": {"attributes": {"color": ["red"], "size": {"min": 39, "max": 42}}, "in_stock": True}}).json()
    assert [h["product_id"] for h in answer["results"]] == [h["product_id"] for h in http["results"]]
    assert answer["facets"] == http["facets"] and answer["facets"]["attributes.color"]
    table = run_prism(args, env, check=False)
    assert table.returncode == 0 and "attributes.color: red (" in table.stdout, table.stdout
    for bad, words in ((["--facets", "nope"], "--facets: unknown facet"), (["--attr", "color"], "NAME=VALUE"),
                       (["--attr", "size=a..b"], "MIN..MAX"), (["--attr", "_x=1"], "--attr")):
        failed = run_prism(["search", "item", *bad], env, check=False)
        assert failed.returncode == 2 and words in failed.stderr, (bad, failed.stderr)


def test_the_search_log_records_attribute_filters_and_in_stock(client, home):
    r = client.post("/v1/search", json={"text": "item", "filters": {
        "attributes": {"color": ["Red", "blue"], "size": {"min": 40}}, "in_stock": False}})
    assert r.status_code == 200, r.text
    store = Store.open(home.db_url)
    try:
        logged = eventually(lambda: store.get_search(r.json()["query_id"]), timeout_s=10)
    finally:
        store.close()
    assert logged["filters"] == {"attributes": {"color": ["blue", "red"], "size": {"min": 40.0, "max": None}},
                                 "in_stock": False}
