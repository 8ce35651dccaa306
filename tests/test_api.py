"""The HTTP service against a real index built by the tiny model: no part of Prism is mocked."""

import base64
import hashlib
import json

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from indexer import CatalogIndexer, IndexOptions
from sample_catalog import draw_product_image
from waiting import eventually

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")


TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def settings(build_serving_home):
    return build_serving_home("api-home", admin_token=TOKEN)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings), headers=ADMIN) as c:
        yield c


@pytest.fixture(scope="module")
def images(small_catalog):
    return small_catalog.parent / "images"


def _png(i: int) -> bytes:
    import io

    buf = io.BytesIO()
    draw_product_image(i).save(buf, format="PNG")
    return buf.getvalue()


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["product_id"] for r in response.json()["results"]]


def _store(client):
    return client.app.state.services.store


# ---------------------------------------------------------------- search


def test_text_search_returns_k_results_with_a_logged_query_id(client):
    r = client.get("/v1/search", params={"q": "red shoe", "target": "image", "k": 5})
    body = r.json()
    assert r.status_code == 200 and len(body["results"]) == 5
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    for hit in body["results"]:
        assert hit["title"] and hit["image_url"].startswith("/v1/products/") and "_image_rejected" not in hit["attributes"]
    logged = eventually(lambda: _store(client).get_search(body["query_id"]), timeout_s=10)
    assert logged["query_text"] == "red shoe" and logged["target"] == "image" and logged["k"] == 5
    assert logged["result_ids"] == [h["product_id"] for h in body["results"]]
    assert logged["model_version"] == body["model_version"] and logged["index_version"] == body["index_version"]


def test_uploaded_catalog_image_comes_back_first_and_is_logged_by_hash(client, images):
    data = (images / "00017.png").read_bytes()
    r = client.post("/v1/search/image", files={"file": ("q.png", data, "image/png")}, data={"target": "image", "k": "3"})
    assert _ids(r)[0] == "P00017"
    assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert eventually(lambda: _store(client).get_search(r.json()["query_id"]), timeout_s=10)["image_hash"] == hashlib.sha256(data).hexdigest()
    as_json = client.post("/v1/search", json={"image_b64": base64.b64encode(data).decode(), "k": 3})
    assert _ids(as_json) == _ids(r)


def test_every_target_and_paging(client):
    for target in ("image", "text", "hybrid"):
        r = client.post("/v1/search", json={"text": "green hat", "target": target, "k": 10})
        assert len(_ids(r)) == 10 and r.json()["target"] == target
    hybrid = client.get("/v1/search", params={"q": "green hat", "target": "hybrid", "k": 10}).json()
    # Both vector legs, and the lexical leg for a text query (every title here holds "green hat" or not).
    assert any(set(h["scores"]) >= {"image", "text", "lexical"} for h in hybrid["results"])
    full = _ids(client.get("/v1/search", params={"q": "blue bag", "k": 10}))
    page2 = client.get("/v1/search", params={"q": "blue bag", "k": 5, "offset": 5})
    assert _ids(page2) == full[5:] and [h["rank"] for h in page2.json()["results"]] == [6, 7, 8, 9, 10]


def test_similar_to_excludes_the_product_itself(client):
    r = client.post("/v1/search", json={"similar_to": "P00004", "target": "image", "k": 5})
    ids = _ids(r)
    assert len(ids) == 5 and "P00004" not in ids
    logged = eventually(lambda: _store(client).get_search(r.json()["query_id"]), timeout_s=10)
    assert logged["query_product_id"] == "P00004" and logged["image_hash"]
    missing = client.post("/v1/search", json={"similar_to": "nope", "k": 5})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]


