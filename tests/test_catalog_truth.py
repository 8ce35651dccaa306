"""One source of truth for the catalog: file loads against API edits, and index versions that
serve every product by the vectors of its current content, whichever version is active."""

import os
import time

import pytest

from indexer import CatalogIndexer, CatalogUpdater, IndexOptions, IndexSummary, product_text
from sample_catalog import draw_product_image, make_catalog, product_row, write_rows
from search import SearchEngine, Target
from store import ProductInput, SourcePreference

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")


def _run(home, store, embedder, catalog, **options):
    return CatalogIndexer(home=home, store=store, embedder=embedder,
                          options=IndexOptions(batch_size=16, **options)).run(catalog)


def _engine(home, store, embedder) -> SearchEngine:
    engine = SearchEngine(store, indexes_dir=home / "indexes", device="cpu")
    engine._embedders[embedder.name] = embedder
    engine.refresh()
    return engine


def _touch(path, when: float) -> None:
    os.utime(path, (when, when))


def test_a_catalog_file_does_not_silently_undo_newer_api_edits(tmp_path, store, tiny_embedder):
    root = tmp_path / "feed"
    catalog = make_catalog(root, 12)
    home = tmp_path / "home"
    _run(home, store, tiny_embedder, catalog)
    _touch(catalog, time.time() - 3600)  # the feed was exported an hour ago

    updater = CatalogUpdater(home=home, store=store)
    updater.upsert(ProductInput("P00001", "renamed over the API"), tiny_embedder)
    updater.delete("P00002")

    summary = _run(home, store, tiny_embedder, catalog)
    assert summary.api_edits_kept == 2 and sorted(summary.api_edits_kept_ids) == ["P00001", "P00002"]
    assert summary.api_edits_overwritten == 0
    assert store.get_product("P00001").title == "renamed over the API"
    assert store.get_product("P00002") is None
    assert summary.to_dict()["api_edits_kept_ids"] == ["P00001", "P00002"]

    forced = _run(home, store, tiny_embedder, catalog, prefer=SourcePreference.FILE)
    assert forced.api_edits_overwritten == 2 and forced.api_edits_kept == 0
    assert store.get_product("P00001").title == product_row(1, None)["title"]
    assert store.get_product("P00002") is not None

    # A feed exported after an edit wins by default.
    updater.upsert(ProductInput("P00003", "renamed again"), tiny_embedder)
    _touch(catalog, time.time() + 60)
    newer = _run(home, store, tiny_embedder, catalog)
    assert newer.api_edits_overwritten == 1 and store.get_product("P00003").title == product_row(3, None)["title"]


def test_an_older_version_serves_current_content_after_file_and_api_changes(tmp_path, store, tiny_embedder):
    root = tmp_path / "feed"
    catalog = make_catalog(root, 30)
    home = tmp_path / "home"
    first = _run(home, store, tiny_embedder, catalog).index_version

    # The feed renames one product, gives another a new picture and adds a third; then the API
    # renames a fourth. A second version is built from all of it.
    draw_product_image(901).save(root / "images" / "new-picture.png")
    rows = [product_row(i, f"images/{i:05d}.png") for i in range(30)]
    rows[4]["title"] = "brass ship lantern"
    rows[5]["image"] = "images/new-picture.png"
    rows.append({**product_row(30, "images/00029.png"), "title": "felt garden gnome"})
    write_rows(root, rows)
    _run(home, store, tiny_embedder, catalog)
    CatalogUpdater(home=home, store=store).upsert(ProductInput("P00007", "porcelain tea kettle"), tiny_embedder)

    # Roll back to the first version: it was built before all of these changes.
    store.activate_index_version(first)
    engine = _engine(home, store, tiny_embedder)
    assert engine.serving.version.index_version == first
    for product_id in ("P00004", "P00030", "P00007"):
        product = store.get_product(product_id)
        hit = engine.search(text=product_text(product), target=Target.TEXT, k=1).hits[0]
        # Ranked by the vector of the text it displays: its own text is an exact match.
        assert hit.product.product_id == product_id and hit.score == pytest.approx(1.0, abs=1e-4)
    hit = engine.search(image=str(root / "images" / "new-picture.png"), target=Target.IMAGE, k=1).hits[0]
    assert hit.product.product_id == "P00005" and hit.score == pytest.approx(1.0, abs=1e-4)
    # And never by the vectors of what it used to say or show.
    renamed = store.get_product("P00004").row_id
    assert engine.serving.overlay.is_masked("text", renamed)
    old = engine.search(image=str(root / "images" / "00005.png"), target=Target.IMAGE, k=3).hits
    assert all(h.score < 0.999 for h in old if h.product.product_id == "P00005")


