"""Several images per product: catalog column `images`, one vector per image, image-target search
ranking each product by its best image (one result per product, `matched_image`)."""

import json

import pytest

from sample_catalog import draw_product_image, product_row, write_rows
from indexer import MAX_IMAGES, CatalogIndexer, IndexOptions, read_catalog
from indexer.catalog import RowError
from search import SearchEngine
from store import ProductFilter

N = 30
PER_PRODUCT = 3


def _multi_catalog(root, *, fmt="jsonl", n=N):
    """n products with PER_PRODUCT distinct images each; product i's j-th image is images/i_j.png."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        refs = []
        for j in range(PER_PRODUCT):
            rel = f"images/{i:03d}_{j}.png"
            if not (root / rel).exists():
                draw_product_image(1000 + i * PER_PRODUCT + j).save(root / rel)
            refs.append(rel)
        row = product_row(i, None)
        del row["image"]
        row["images"] = refs if fmt != "csv" else "|".join(refs)
        rows.append(row)
    return write_rows(root, rows, fmt=fmt)


def _engine(home, store, embedder):
    engine = SearchEngine(store, indexes_dir=home / "indexes", device="cpu")
    engine._embedders[embedder.name] = embedder
    assert engine.refresh()
    return engine


@pytest.fixture
def multi(tmp_path, store, tiny_embedder):
    catalog = _multi_catalog(tmp_path / "cat")
    home = tmp_path / "home"
    summary = CatalogIndexer(home=home, store=store, embedder=tiny_embedder,
                             options=IndexOptions(batch_size=16)).run(catalog)
    return summary, _engine(home, store, tiny_embedder), catalog.parent


def test_every_image_is_embedded_and_indexed(multi, store):
    summary, engine, _ = multi
    assert not summary.row_errors
    assert summary.images_embedded == N * PER_PRODUCT
    assert summary.indexes["image"]["count"] == N and summary.indexes["image_extra"]["count"] == N * (PER_PRODUCT - 1)
    p = store.get_product("P00004")
    others = store.product_images([p.row_id])[p.row_id]
    assert p.image_ref == "images/004_0.png"
    assert [(im.position, im.image_ref, im.image_status) for im in others] == [
        (1, "images/004_1.png", "ok"), (2, "images/004_2.png", "ok")]


def test_query_by_a_non_primary_image_finds_its_product_first_with_that_image(multi):
    _, engine, root = multi
    for i in range(0, N, 4):
        for j in range(PER_PRODUCT):
            result = engine.search(image=str(root / "images" / f"{i:03d}_{j}.png"), target="image", k=10)
            top = result.hits[0]
            assert top.product.product_id == f"P{i:05d}"
            assert top.matched_image is not None and top.matched_image.position == j
            assert top.matched_image.image_ref == f"images/{i:03d}_{j}.png"
            assert top.score == pytest.approx(1.0, abs=1e-4)
            ids = [h.product.product_id for h in result.hits]
            assert len(ids) == len(set(ids)) == 10  # one result per product, and still k of them


def test_one_result_per_product_on_every_image_target_and_page(multi):
    _, engine, root = multi
    query = str(root / "images" / "007_2.png")
    for target in ("image", "hybrid"):
        whole = engine.search(image=query, target=target, k=N)
        ids = [h.product.product_id for h in whole.hits]
        assert len(ids) == len(set(ids)) == N
        assert whole.hits[0].matched_image.position == 2
        pages = [h.product.product_id for off in range(0, N, 7)
                 for h in engine.search(image=query, target=target, k=min(7, N - off), offset=off).hits]
        assert pages == ids
    text = engine.search(text="red shoe", target="image", k=5)
    assert all(h.matched_image is not None for h in text.hits)
    assert all(h.matched_image is None for h in engine.search(text="red shoe", target="text", k=5).hits)


def test_filters_apply_to_every_image_of_a_product(multi):
    _, engine, root = multi
    # Product 7 is a hat (7 % 5 == 2); its non-primary image, filtered to shoes, must not bring it.
    query = str(root / "images" / "007_1.png")
    shoes = engine.search(image=query, target="image", k=10, filters=ProductFilter(categories=("shoes",)))
    assert shoes.hits and all(h.product.category == "shoes" for h in shoes.hits)
    hats = engine.search(image=query, target="image", k=3, filters=ProductFilter(categories=("hats",)))
    assert hats.hits[0].product.product_id == "P00007" and hats.hits[0].matched_image.position == 1


def test_deleting_a_product_removes_all_its_images_from_results(multi, store):
    _, engine, root = multi
    query = str(root / "images" / "011_2.png")
    assert engine.search(image=query, target="image", k=1).hits[0].product.product_id == "P00011"
    store.soft_delete_product("P00011")
    for j in range(PER_PRODUCT):
        hits = engine.search(image=str(root / "images" / f"011_{j}.png"), target="image", k=N).hits
        assert "P00011" not in {h.product.product_id for h in hits}
        assert len(hits) == N - 1


def test_changed_image_list_reindexes_new_images_and_drops_old(tmp_path, store, tiny_embedder, multi):
    summary, engine, root = multi
    rows = [json.loads(line) for line in (root / "catalog.jsonl").read_text().splitlines()]
    rows[3]["images"] = ["images/003_0.png", "images/020_2.png"]  # product 20's third image, now product 3's too
    rows[20]["images"] = rows[20]["images"][:2]
    write_rows(root, rows, fmt="jsonl")
    home = tmp_path / "home"
    again = CatalogIndexer(home=home, store=store, embedder=tiny_embedder, options=IndexOptions(batch_size=16)).run(
        root / "catalog.jsonl")
    # Only the two changed lists are writes; the other products' images are as stored.
    assert (again.products_upserted, again.products_unchanged) == (2, N - 2)
    assert again.images_embedded == 0  # every image's content is in the cache already
    engine = _engine(home, store, tiny_embedder)
    top = engine.search(image=str(root / "images" / "020_2.png"), target="image", k=2).hits
    assert top[0].product.product_id == "P00003" and top[0].matched_image.position == 1
    assert "P00020" not in {h.product.product_id for h in top[:1]}
    assert engine.search(image=str(root / "images" / "003_2.png"), target="image", k=1).hits[0].score < 0.999


def test_csv_pipe_separated_and_parquet_lists(tmp_path):
    for fmt in ("csv", "parquet"):
        catalog = _multi_catalog(tmp_path / fmt, fmt=fmt, n=3)
        rows = [r for r in read_catalog(catalog)]
        assert not [r for r in rows if isinstance(r, RowError)]
        product = rows[1].product
        assert product.image_ref == "images/001_0.png"
        assert [ref for ref, _ in product.extra_images] == ["images/001_1.png", "images/001_2.png"]
        assert all(uri.startswith(str(tmp_path)) for _, uri in product.extra_images)


def test_image_and_images_together_the_image_is_first(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"product_id": "A", "title": "t", "image": "a.png", "images": ["b.png", "a.png"]}) + "\n")
    (row,) = read_catalog(path)
    assert row.product.image_ref == "a.png" and [r for r, _ in row.product.extra_images] == ["b.png"]


@pytest.mark.parametrize("images, reason", [
    ([f"{i}.png" for i in range(MAX_IMAGES + 1)], f"the limit is {MAX_IMAGES} per product"),
    (["x.png"] * 1_000_000, f"the limit is {MAX_IMAGES} per product"),
    (5, "images must be a list"),
    ({"a": "b.png"}, "images must be a list"),
    (["a.png", 3], "images[1] must be a path or URL string"),
    (["a.png", ["b.png"]], "images[1] must be a path or URL string"),
])
def test_hostile_images_values_are_row_errors(tmp_path, images, reason):
    path = tmp_path / "c.jsonl"
    good = {"product_id": "OK", "title": "fine", "images": ["a.png"]}
    path.write_text(json.dumps({"product_id": "BAD", "title": "t", "images": images}) + "\n" + json.dumps(good) + "\n")
    bad, ok = read_catalog(path)
    assert isinstance(bad, RowError) and bad.product_id == "BAD" and reason in bad.reason
    assert ok.product.product_id == "OK"


def test_image_and_images_over_the_cap_together(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("product_id,title,image,images\nA,t,first.png," + "|".join(f"{i}.png" for i in range(MAX_IMAGES)) + "\n")
    (row,) = read_catalog(path)
    assert isinstance(row, RowError) and f"the limit is {MAX_IMAGES}" in row.reason


def test_an_image_outside_the_root_is_dropped_and_reported(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"product_id": "A", "title": "t", "images": ["a.png", "../../etc/passwd"]}) + "\n")
    (row,) = read_catalog(path)
    assert row.product.extra_images == ()
    assert "escapes the image root" in row.product.attributes["_image_rejected"]


@pytest.fixture(scope="module")
def multi_api(tmp_path_factory, tiny_embedder, databases):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import PrismSettings
    from conftest import TINY
    from store import Store

    root = tmp_path_factory.mktemp("multi-api")
    catalog = _multi_catalog(root / "cat")
    home = root / "home"
    store = Store.open(databases.url(home))
    try:
        CatalogIndexer(home=home, store=store, embedder=tiny_embedder, options=IndexOptions(batch_size=32)).run(catalog)
    finally:
        store.close()
    settings = PrismSettings(home=home, device="cpu", model=TINY, database_url=databases.url(home),
                             admin_token="multi-token")
    with TestClient(create_app(settings), headers={"Authorization": "Bearer multi-token"}) as client:
        yield client, catalog.parent, settings


def test_http_hit_names_the_matched_image_and_serves_it(multi_api):
    import base64

    client, root, _ = multi_api
    data = (root / "images" / "005_2.png").read_bytes()
    r = client.post("/v1/search", json={"image_b64": base64.b64encode(data).decode(), "target": "image", "k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert hits[0]["product_id"] == "P00005" and "/v1/products/P00005/images/2?v=" in hits[0]["matched_image"]
    assert len({h["product_id"] for h in hits}) == 5
    served = client.get(hits[0]["matched_image"])
    assert served.status_code == 200 and served.content == data
    first = client.post("/v1/search", json={"image_b64": base64.b64encode((root / "images" / "005_0.png").read_bytes())
                                            .decode(), "target": "image", "k": 3}).json()["results"][0]
    assert first["product_id"] == "P00005" and first["matched_image"] == first["image_url"]
    product = client.get("/v1/products/P00005").json()
    assert len(product["images"]) == 3 and product["images"][0] == product["image_url"]
    assert client.get(product["images"][1]).content == (root / "images" / "005_1.png").read_bytes()
    text_hit = client.post("/v1/search", json={"text": "red shoe", "target": "text", "k": 1}).json()["results"][0]
    assert text_hit["matched_image"] is None
    for bad in ("/v1/products/P00005/images/7", "/v1/products/NOPE/images/1", "/v1/products/P00005/images/99",
                "/v1/products/P00005/images/-1", "/v1/products/P00005/images/x"):
        r = client.get(bad)
        assert r.status_code in (404, 422) and "detail" in r.json(), bad
    schema = client.get("/openapi.json").json()["components"]["schemas"]["SearchHitOut"]["properties"]
    assert schema["matched_image"]["examples"]


def test_cli_search_shows_which_image_matched(multi_api, tmp_path):
    from typer.testing import CliRunner

    from api.cli import app

    _, root, settings = multi_api
    env = {"PRISM_HOME": str(settings.home), "PRISM_DATABASE_URL": settings.database_url, "PRISM_DEVICE": "cpu"}
    query = str(root / "images" / "009_1.png")
    out = CliRunner().invoke(app, ["search", "--image", query, "--target", "image", "-k", "3", "--json"], env=env)
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)["results"]
    assert hits[0]["product_id"] == "P00009" and "/images/1?v=" in hits[0]["matched_image"]
    table = CliRunner().invoke(app, ["search", "--image", query, "--target", "image", "-k", "3"], env=env)
    assert table.exit_code == 0 and "image" in table.output
    line = next(line for line in table.output.splitlines() if "P00009" in line)
    assert line.rstrip(" │|").split()[-1].strip("│") == "2"


def _b64(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_put_images_b64_makes_every_image_searchable_at_once(multi_api):
    client, _, _ = multi_api
    images = [draw_product_image(9000 + j) for j in range(3)]
    r = client.put("/v1/products/MULTI-1", json={"title": "walnut lamp", "images_b64": [_b64(im) for im in images]})
    assert r.status_code == 201, r.text
    assert r.json()["images"] == client.get("/v1/products/MULTI-1").json()["images"] and len(r.json()["images"]) == 3
    for j, image in enumerate(images):
        hits = client.post("/v1/search", json={"image_b64": _b64(image), "target": "image", "k": 5}).json()["results"]
        assert hits[0]["product_id"] == "MULTI-1" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert hits[0]["matched_image"] == client.get("/v1/products/MULTI-1").json()["images"][j]
        assert len({h["product_id"] for h in hits}) == len(hits)
    # A PUT of one image makes it the product's only image: the others stop matching.
    r = client.put("/v1/products/MULTI-1", json={"title": "walnut lamp", "image_b64": _b64(images[0])})
    assert r.status_code == 200 and len(client.get("/v1/products/MULTI-1").json()["images"]) == 1
    hits = client.post("/v1/search", json={"image_b64": _b64(images[2]), "target": "image", "k": 40}).json()["results"]
    assert all(h["score"] < 0.999 for h in hits if h["product_id"] == "MULTI-1")
    # PATCH with images re-embeds, as PUT does.
    r = client.patch("/v1/products/MULTI-1", json={"images_b64": [_b64(images[1]), _b64(images[2])]})
    assert r.status_code == 200 and r.json()["image_action"] == "set"
    top = client.post("/v1/search", json={"image_b64": _b64(images[2]), "target": "image", "k": 1}).json()["results"][0]
    assert top["product_id"] == "MULTI-1" and "/images/1?v=" in top["matched_image"]
    # A metadata PUT keeps all the images.
    r = client.put("/v1/products/MULTI-1", json={"title": "walnut lamp", "price": 12})
    assert r.status_code == 200 and len(client.get("/v1/products/MULTI-1").json()["images"]) == 2
    # PUT and PATCH answer with the product as GET shows it, all its images included.
    assert r.json()["images"] == client.get("/v1/products/MULTI-1").json()["images"]
    r = client.patch("/v1/products/MULTI-1", json={"price": 13})
    assert r.status_code == 200 and r.json()["images"] == client.get("/v1/products/MULTI-1").json()["images"]
    top = client.post("/v1/search", json={"image_b64": _b64(images[2]), "target": "image", "k": 1}).json()["results"][0]
    assert top["product_id"] == "MULTI-1"
    assert client.delete("/v1/products/MULTI-1").status_code in (200, 204)
    hits = client.post("/v1/search", json={"image_b64": _b64(images[2]), "target": "image", "k": 40}).json()["results"]
    assert "MULTI-1" not in {h["product_id"] for h in hits}


def test_put_of_a_catalog_product_replaces_its_indexed_images(multi_api):
    client, root, _ = multi_api
    new = draw_product_image(9100)
    r = client.put("/v1/products/P00013", json={"title": "red hat model 13", "images_b64": [
        base64_of(root / "images" / "013_0.png"), _b64(new)]})
    assert r.status_code == 200, r.text
    old = client.post("/v1/search", json={"image_b64": base64_of(root / "images" / "013_2.png"), "target": "image",
                                          "k": 40}).json()["results"]
    assert all(h["score"] < 0.999 for h in old if h["product_id"] == "P00013")
    top = client.post("/v1/search", json={"image_b64": _b64(new), "target": "image", "k": 1}).json()["results"][0]
    assert top["product_id"] == "P00013" and "/images/1?v=" in top["matched_image"]


def base64_of(path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("body, fragment", [
    ({"images_b64": ["iVBORw0KGgo="] * (MAX_IMAGES + 1)}, "images_b64"),
    ({"images_b64": "iVBORw0KGgo="}, "images_b64"),
    ({"images_b64": ["not base64!!"]}, "base64"),
    ({"images_b64": []}, "images_b64"),
    ({"images_b64": [None]}, "images_b64"),
    ({"images_b64": [{"a": 1}]}, "images_b64"),
    ({"images_b64": ["aGVsbG8="]}, "image"),  # valid base64, not an image
])
def test_hostile_images_b64_is_a_4xx_with_detail(multi_api, body, fragment):
    client, _, _ = multi_api
    for method, payload in ((client.put, {"title": "x", **body}), (client.patch, body)):
        r = method("/v1/products/P00001", json=payload)
        assert 400 <= r.status_code < 500, (method, body, r.text)
        assert fragment in json.dumps(r.json()["detail"]), r.text
    assert len(client.get("/v1/products/P00001").json()["images"]) == PER_PRODUCT  # nothing stored was lost


def test_migration_0008_downgrades_with_image_rows_and_upgrades_again(tmp_path, databases):
    from alembic import command
    from alembic.config import Config

    from store import ProductInput, Store, migrate
    from store.db import _MIGRATIONS, _make_engine, _migrating_connection

    url = databases.url(tmp_path)
    store = Store.open(url)
    try:
        store.upsert_products([ProductInput("MIG-1", "brass lamp", image_ref="a.png", image_uri="/x/a.png",
                                            extra_images=(("b.png", "/x/b.png"), ("c.png", "/x/c.png")))])
        row = store.get_product("MIG-1").row_id
        assert [im.position for im in store.product_images([row])[row]] == [1, 2]
    finally:
        store.close()
    engine = _make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with _migrating_connection(engine) as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0007")
    migrate(engine, "head")
    engine.dispose()
    store = Store.open(url)
    try:
        assert store.product_images([row]) == {}
        store.upsert_products([ProductInput("MIG-1", "brass lamp", image_ref="a.png", image_uri="/x/a.png",
                                            extra_images=(("b.png", "/x/b.png"),))])
        (image,) = store.product_images([row])[row]
        assert (image.position, image.image_ref, image.image_status) == (1, "b.png", "pending")
    finally:
        store.close()


def test_a_patched_category_moves_all_the_products_images_between_filters(multi_api):
    client, root, _ = multi_api
    query = {"image_b64": base64_of(root / "images" / "017_2.png"), "target": "image", "k": 5}
    hats = client.post("/v1/search", json={**query, "filters": {"category": ["hats"]}}).json()["results"]
    assert hats[0]["product_id"] == "P00017" and "/images/2?v=" in hats[0]["matched_image"]
    assert client.patch("/v1/products/P00017", json={"category": "bags"}).status_code == 200
    hats = client.post("/v1/search", json={**query, "filters": {"category": ["hats"]}}).json()["results"]
    assert "P00017" not in {h["product_id"] for h in hats} and all(h["category"] == "hats" for h in hats)
    bags = client.post("/v1/search", json={**query, "filters": {"category": ["bags"]}}).json()["results"]
    assert bags[0]["product_id"] == "P00017" and "/images/2?v=" in bags[0]["matched_image"]


def test_a_vectors_run_counts_the_further_images_it_leaves_out(tmp_path, store, tiny_embedder):
    """`--vectors` carries one image vector per product: a product's further images are indexed
    only when the model's cache holds them from an earlier embedding run, and the summary counts
    the rest as left out (not silently dropped)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog = _multi_catalog(tmp_path / "cat", n=12)
    vectors = tmp_path / "v.parquet"
    rows = np.random.default_rng(0).standard_normal((12, tiny_embedder.dim)).astype(np.float32)
    pq.write_table(pa.table({"product_id": [f"P{i:05d}" for i in range(12)],
                             "image_vector": pa.array(rows.tolist(), pa.list_(pa.float32()))}), vectors)
    home = tmp_path / "home"

    def run(**kw):
        return CatalogIndexer(home=home, store=store, embedder=tiny_embedder, options=IndexOptions(batch_size=16)).run(
            catalog, **kw)

    supplied = run(vectors=vectors)
    assert supplied.images_supplied == 12 and supplied.images_embedded == 0
    assert supplied.further_images_left_out == 12 * (PER_PRODUCT - 1)
    assert "image_extra" not in supplied.indexes
    assert supplied.to_dict()["further_images_left_out"] == 24

    embedded = run()  # a run that embeds: the further images go into the model's cache and the index
    assert embedded.further_images_left_out == 0 and embedded.indexes["image_extra"]["count"] == 24
    again = run(vectors=vectors)  # now the cache holds them: a --vectors run indexes them too
    assert again.further_images_left_out == 0 and again.indexes["image_extra"]["count"] == 24