def test_filters_by_get_and_post(client):
    r = client.get("/v1/search", params=[("q", "item"), ("category", "hats"), ("category", "bags"), ("k", "20")])
    cats = {h["category"] for h in r.json()["results"]}
    assert len(_ids(r)) == 20 and cats <= {"hats", "bags"}
    r = client.post("/v1/search", json={"text": "item", "k": 10, "filters": {"brand": "acme", "price_min": 20, "price_max": 120}})
    assert len(_ids(r)) > 0
    assert all(h["brand"] == "acme" and 20 <= h["price"] <= 120 for h in r.json()["results"])
    logged = eventually(lambda: _store(client).get_search(r.json()["query_id"]), timeout_s=10)
    assert logged["filters"] == {"brand": ["acme"], "price_min": 20.0, "price_max": 120.0}


# ---------------------------------------------------------------- incremental catalog changes


def test_put_is_searchable_at_once_and_delete_removes_at_once(client):
    image = _png(1001)
    r = client.put("/v1/products/NEW-1", json={
        "title": "zebra striped umbrella", "category": "bags", "brand": "acme", "price": 12.5,
        "currency": "EUR", "attributes": {"colour": "black"}, "image_b64": base64.b64encode(image).decode(),
    })
    assert r.status_code == 201, r.text
    assert r.json()["created"] and r.json()["image_action"] == "set" and r.json()["catalog_seq"] >= 1
    found = client.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "3"})
    assert _ids(found)[0] == "NEW-1"
    by_text = client.get("/v1/search", params={"q": "zebra striped umbrella", "target": "text", "k": 1})
    assert _ids(by_text) == ["NEW-1"]
    filtered = client.post("/v1/search", json={"text": "umbrella", "k": 50, "filters": {"category": "bags"}})
    assert "NEW-1" in _ids(filtered)
    got = client.get("/v1/products/NEW-1").json()
    assert got["title"] == "zebra striped umbrella" and got["attributes"] == {"colour": "black"}
    assert client.get(got["image_url"]).content == image

    # An update without an image keeps the image and replaces the text.
    r = client.put("/v1/products/NEW-1", json={"title": "plain grey umbrella", "category": "bags"})
    assert r.status_code == 200 and not r.json()["created"] and r.json()["image_action"] == "keep"
    assert _ids(client.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})) == ["NEW-1"]
    assert _ids(client.get("/v1/search", params={"q": "plain grey umbrella", "target": "text", "k": 1})) == ["NEW-1"]

    assert client.delete("/v1/products/NEW-1").status_code == 204
    gone = client.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "10"})
    assert "NEW-1" not in _ids(gone) and len(_ids(gone)) == 10
    assert client.get("/v1/products/NEW-1").status_code == 404
    assert client.delete("/v1/products/NEW-1").status_code == 404


def test_updating_a_catalog_image_replaces_its_vector(client, images):
    old = (images / "00021.png").read_bytes()
    new = _png(2002)
    current = client.get("/v1/products/P00021").json()
    r = client.put("/v1/products/P00021", json={"title": current["title"], "image_b64": base64.b64encode(new).decode()})
    assert r.status_code == 200 and r.json()["image_action"] == "set"
    assert _ids(client.post("/v1/search/image", files={"file": ("q.png", new, "image/png")}, data={"k": "1"})) == ["P00021"]
    stale = client.post("/v1/search/image", files={"file": ("q.png", old, "image/png")}, data={"k": "5"}).json()
    assert all(not (h["product_id"] == "P00021" and h["score"] > 0.9999) for h in stale["results"])


def test_a_second_worker_sees_changes_on_its_next_query(client, settings):
    image = _png(3003)
    with TestClient(create_app(settings), headers=ADMIN) as other:  # its own engine, as a second process would have
        assert other.get("/readyz").status_code == 200
        client.put("/v1/products/W-1", json={"title": "walnut desk lamp", "image_b64": base64.b64encode(image).decode()})
        assert _ids(other.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})) == ["W-1"]
        client.delete("/v1/products/W-1")
        assert "W-1" not in _ids(other.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "5"}))


