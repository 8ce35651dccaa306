"""PATCH /v1/products/{id} and `prism products patch` (issue 19, item 5): metadata changes embed
nothing and are served by every worker on its next query; title, description or image changes
re-embed like PUT; bad requests are 4xx with a `detail` and change nothing."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from encoder_calls import count_encoder_calls
from prism_cli import run_prism
from sample_catalog import draw_product_image
from search import SearchEngine
from store import ProductFilter, Store

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "patch-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def settings(build_serving_home):
    return build_serving_home("patch-home", admin_token=TOKEN)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings), headers=ADMIN) as c:
        yield c


def _other_worker(settings, embedder) -> tuple[Store, SearchEngine]:
    store = Store.open(settings.db_url)
    engine = SearchEngine(store, indexes_dir=settings.indexes_dir, device="cpu")
    engine._embedders[embedder.name] = embedder
    assert engine.refresh()
    return store, engine


def test_a_price_patch_embeds_nothing_and_every_worker_serves_it(client, settings, monkeypatch, tiny_embedder):
    other_store, other = _other_worker(settings, tiny_embedder)
    try:
        before = client.get("/v1/products/P00030").json()
        calls = count_encoder_calls(monkeypatch, client.app.state.services.engine.serving.embedder)
        r = client.patch("/v1/products/P00030", json={"price": 9876.5, "stock": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["price"] == 9876.5 and body["stock"] == 4 and body["image_action"] == "keep"
        assert body["created"] is False and body["catalog_seq"] > 0
        assert {k: body[k] for k in ("title", "description", "category", "brand", "currency", "attributes", "image_url")} \
            == {k: before[k] for k in ("title", "description", "category", "brand", "currency", "attributes", "image_url")}
        assert calls == {"encode_texts": 0, "encode_images": 0}
        # The next query, here and in another worker, sees the new price.
        r = client.get("/v1/search", params={"q": "x", "price_min": 9000})
        assert [h["product_id"] for h in r.json()["results"]] == ["P00030"]
        assert r.json()["results"][0]["stock"] == 4
        found = other.search(text="x", filters=ProductFilter(price_min=9000))
        assert [h.product.product_id for h in found.hits] == ["P00030"]
        assert client.get("/readyz").json()["overlay_vectors"] == {"image": 0, "text": 0}
    finally:
        other_store.close()


def test_null_clears_and_attributes_replace(client):
    r = client.patch("/v1/products/P00031", json={"price": None, "brand": None, "attributes": {"colour": "teal"}})
    assert r.status_code == 200, r.text
    assert (r.json()["price"], r.json()["brand"], r.json()["attributes"]) == (None, None, {"colour": "teal"})
    hits = client.post("/v1/search", json={"text": "x", "k": 5, "filters": {"attributes": {"colour": ["TEAL"]}}}).json()
    assert [h["product_id"] for h in hits["results"]] == ["P00031"]


def test_a_title_patch_re_embeds_like_put(client, monkeypatch):
    calls = count_encoder_calls(monkeypatch, client.app.state.services.engine.serving.embedder)
    r = client.patch("/v1/products/P00032", json={"title": "zanzibar periscope"})
    assert r.status_code == 200 and r.json()["title"] == "zanzibar periscope" and r.json()["image_action"] == "keep"
    assert calls == {"encode_texts": 1, "encode_images": 0}
    # The product's whole embedded text as the query: its own new vector, first whatever the model.
    text = f"zanzibar periscope. {r.json()['description']}"
    hits = client.get("/v1/search", params={"q": text, "target": "text", "k": 1}).json()["results"]
    assert hits[0]["product_id"] == "P00032" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert client.get("/readyz").json()["overlay_vectors"]["text"] >= 1


def test_a_price_change_landing_while_a_title_patch_embeds_is_not_undone(client, monkeypatch):
    """A re-embedding PATCH reads the row, embeds, then writes: the fields it did not patch must
    come from the row as it is at the write, not as it was before the embedding."""
    store = client.app.state.services.store
    embedder = client.app.state.services.engine.serving.embedder
    encode_texts = embedder.encode_texts
    landed = []

    def encode_while_another_worker_patches_the_price(texts, *args, **kwargs):
        if not landed:  # another worker's PATCH commits between this one's read and its write
            landed.append(store.patch_product_metadata("P00034", {"price": 4321.0}))
        return encode_texts(texts, *args, **kwargs)

    monkeypatch.setattr(embedder, "encode_texts", encode_while_another_worker_patches_the_price)
    r = client.patch("/v1/products/P00034", json={"title": "quetzal kaleidoscope"})
    assert r.status_code == 200, r.text
    assert landed and (r.json()["title"], r.json()["price"]) == ("quetzal kaleidoscope", 4321.0)
    stored = store.get_product("P00034")
    assert (stored.title, stored.price) == ("quetzal kaleidoscope", 4321.0)


def test_an_image_patch_re_embeds_the_image(client, monkeypatch):
    import io

    buffer = io.BytesIO()
    draw_product_image(9001).save(buffer, format="PNG")
    calls = count_encoder_calls(monkeypatch, client.app.state.services.engine.serving.embedder)
    r = client.patch("/v1/products/P00033", json={"image_b64": base64.b64encode(buffer.getvalue()).decode()})
    assert r.status_code == 200 and r.json()["image_action"] == "set", r.text
    assert calls["encode_images"] == 1
    found = client.post("/v1/search/image", files={"file": ("q.png", buffer.getvalue(), "image/png")}, data={"k": "1"})
    assert found.json()["results"][0]["product_id"] == "P00033"


BAD = [
    ({}, 422, ["at least one field"]),
    ({"colour": "red"}, 422, ["body.colour", "unknown field"]),
    ({"price": "cheap"}, 422, ["body.price"]),
    ({"price": True}, 422, ["body.price", "true or false"]),
    ({"price": -1}, 422, ["body.price"]),
    ({"stock": 2.5}, 422, ["body.stock"]),
    ({"title": None}, 422, ["title cannot be null"]),
    ({"title": "  "}, 422, ["body.title"]),
    ({"attributes": None}, 422, ["attributes cannot be null"]),
    ({"attributes": [1]}, 422, ["body.attributes"]),
    ({"attributes": {"a": "x" * 20_000}}, 422, ["limit is 16384"]),
    ({"currency": "euro"}, 422, ["body.currency"]),
    ({"image_b64": "not base64!"}, 422, ["body.image_b64"]),
    ([{"price": 1}], 422, ["body"]),
]


@pytest.mark.parametrize("body, status, words", BAD)
def test_bad_patches_are_refused_and_change_nothing(client, body, status, words):
    before = client.get("/v1/products/P00034").json()
    r = client.patch("/v1/products/P00034", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and all(w in detail for w in words), detail
    assert client.get("/v1/products/P00034").json() == before


def test_unknown_and_deleted_products_are_404_and_not_created(client):
    r = client.patch("/v1/products/NOPE-1", json={"price": 1})
    assert r.status_code == 404 and "NOPE-1" in r.json()["detail"]
    assert client.get("/v1/products/NOPE-1").status_code == 404
    assert client.delete("/v1/products/P00035").status_code == 204
    assert client.patch("/v1/products/P00035", json={"price": 1}).status_code == 404
    assert client.get("/v1/products/P00035").status_code == 404


def test_patch_needs_the_admin_token(settings):
    with TestClient(create_app(settings)) as anonymous:
        r = anonymous.patch("/v1/products/P00036", json={"price": 1})
        assert r.status_code == 401 and r.json()["detail"]


def test_cli_patch_changes_metadata_like_http(build_serving_home, databases):
    settings = build_serving_home("patch-cli-home")
    env = databases.env(settings.home)
    done = run_prism(["products", "patch", "P00040", "--price", "12.5", "--stock", "0", "--attributes", '{"colour": "red"}',
                      "--json"], env, check=False)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert (body["price"], body["stock"], body["attributes"]) == (12.5, 0, {"colour": "red"})
    shown = json.loads(run_prism(["products", "get", "P00040", "--json"], env).stdout)
    assert (shown["price"], shown["stock"]) == (12.5, 0)
    assert body["images"] == shown["images"] and len(shown["images"]) == 1  # the CLI answers as GET does
    cleared = run_prism(["products", "patch", "P00040", "--clear", "price"], env, check=False)
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(run_prism(["products", "get", "P00040", "--json"], env).stdout)["price"] is None
    for args, words in ((["P00040"], "give at least one field"), (["NOPE", "--price", "1"], "no product"),
                        (["P00040", "--price", "-3"], "price"), (["P00040", "--attributes", "[1]"], "attributes"),
                        (["P00040", "--clear", "title"], "title")):
        failed = run_prism(["products", "patch", *args], env, check=False)
        assert failed.returncode != 0 and words in failed.stderr, (args, failed.stderr)


def test_patched_identifiers_and_embedded_attributes_follow_the_text_fields(build_serving_home, tiny_embedder, monkeypatch):
    """With PRISM_ID_ATTRIBUTES=gtin and an attribute among PRISM_TEXT_FIELDS: a PATCH of the gtin
    embeds nothing and the gtin finds the product at once; a PATCH of the embedded attribute
    re-embeds the text, and the lexical leg finds its words."""
    settings = build_serving_home(
        "patch-text-fields", admin_token=TOKEN, text_fields="title,description,attributes.tagline", id_attributes="gtin"
    )
    with TestClient(create_app(settings), headers=ADMIN) as c:
        c.get("/v1/search", params={"q": "warm up", "k": 1})  # the serving model loaded
        calls = count_encoder_calls(monkeypatch, c.app.state.services.engine.serving.embedder)
        patched = c.patch("/v1/products/P00012", json={"attributes": {"gtin": "4006381333931"}})
        assert patched.status_code == 200, patched.text
        assert calls == {"encode_texts": 0, "encode_images": 0}
        for target in ("image", "text", "hybrid"):
            hits = c.get("/v1/search", params={"q": "4006381333931", "target": target, "k": 3}).json()["results"]
            assert hits[0]["product_id"] == "P00012" and hits[0]["scores"].get("exact") == 1, (target, hits[:1])

        calls.update(encode_texts=0, encode_images=0)  # the searches encoded their query
        patched = c.patch("/v1/products/P00012", json={"attributes": {"gtin": "4006381333931", "tagline": "zanzibar lantern"}})
        assert patched.status_code == 200, patched.text
        assert calls == {"encode_texts": 1, "encode_images": 0}
        hits = c.get("/v1/search", params={"q": "zanzibar lantern", "target": "hybrid", "k": 3}).json()["results"]
        assert hits[0]["product_id"] == "P00012"


def test_a_price_patch_journals_once_keeps_identifiers_and_writes_nothing_for_a_deleted_product(build_serving_home):
    """A price, stock or currency PATCH is written without reading the row first (one UPDATE, and on
    PostgreSQL the journal entry in the same statement): exactly one "meta" entry per PATCH, in
    order; the row's attributes and identifiers are as they were; a deleted product is 404 and
    leaves the journal as it was."""
    settings = build_serving_home("patch-plain-columns", admin_token=TOKEN, id_attributes="gtin")
    with TestClient(create_app(settings), headers=ADMIN) as c:
        store = c.app.state.services.store
        first = c.patch("/v1/products/P00012", json={"attributes": {"gtin": "4006381333931", "colour": "teal"}})
        assert first.status_code == 200, first.text
        seq = first.json()["catalog_seq"]
        for i, body in enumerate(({"price": 12.5}, {"stock": 0, "currency": "USD"})):
            r = c.patch("/v1/products/P00012", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["catalog_seq"] == seq + i + 1
            assert r.json()["attributes"] == {"gtin": "4006381333931", "colour": "teal"}
            product = c.get("/v1/products/P00012").json()
            assert {k: r.json()[k] for k in product if k != "images"} == {k: v for k, v in product.items() if k != "images"}
        assert [(e.op, e.product_id) for e in store.catalog_changes(seq)] == [("meta", "P00012")] * 2
        product = c.get("/v1/products/P00012").json()
        assert (product["price"], product["stock"], product["currency"]) == (12.5, 0, "USD")
        hits = c.get("/v1/search", params={"q": "4006381333931", "k": 1}).json()["results"]
        assert hits[0]["product_id"] == "P00012" and hits[0]["price"] == 12.5

        assert c.delete("/v1/products/P00013").status_code == 204
        newest = store.catalog_seq()
        assert c.patch("/v1/products/P00013", json={"price": 1}).status_code == 404
        assert store.catalog_seq() == newest


def test_the_patching_worker_applies_its_own_price_change_at_once_and_replays_anothers_first(
        client, settings, tiny_embedder, monkeypatch):
    """After a metadata PATCH the route brings its worker's filters to the new entry before it
    answers: from the returned row, reading nothing, when the entry is the next one; by replaying
    the journal when another worker's change came first (which must not be skipped)."""
    from store import ProductInput

    engine = client.app.state.services.engine
    client.get("/v1/search", params={"q": "x", "k": 1})  # this worker is current
    reads = []
    for name in ("catalog_changes", "filter_facts"):
        real = getattr(engine.store, name)
        monkeypatch.setattr(engine.store, name, lambda *a, _real=real, _name=name, **kw: reads.append(_name) or _real(*a, **kw))

    r = client.patch("/v1/products/P00040", json={"price": 7777.0})
    assert r.status_code == 200, r.text
    assert engine.serving.overlay.seq == r.json()["catalog_seq"] and reads == []
    row = engine.store.get_product("P00040").row_id
    assert engine.serving.filters.row_ids(ProductFilter(price_min=7000, price_max=8000)).tolist() == [row]

    other = Store.open(settings.db_url)  # another worker changes P00041 first
    try:
        p = other.get_product("P00041")
        other.update_product_metadata(ProductInput(p.product_id, p.title, p.description, p.category, p.brand, 8888.0,
                                                   p.currency, p.image_ref, p.image_uri, p.attributes, stock=p.stock),
                                      expect_updated_at=p.updated_at)
    finally:
        other.close()
    r = client.patch("/v1/products/P00040", json={"price": 7778.0})
    assert r.status_code == 200, r.text
    assert engine.serving.overlay.seq == r.json()["catalog_seq"] and reads == ["catalog_changes", "filter_facts"]
    both = engine.serving.filters.row_ids(ProductFilter(price_min=7000, price_max=9000)).tolist()
    assert both == sorted([row, engine.store.get_product("P00041").row_id])
