"""The CLI and the HTTP API agree: the same request validation (before any model loads), the same
search answer under --json, and `prism products get/delete` doing what GET/DELETE /v1/products do.

Each case runs the real `prism` in a subprocess against a home indexed by the tiny model, next to
the real app on the same home. Nothing of Prism is mocked."""

import json
import math
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from prism_cli import ROOT, run_prism

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "cli-parity-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}

# `prism` with open_clip unimportable: any model load fails ("import of open_clip halted"), so a
# command that answers with its own message instead has checked its input before loading one.
NO_MODELS = "import sys; sys.modules['open_clip'] = None; sys.argv[0] = 'prism'; from api.cli import main; main()"


def run_without_models(args, env):
    return subprocess.run(
        [sys.executable, "-c", NO_MODELS, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def settings(build_serving_home):
    return build_serving_home("cli-parity", admin_token=TOKEN)


@pytest.fixture(scope="module")
def env(settings, databases):
    return databases.env(settings.home)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings), headers=ADMIN) as c:
        yield c


@pytest.fixture(scope="module")
def images(small_catalog):
    return small_catalog.parent / "images"


# (CLI arguments, the same query over GET /v1/search, what the CLI message must say)
INVALID_SEARCHES = [
    (["--price-min", "100", "--price-max", "5"], {"price_min": 100, "price_max": 5},
     "--price-min (100.0) is above --price-max (5.0)"),
    (["--price-min", "-5"], {"price_min": -5}, "--price-min: Input should be greater than or equal to 0"),
    (["--price-max", "nan"], {"price_max": "nan"}, "--price-max: "),
    (["--target", "bogus"], {"target": "bogus"}, "--target: Input should be 'image', 'text' or 'hybrid'"),
    (["-k", "0"], {"k": 0}, "-k: Input should be greater than or equal to 1"),
    (["-k", "1001"], {"k": 1001}, "-k: Input should be less than or equal to 1000"),
    (["--offset", "-1"], {"offset": -1}, "--offset: Input should be greater than or equal to 0"),
    (["--category", ""], {"category": ""}, "--category: String should have at least 1 character"),
    # The result window is the engine's check, made before it loads the version and its model.
    (["--offset", "995", "-k", "10"], {"offset": 995, "k": 10}, "offset + k is 1005"),
]