def test_changes_survive_a_restart_and_go_into_the_next_build(build_serving_home, tiny_embedder):
    settings = build_serving_home("restart-home", admin_token=TOKEN)
    image = _png(4004)
    with TestClient(create_app(settings), headers=ADMIN) as c:
        assert c.put("/v1/products/R-1", json={"title": "rattan basket", "image_b64": base64.b64encode(image).decode()}).status_code == 201
        assert c.delete("/v1/products/P00030").status_code == 204
    query = {"files": {"file": ("q.png", image, "image/png")}, "data": {"k": "1"}}
    with pytest.raises(RuntimeError, match="create_app"):  # its store and model thread are closed
        with TestClient(c.app):
            pass
    with TestClient(create_app(settings)) as c:  # restarted: replays the journal
        assert _ids(c.post("/v1/search/image", **query)) == ["R-1"]
        assert "P00030" not in _ids(c.get("/v1/search", params={"q": "x", "k": 120}))
        assert c.get("/readyz").json()["overlay_vectors"] == {"image": 1, "text": 1}
        store = c.app.state.services.store
        summary = CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder, options=IndexOptions()).run(None)
        assert summary.images_embedded == 0 and summary.texts_embedded == 0  # journal vectors were reused
        # Loaded in the background, then swapped: nothing left to replay.
        ready = eventually(lambda: (r := c.get("/readyz").json())["index_version"] == summary.index_version and r)
        assert ready and ready["overlay_vectors"] == {"image": 0, "text": 0}
        assert ready["vectors"]["image"] == 120  # 120 catalog products + R-1 - P00030
        assert _ids(c.post("/v1/search/image", **query)) == ["R-1"]
        assert "P00030" not in _ids(c.get("/v1/search", params={"q": "x", "k": 120}))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, status, words",
    [("truncated", 422, "truncated"), ("zip", 415, "not a recognised image"), ("bomb", 413, "pixels"),
     ("strip", 422, "sides may differ"), ("text", 415, "image")],
)
def test_unusable_uploads_get_a_4xx_with_a_detail(client, bad_images, name, status, words):
    data = bad_images[name]
    r = client.post("/v1/search/image", files={"file": ("q.png", data, "image/png")})
    assert r.status_code == status and words in r.json()["detail"]
    r = client.post("/v1/search", json={"image_b64": base64.b64encode(data).decode()})
    assert r.status_code == status and words in r.json()["detail"]
    before = client.get("/v1/products/P00002").json()
    r = client.put("/v1/products/P00002", json={"title": "changed", "image_b64": base64.b64encode(data).decode()})
    assert r.status_code == status
    assert client.get("/v1/products/P00002").json() == before  # nothing stored