def test_a_file_load_without_a_build_keeps_serving_products_by_their_old_vectors(tmp_path, store, tiny_embedder):
    """While an indexing run has loaded a feed but not embedded it yet, a changed product stays
    findable (by the vectors it had) instead of vanishing until the run's version is active."""
    root = tmp_path / "feed"
    catalog = make_catalog(root, 12)
    home = tmp_path / "home"
    _run(home, store, tiny_embedder, catalog)
    engine = _engine(home, store, tiny_embedder)
    before = product_text(store.get_product("P00004"))
    rows = [product_row(i, f"images/{i:05d}.png") for i in range(12)]
    rows[4]["title"] = "brass ship lantern"
    write_rows(root, rows)
    CatalogIndexer(home=home, store=store, embedder=tiny_embedder).load_catalog(catalog, IndexSummary())
    engine.sync()
    row = store.get_product("P00004").row_id
    assert not engine.serving.overlay.is_masked("text", row)
    hits = engine.search(text=before, target=Target.TEXT, k=3).hits
    assert "P00004" in [h.product.product_id for h in hits]



def test_prism_index_keeps_the_home_model_names_failing_images_and_reports_kept_edits(tmp_path, databases):
    """`prism index` without --model re-indexes with the model the home serves (it used to fall
    back to a hub model and fail offline), names each product whose image failed, and says which
    API edits the file did not overwrite."""
    import json

    from prism_cli import run_prism

    root = tmp_path / "feed"
    catalog = make_catalog(root, 12)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [product_row(i, f"images/{i:05d}.png") for i in range(12)]
    rows[3]["image"] = "images/broken.png"
    rows[6]["image"] = "images/missing.png"
    write_rows(root, rows)
    env = databases.env(tmp_path / "home")
    env.pop("PRISM_MODEL", None)

    empty = run_prism(["index", str(catalog)], env, check=False)
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    assert "ERROR" not in empty.stderr and empty.stderr.count("--model") == 1, empty.stderr

    first = run_prism(["index", str(catalog), "--model", "prism-tiny-vit:random", "--json"], env)
    model = json.loads(first.stdout)["model_version"]
    assert {f["product_id"] for f in json.loads(first.stdout)["failed_images"]} == {"P00003", "P00006"}

    store = __import__("store").Store.open(databases.url(tmp_path / "home"))
    try:
        CatalogUpdater(home=tmp_path / "home", store=store).delete("P00001")
    finally:
        store.close()
    _touch(catalog, time.time() - 3600)
    report = tmp_path / "report.json"
    again = run_prism(["index", str(catalog), "--report", str(report)], env)
    assert model in again.stdout  # the home's model, with no --model and no PRISM_MODEL
    assert "P00003: broken" in again.stdout and "P00006: missing" in again.stdout
    assert "API edits newer than the file, kept: 1 (P00001)" in again.stdout
    body = json.loads(report.read_text())
    assert body["model_version"] == model and body["api_edits_kept_ids"] == ["P00001"]
    assert sorted(f["product_id"] for f in body["failed_images"]) == ["P00003", "P00006"]

    bad = run_prism(["index", str(catalog), "--prefer", "whoever"], env, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_rollback_across_models_embeds_file_changes_with_the_older_model(tmp_path, store, tiny_embedder):
    """The newer version was built by another model, so the older model's vector cache lacks the
    file's new content: the server embeds it with the older model when it replays the journal."""
    import open_clip
    import torch

    from embedder import load_embedder, register_prism_configs

    register_prism_configs()
    torch.manual_seed(123)
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("prism-tiny-vit", pretrained=None, pretrained_text=False).state_dict(), other)
    other_embedder = load_embedder(f"prism-tiny-vit:{other}", device="cpu")
    assert other_embedder.name != tiny_embedder.name

    root = tmp_path / "feed"
    catalog = make_catalog(root, 20)
    home = tmp_path / "home"
    first = _run(home, store, tiny_embedder, catalog).index_version
    draw_product_image(902).save(root / "images" / "new-picture.png")
    rows = [product_row(i, f"images/{i:05d}.png") for i in range(20)]
    rows[4]["title"] = "brass ship lantern"
    rows[5]["image"] = "images/new-picture.png"
    write_rows(root, rows)
    assert _run(home, store, other_embedder, catalog).model_version == other_embedder.name

    store.activate_index_version(first)
    engine = _engine(home, store, tiny_embedder)
    product = store.get_product("P00004")
    hit = engine.search(text=product_text(product), target=Target.TEXT, k=1).hits[0]
    assert hit.product.product_id == "P00004" and hit.score == pytest.approx(1.0, abs=1e-4)
    hit = engine.search(image=str(root / "images" / "new-picture.png"), target=Target.IMAGE, k=1).hits[0]
    assert hit.product.product_id == "P00005" and hit.score == pytest.approx(1.0, abs=1e-4)