@pytest.mark.parametrize("args, params, message", INVALID_SEARCHES, ids=[" ".join(c[0]) for c in INVALID_SEARCHES])
def test_the_cli_refuses_what_http_refuses_before_any_model_loads(args, params, message, env, client):
    assert client.get("/v1/search", params={"q": "shoe", **params}).status_code == 422
    proc = run_without_models(["search", "shoe", *args], env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "open_clip" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("text, message", [("   ", "TEXT: must not be empty"), ("a" * 2001, "TEXT: String should have at most 2000")])
def test_bad_query_text_is_refused_like_http(text, message, env, client):
    assert client.get("/v1/search", params={"q": text}).status_code == 422
    proc = run_without_models(["search", text], env)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_image_file_problems_are_reported_before_any_model_loads(tmp_path, env, client, images):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("just text")
    missing = run_without_models(["search", "--image", str(tmp_path / "missing.png")], env)
    assert missing.returncode == 2 and "not found" in missing.stderr and "open_clip" not in missing.stderr, missing.stderr
    refused = client.post("/v1/search/image", files={"file": ("q.png", not_an_image.read_bytes(), "image/png")})
    assert refused.status_code == 415
    proc = run_without_models(["search", "--image", str(not_an_image)], env)
    assert proc.returncode == 2 and "not a recognised image" in proc.stderr and "open_clip" not in proc.stderr, proc.stderr
    # The harness really stops model loads: a valid query gets as far as loading one and fails there.
    valid = run_without_models(["search", "--image", str(images / "00003.png")], env)
    assert valid.returncode == 2 and "open_clip" in valid.stderr, valid.stderr


def _without_run_specifics(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("query_id", "took_ms", "timings_ms")}


def _same_answer(cli: dict, http: dict) -> None:
    assert set(cli) == set(http)
    assert [set(r) for r in cli["results"]] == [set(r) for r in http["results"]]
    for a, b in zip(cli["results"], http["results"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert {k: v for k, v in a.items() if k not in ("score", "scores")} == {
            k: v for k, v in b.items() if k not in ("score", "scores")
        }
    plain = lambda body: {k: v for k, v in _without_run_specifics(body).items() if k != "results"}  # noqa: E731
    assert plain(cli) == plain(http)


def test_search_json_is_the_http_answer(env, client, images, settings):
    http = client.get("/v1/search", params={"q": "red shoe", "target": "hybrid", "k": 5, "price_max": 150}).json()
    cli = json.loads(run_prism(["search", "red shoe", "--target", "hybrid", "-k", "5", "--price-max", "150", "--json"],
                               env).stdout)
    _same_answer(cli, http)
    for hit in cli["results"]:
        assert hit["image_url"].startswith("/v1/products/") and hit["description"] and "attributes" in hit
    assert not math.isnan(cli["took_ms"]) and set(cli["timings_ms"]) >= {"sync", "encode", "log"}

    data = (images / "00017.png").read_bytes()
    http = client.post("/v1/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "3"}).json()
    cli = json.loads(run_prism(["search", "--image", str(images / "00017.png"), "-k", "3", "--json"], env).stdout)
    _same_answer(cli, http)
    assert cli["results"][0]["product_id"] == "P00017"
    # Logged like an HTTP search: its query_id is valid for click events.
    assert client.app.state.services.store.get_search(cli["query_id"])["result_ids"][0] == "P00017"


def test_products_get_prints_what_http_answers(env, client):
    http = client.get("/v1/products/P00007").json()
    proc = run_prism(["products", "get", "P00007", "--json"], env)
    assert json.loads(proc.stdout) == http
    table = run_prism(["products", "get", "P00007"], env).stdout
    assert http["title"] in table and http["image_url"] in table and http["updated_at"] in table

    assert client.get("/v1/products/nope").status_code == 404
    missing = run_prism(["products", "get", "nope"], env, check=False)
    assert missing.returncode == 1 and "no product 'nope'" in missing.stderr and "Traceback" not in missing.stderr
    too_long = run_prism(["products", "get", "x" * 257], env, check=False)
    assert client.get("/v1/products/" + "x" * 257).status_code == 422
    assert too_long.returncode == 2 and "at most 256" in too_long.stderr


def test_products_delete_is_the_http_delete_and_serving_engines_drop_it(build_serving_home, databases, images):
    from search import SearchEngine
    from store import Store

    settings = build_serving_home("cli-delete", admin_token=TOKEN)
    env = databases.env(settings.home)
    store = Store.open(settings.db_url)
    # A serving engine that loaded its index version before the delete, as a running server has.
    engine = SearchEngine(store, indexes_dir=settings.indexes_dir, models_dir=settings.models_dir, device="cpu")
    engine.refresh()
    query = str(images / "00017.png")
    assert [h.product.product_id for h in engine.search(image=query, k=1).hits] == ["P00017"]

    proc = run_prism(["products", "delete", "P00017"], env)
    assert "deleted product 'P00017'" in proc.stdout

    ranked = [h.product.product_id for h in engine.search(image=query, k=120).hits]
    assert "P00017" not in ranked and len(ranked) == 119
    with TestClient(create_app(settings), headers=ADMIN) as client:
        assert client.get("/v1/products/P00017").status_code == 404
        assert "P00017" not in [r["product_id"] for r in client.post(
            "/v1/search/image", files={"file": ("q.png", (images / "00017.png").read_bytes(), "image/png")},
            data={"k": "120"}).json()["results"]]
        assert client.delete("/v1/products/P00018").status_code == 204
    # The same bookkeeping as the HTTP route: a soft-deleted row and a journal entry per delete.
    by_cli, by_http = (store.get_product(p, include_deleted=True) for p in ("P00017", "P00018"))
    assert by_cli.deleted_at is not None and by_http.deleted_at is not None
    assert by_cli.changed_by == by_http.changed_by
    journal = [(c.product_id, c.op, c.model_version, c.image_action) for c in store.catalog_changes(0)]
    assert journal[-2:] == [("P00017", "delete", None, None), ("P00018", "delete", None, None)], journal

    again = run_prism(["products", "delete", "P00017"], env, check=False)
    assert again.returncode == 1 and "no product 'P00017'" in again.stderr and "Traceback" not in again.stderr
    gone = run_prism(["products", "get", "P00017"], env, check=False)
    assert gone.returncode == 1
    store.close()