BAD_REQUESTS = [
    ("GET", "/v1/search?q=&k=5", None, 422, "q"),
    ("GET", "/v1/search?q=%20%20", None, 422, "empty"),
    ("GET", "/v1/search?q=" + "a" * 2001, None, 422, "2000"),
    ("GET", "/v1/search?q=shoe&target=video", None, 422, "target"),
    ("GET", "/v1/search?q=shoe&k=0", None, 422, "k"),
    ("GET", "/v1/search?q=shoe&k=1001", None, 422, "k"),
    ("GET", "/v1/search?q=shoe&k=ten", None, 422, "k"),
    ("GET", "/v1/search?q=shoe&offset=-1", None, 422, "offset"),
    ("GET", "/v1/search?q=shoe&offset=10001", None, 422, "offset"),
    ("GET", "/v1/search?q=shoe&colour=red", None, 422, "colour: unknown field"),
    ("GET", "/v1/search?q=shoe&price_min=9&price_max=1", None, 422, "price_min"),
    ("GET", "/v1/search?q=shoe&price_max=nan", None, 422, "price_max"),
    ("GET", "/v1/search", None, 422, "q"),
    ("GET", "/v1/search?q=a&q=b", None, 422, "give it once"),
    ("POST", "/v1/search", b"{not json", 422, "malformed JSON"),
    ("POST", "/v1/search", b"[1, 2]", 422, "body"),
    ("POST", "/v1/search", {"text": "a", "image_b64": "AAAA"}, 422, "exactly one"),
    ("POST", "/v1/search", {}, 422, "exactly one"),
    ("POST", "/v1/search", {"text": "a", "filters": {"colour": "red"}}, 422, "colour: unknown field"),
    ("POST", "/v1/search", {"text": "a", "size": 3}, 422, "size: unknown field"),
    ("POST", "/v1/search", {"text": "a", "filters": {"price_min": -1}}, 422, "price_min"),
    ("POST", "/v1/search", {"text": "a", "filters": {"category": ["x"] * 101}}, 422, "category"),
    ("POST", "/v1/search", {"image_b64": "not base64!!"}, 422, "base64"),
    ("POST", "/v1/search", {"text": "a\u0000b"}, 422, "NUL"),
    ("POST", "/v1/search", b'{"text": "a", "filters": {"price_max": NaN}}', 422, "price_max"),
    ("POST", "/v1/search/image", None, 422, "file"),
    ("PUT", "/v1/products/X-1", {}, 422, "title"),
    ("PUT", "/v1/products/X-1", {"title": " "}, 422, "title"),
    ("PUT", "/v1/products/X-1", {"title": "t", "price": -3}, 422, "price"),
    ("PUT", "/v1/products/X-1", b'{"title": "t", "price": Infinity}', 422, "price"),
    ("PUT", "/v1/products/X-1", {"title": "t", "attributes": {"a": "x" * 20000}}, 422, "attributes"),
    ("PUT", "/v1/products/X-1", {"title": "t", "image_url": "file:///etc/passwd"}, 422, "image_url"),
    ("PUT", "/v1/products/X-1", {"title": "t", "image_url": "https://example.com/a.png"}, 403, "disabled"),
    ("PUT", "/v1/products/X-1", {"title": "t", "image_b64": ""}, 422, "0 bytes"),
    ("PUT", "/v1/products/" + "x" * 257, {"title": "t"}, 422, "product_id"),
    ("PUT", "/v1/products/X-1/image", {"title": "t"}, 422, "must not end in '/image'"),
    ("PUT", "/v1/products/X-%ff%fe", {"title": "t"}, 422, "UTF-8"),
    ("GET", "/v1/products/does-not-exist", None, 404, "does-not-exist"),
    ("GET", "/v1/products/..%2F..%2Fetc%2Fpasswd/image", None, 404, "no product"),
    ("DELETE", "/v1/products/does-not-exist", None, 404, "does-not-exist"),
    ("GET", "/v1/nowhere", None, 404, "Not Found"),
]


