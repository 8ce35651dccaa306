"""Replicas that agree: several servers, each with its own PRISM_HOME, sharing one database and
one artifact directory (PRISM_SHARED_DIR). Run on SQLite and on PostgreSQL like the whole suite."""

import base64
import io

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import PrismSettings
from embedder import create_base_model, load_embedder, prism_config_path
from feedback import write_model_version
from indexer import CatalogIndexer, IndexOptions
from sample_catalog import draw_product_image
from store import Store
from waiting import eventually

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "replica-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TINY = "prism-tiny-vit:random"


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    draw_product_image(i).save(buf, format="PNG")
    return buf.getvalue()


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["product_id"] for r in response.json()["results"]]


def _serving(client) -> str | None:
    return client.get("/readyz").json().get("index_version")


def _shared_catalog(tmp_path, small_catalog, tiny_embedder, databases) -> tuple:
    """The small catalog indexed into a shared directory: (shared dir, database URL, index version)."""
    shared = tmp_path / "shared"
    url = databases.url(shared)
    store = Store.open(url)
    try:
        version = CatalogIndexer(home=shared, store=store, embedder=tiny_embedder,
                                 options=IndexOptions(batch_size=32)).run(small_catalog).index_version
    finally:
        store.close()
    return shared, url, version


def test_replicas_share_catalog_changes_images_and_activations(tmp_path, small_catalog, tiny_embedder, databases):
    shared, url, first = _shared_catalog(tmp_path, small_catalog, tiny_embedder, databases)

    def replica(name: str) -> PrismSettings:
        return PrismSettings(home=tmp_path / name, shared_dir=shared, database_url=url, model=TINY, device="cpu",
                             admin_token=TOKEN)

    a_settings, b_settings = replica("replica-a"), replica("replica-b")
    with TestClient(create_app(a_settings), headers=ADMIN) as a, TestClient(create_app(b_settings)) as b:
        # Each serves the active version from its own verified copy, not from the shared path.
        assert _serving(a) == _serving(b) == first
        for settings in (a_settings, b_settings):
            assert (settings.home / "replica" / "indexes" / first / "manifest.json").is_file()

        # A product PUT on one replica, with an uploaded image: searchable on the other, and its
        # image served there (the upload went to the shared directory).
        image = _png(5150)
        put = a.put("/v1/products/REP-1", json={"title": "copper kettle", "image_b64": base64.b64encode(image).decode()})
        assert put.status_code == 201, put.text
        assert _ids(b.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})) == ["REP-1"]
        served = b.get("/v1/products/REP-1/image")
        assert served.status_code == 200 and served.content == image
        assert list((shared / "images").iterdir()) and not (a_settings.home / "images").exists()

        # A model version trained elsewhere and an index built with it, both published to the shared
        # directory; activated on replica A, it reaches B, which copies the model too.
        model, _, _ = create_base_model("prism-tiny-vit", seed=1)
        write_model_version(shared / "models", "ft-replica", model, arch="prism-tiny-vit",
                            config_file=prism_config_path("prism-tiny-vit"), info={})
        store = Store.open(url)
        try:
            tuned = load_embedder("ft-replica", device="cpu", models_dir=shared / "models")
            second = CatalogIndexer(home=shared, store=store, embedder=tuned,
                                    options=IndexOptions(batch_size=32, activate=False)).run(None).index_version
        finally:
            store.close()
        assert _serving(b) == first  # built, not active: nothing changes
        activated = a.post(f"/v1/models/{second}/activate")
        assert activated.status_code == 200 and activated.json()["serving"], activated.text
        assert eventually(lambda: _serving(b) == second), "replica B never switched to the activated version"
        models = b.get("/v1/models").json()
        assert [v["index_version"] for v in models["indexes"] if v["serving"]] == [second]
        assert [m["model_version"] for m in models["models"] if m["serving"]] == ["ft-replica"]
        assert (b_settings.home / "replica" / "models" / "ft-replica" / "model.json").is_file()
        assert _ids(b.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})) == ["REP-1"]

        # Rolled back on B's side of the database: A follows, and drops its copy of a version
        # retention removed (no row any more: it can never be activated again).
        dropped = a_settings.home / "replica" / "indexes" / "20000101-000000-000000"
        dropped.mkdir()
        store = Store.open(url)
        try:
            store.activate_index_version(first)
        finally:
            store.close()
        assert eventually(lambda: _serving(a) == first), "replica A never followed the rollback"
        assert not dropped.exists() and (a_settings.home / "replica" / "indexes" / second).is_dir()

    # A replica started on an empty home serves the active version, copied from the shared directory.
    fresh = replica("replica-fresh")
    with TestClient(create_app(fresh)) as c:
        assert _serving(c) == first
        assert _ids(c.post("/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})) == ["REP-1"]


def test_a_damaged_local_copy_is_refused_and_copied_again(tmp_path, small_catalog, tiny_embedder, databases):
    shared, url, version = _shared_catalog(tmp_path, small_catalog, tiny_embedder, databases)
    settings = PrismSettings(home=tmp_path / "replica", shared_dir=shared, database_url=url, model=TINY, device="cpu")
    local = settings.home / "replica" / "indexes" / version
    with TestClient(create_app(settings)) as c:
        assert _serving(c) == version
    # Bytes flipped in the copy (a disk error): the next start refuses it by its digest, drops it,
    # and the one after copies it again from the shared directory.
    faiss_file = next(local.glob("image*.faiss"))
    data = bytearray(faiss_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    faiss_file.write_bytes(bytes(data))
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").status_code == 503
        assert not local.exists()
    with TestClient(create_app(settings)) as c:
        assert _serving(c) == version and local.is_dir()