@pytest.mark.parametrize("method, url, body, status, words", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_detail_naming_the_problem(client, method, url, body, status, words):
    kwargs = {}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    r = client.request(method, url, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert client.get("/v1/products/X-1").status_code == 404  # nothing half-stored


def test_oversized_bodies_are_refused_before_they_are_read(build_serving_home):
    settings = build_serving_home("small-limits", max_image_bytes=50_000)
    big = _png(5) + b"\x00" * 60_000
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/search/image", files={"file": ("q.png", big, "image/png")})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        huge = {"image_b64": "A" * 2_000_000}
        r = c.post("/v1/search", content=json.dumps(huge), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks():  # no Content-Length: counted while it streams
            for _ in range(40):
                yield b"A" * 65536

        r = c.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_garbage_never_gets_a_500(client):
    bodies = [b"", b"null", b"0", b'"text"', b"{}", b'{"text": null}', b'{"text": 5}', b'{"k": "x"}',
              b'{"text": "a", "k": 1e309}', b'{"text": "a", "filters": []}', b'{"similar_to": ""}',
              b"\xff\xfe\x00", b'{"text": "\\ud800"}', b'{"text": "a", "target": null}']
    for route, method in (("/v1/search", "POST"), ("/v1/products/G-1", "PUT"), ("/v1/search/image", "POST")):
        for body in bodies:
            for content_type in ("application/json", "text/plain", "multipart/form-data; boundary=x"):
                r = client.request(method, route, content=body, headers={"content-type": content_type})
                assert 400 <= r.status_code < 500, (route, body, content_type, r.status_code, r.text)
                assert "detail" in r.json()


# ---------------------------------------------------------------- images, versions, metrics, service


def test_image_route_serves_only_the_indexed_catalog_image(client, images, settings):
    r = client.get("/v1/products/P00005/image")
    assert r.status_code == 200 and r.content == (images / "00005.png").read_bytes()
    assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/v1/products/P00005/image", headers={"if-none-match": r.headers["etag"]}).status_code == 304
    image = _png(6006)
    client.put("/v1/products/IMG-1", json={"title": "tampered", "image_b64": base64.b64encode(image).decode()})
    stored = next((settings.home / "images").glob(f"{hashlib.sha256(image).hexdigest()}.*"))
    stored.write_bytes(b"<script>alert(1)</script>")
    r = client.get("/v1/products/IMG-1/image")
    assert r.status_code == 404 and "changed on disk" in r.json()["detail"]


def test_models_facets_health_readiness_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["vectors"]["image"] >= 119
    models = client.get("/v1/models").json()
    assert [m["serving"] for m in models["models"]] == [True]
    assert [v["active"] for v in models["indexes"]] == [True] and models["indexes"][0]["counts"]["products"] == 120
    facets = client.get("/v1/facets").json()
    assert {f["value"] for f in facets["categories"]} >= {"hats", "bags", "shoes"} and facets["products"] >= 119
    spec = client.get("/openapi.json").json()
    for path in ("/v1/search", "/v1/search/image", "/v1/products/{product_id}", "/healthz", "/readyz", "/v1/models", "/metrics"):
        assert path in spec["paths"], path
    assert spec["components"]["schemas"]["SearchRequest"]["examples"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_metrics_count_routes_stages_and_serving_versions(client):
    client.get("/v1/search", params={"q": "metrics probe", "k": 2})
    client.get("/v1/search", params={"q": "", "k": 2})
    text = client.get("/metrics").text
    assert 'prism_http_requests_total{method="GET",route="/v1/search",status="200"}' in text
    assert 'prism_http_requests_total{method="GET",route="/v1/search",status="422"}' in text
    for stage in ("sync", "filter", "prepare", "queue", "encode", "ann", "metadata", "log"):
        assert f'prism_search_stage_seconds_count{{stage="{stage}"}}' in text
    for name in ("prism_metadata_cache_hits_total", "prism_metadata_cache_misses_total", "prism_search_log_queued",
                 'prism_search_log_rows_total{outcome="written"}', "prism_search_log_groups_total"):
        assert name in text, name
    ready = client.get("/readyz").json()
    assert f'index_version="{ready["index_version"]}"' in text and "prism_serving_info" in text
    assert 'prism_index_vectors{layer="index",modality="image"}' in text
    assert "prism_ready 1.0" in text


def test_not_ready_until_an_index_exists(tmp_path, databases):
    from api.settings import PrismSettings

    settings = PrismSettings(home=tmp_path / "empty", device="cpu", database_url=databases.url(tmp_path / "empty"), admin_token=TOKEN)
    with TestClient(create_app(settings), headers=ADMIN) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.get("/v1/search", params={"q": "anything"})
        assert r.status_code == 503 and "prism index" in r.json()["detail"]
        assert c.put("/v1/products/A", json={"title": "a"}).status_code == 503
        assert "prism_ready 0.0" in c.get("/metrics").text


def test_a_corrupt_new_version_leaves_the_old_one_serving(build_serving_home, tiny_embedder):
    settings = build_serving_home("corrupt-home", admin_token=TOKEN)
    with TestClient(create_app(settings), headers=ADMIN) as c:
        old = c.get("/readyz").json()["index_version"]
        store = c.app.state.services.store
        summary = CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder, options=IndexOptions()).run(None)
        with open(settings.home / "indexes" / summary.index_version / "image.faiss", "r+b") as fh:
            fh.seek(-8, 2)
            fh.write(b"\xff" * 8)
        for _ in range(2):  # the failure is remembered, not retried per query
            r = c.get("/v1/search", params={"q": "hat", "k": 3})
            assert r.status_code == 200 and r.json()["index_version"] == old
        assert c.get("/readyz").json()["index_version"] == old
        # Catalog changes still apply on top of the version that keeps serving.
        image = _png(8008)
        assert c.put("/v1/products/C-1", json={"title": "copper kettle", "image_b64": base64.b64encode(image).decode()}).status_code == 201
        assert _ids(c.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})) == ["C-1"]
        top = _ids(c.get("/v1/search", params={"q": "hat", "k": 5}))
        assert c.delete(f"/v1/products/{top[0]}").status_code == 204
        after = _ids(c.get("/v1/search", params={"q": "hat", "k": 5}))
        assert top[0] not in after and len(after) == 5
    with TestClient(create_app(settings)) as fresh:  # nothing else to fall back on: 503 naming the cause
        r = fresh.get("/v1/search", params={"q": "hat", "k": 3})
        assert r.status_code == 503 and "sha256" in r.json()["detail"]
        assert fresh.get("/readyz").status_code == 503


def test_catalog_changes_need_the_admin_token(client, build_serving_home):
    body = {"title": "unauthorised"}
    assert client.put("/v1/products/AUTH-1", json=body, headers={"Authorization": ""}).status_code == 401
    r = client.put("/v1/products/AUTH-1", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.delete("/v1/products/P00001", headers={"Authorization": "Basic x"}).status_code == 401
    assert client.get("/v1/products/AUTH-1").status_code == 404 and client.get("/v1/products/P00001").status_code == 200
    with TestClient(create_app(build_serving_home("no-token-home"))) as open_server:
        r = open_server.put("/v1/products/AUTH-1", json=body)
        assert r.status_code == 403 and "PRISM_ADMIN_TOKEN" in r.json()["detail"]


def test_unusable_image_urls_are_refused_cleanly(build_serving_home):
    settings = build_serving_home("url-home", admin_token=TOKEN, allow_url_images=True)
    with TestClient(create_app(settings), headers=ADMIN) as c:
        for url in ("http://[::1", "http://x\u202e.com/a.png", "http://" + "a" * 70 + ".com/a.png",
                    "http://127.0.0.1:9/a.png"):
            r = c.put("/v1/products/URL-1", json={"title": "t", "image_url": url})
            assert r.status_code == 422, (url, r.text)
            assert "image URL" in r.json()["detail"]
        assert c.get("/v1/products/URL-1").status_code == 404


def test_unknown_upload_fields_are_refused(client, images):
    data = (images / "00001.png").read_bytes()
    r = client.post("/v1/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "2", "colour": "red"})
    assert r.status_code == 422 and r.json()["detail"] == "body.colour: unknown field"
    r = client.post("/v1/search/image", files={"file": ("q.png", data, "image/png")},
                    data={"k": "20", "category": ["hats", "bags"]})
    assert {h["category"] for h in r.json()["results"]} <= {"hats", "bags"} and len(_ids(r)) == 20


def test_cors_is_off_unless_origins_are_configured(settings, caplog):
    preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"}
    with TestClient(create_app(settings.model_copy(update={"admin_token": None}))) as closed:
        r = closed.options("/v1/search", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in closed.get("/healthz", headers={"Origin": "https://shop.example"}).headers
    assert any("PRISM_ADMIN_TOKEN is not set" in m for m in caplog.messages)

    opened = settings.model_copy(update={"cors_origins": ["https://shop.example"]})
    with TestClient(create_app(opened)) as c:
        r = c.options("/v1/search", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://shop.example"
        other = c.options("/v1/search", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert "access-control-allow-credentials" not in r.headers
