from pathlib import Path

from sqlalchemy import inspect

import numpy as np
import pytest

from store import ConflictError, ImageState, ProductFilter, ProductInput, ProductVectors, Store, UnknownVersionError


def test_migrations_create_contract_tables_and_are_idempotent(tmp_path, databases):
    url = databases.url(tmp_path)
    first = Store.open(url)
    tables = set(inspect(first.engine).get_table_names())
    assert {"products", "model_versions", "index_versions", "search_log", "events", "training_runs", "catalog_changes"} <= tables
    assert "alembic_version" in tables
    first.upsert_products([ProductInput("a", "A")])
    first.close()
    again = Store.open(url)  # re-applying migrations must keep data
    assert again.count_products() == 1
    if not databases.postgres:
        with again.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_migration_0003_makes_index_paths_relative_to_the_home(tmp_path, databases):
    from store import migrate

    url = databases.url(tmp_path)
    old = Store.open(url, apply_migrations=False)
    migrate(old.engine, "0002")
    old.register_model_version("m", spec="m:random", dim=4)
    # Rows as code before 0003 wrote them (PRISM_HOME absolute or relative), and two that someone
    # pointed elsewhere by hand.
    for version, path in [("v1", "/srv/prism/indexes/v1"), ("v2", "prism-data/indexes/v2"), ("v3", "indexes/v3"),
                          ("v4", "/mnt/elsewhere/snapshot"), ("v5", "/mnt/ssd/v5")]:
        old.record_index_version(version, model_version="m", path=path, manifest={}, activate=version == "v4")
    old.close()
    store = Store.open(url)
    paths = {v.index_version: v.path for v in store.list_index_versions()}
    store.close()
    assert paths == {"v1": "v1", "v2": "v2", "v3": "v3", "v4": "/mnt/elsewhere/snapshot", "v5": "/mnt/ssd/v5"}


def test_workers_upgrading_one_database_at_once_all_start(tmp_path, databases):
    """`prism serve --workers N` on a home from an older release: every worker migrates at start-up."""
    import subprocess
    import sys
    import time

    from store import migrate

    url = databases.url(tmp_path)
    old = Store.open(url, apply_migrations=False)
    migrate(old.engine, "0002")
    old.close()
    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib; sys.path.insert(0, sys.argv[1]); from store import Store\n"
        "pathlib.Path(sys.argv[3]).touch()\n"
        "while not pathlib.Path(sys.argv[4]).exists(): time.sleep(0.005)\n"
        "Store.open(sys.argv[2]).close()\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    workers = [
        subprocess.Popen([sys.executable, "-c", script, root, url, str(tmp_path / f"ready-{i}"), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(4)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(4)):  # all imported: start together
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.01)
    go.touch()
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, outputs
    versions = []
    for at in (url, databases.url(tmp_path / "fresh")):  # upgraded as far as a new database goes
        store = Store.open(at)
        with store.engine.connect() as conn:
            versions.append(conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar())
        store.close()
    assert versions[0] == versions[1]


def test_upsert_update_delete_and_undelete(store):
    ids = store.upsert_products([ProductInput("a", "Apple", price=1.5, image_uri="/x/a.png"), ProductInput("b", "Bag")]).row_ids
    assert set(ids) == {"a", "b"} and ids["a"] != ids["b"]
    store.upsert_products([ProductInput("a", "Green apple", price=2.0, image_uri="/x/a.png")])
    a = store.get_product("a")
    assert a.title == "Green apple" and a.price == 2.0 and a.row_id == ids["a"]  # row id is stable
    assert store.soft_delete_product("a").deleted_at is not None
    assert store.get_product("a") is None
    assert store.get_product("a", include_deleted=True) is not None
    assert [p.row_id for chunk in store.iter_live_products() for p in chunk] == [ids["b"]]
    assert store.soft_delete_product("a") is None  # already gone
    store.upsert_products([ProductInput("a", "Apple again", image_uri="/x/other.png")])
    back = store.get_product("a")
    assert back.deleted_at is None and back.row_id == ids["a"] and back.image_status == "pending"


def test_filters_resolve_in_sql(store):
    store.upsert_products(
        [
            ProductInput("s1", "shoe", category="shoes", brand="acme", price=10),
            ProductInput("s2", "shoe", category="shoes", brand="globex", price=50),
            ProductInput("h1", "hat", category="hats", brand="acme", price=30),
        ]
    )
    rows = store.products_by_ids(["s1", "s2", "h1"])
    r = {k: v.row_id for k, v in rows.items()}
    assert set(store.filter_row_ids(ProductFilter(categories=("shoes",)))) == {r["s1"], r["s2"]}
    assert set(store.filter_row_ids(ProductFilter(brands=("acme",), price_min=20))) == {r["h1"]}
    assert set(store.filter_row_ids(ProductFilter(price_max=30))) == {r["s1"], r["h1"]}
    store.soft_delete_product("s1")
    assert set(store.filter_row_ids(ProductFilter(categories=("shoes",)))) == {r["s2"]}


def test_only_one_index_version_is_active(store):
    store.register_model_version("m1", spec="x:random", dim=4)
    store.record_index_version("v1", model_version="m1", path="/p1", manifest={}, activate=True)
    store.record_index_version("v2", model_version="m1", path="/p2", manifest={}, activate=True)
    assert store.active_index_version().index_version == "v2"
    store.activate_index_version("v1")
    assert [v.index_version for v in store.list_index_versions() if v.is_active] == ["v1"]
    try:
        store.activate_index_version("nope")
        raise AssertionError("expected UnknownVersionError")
    except UnknownVersionError:
        pass


def _vectors(action="set", image_hash="h1", status=None):
    return ProductVectors(
        model_version="m", text_hash="t1", text_vector=np.ones(4, np.float32), image_action=action,
        image_hash=image_hash if action == "set" else None,
        image_vector=np.full(4, 0.5, np.float32) if action == "set" else None, image_status=status,
    )


def test_live_upserts_and_deletes_are_journaled_in_commit_order(store):
    product, created, seq1 = store.upsert_product_live(ProductInput("p", "P", image_uri="/i/p.png"), _vectors(), expect_updated_at=None)
    assert created and product.image_status == "ok" and product.image_hash == "h1" and product.text_hash == "t1"
    assert store.soft_delete_product("p") is not None
    changes = store.catalog_changes(0)
    assert [(c.seq, c.op) for c in changes] == [(seq1, "upsert"), (seq1 + 1, "delete")]
    assert np.array_equal(changes[0].image_vector, np.full(4, 0.5, np.float32)) and changes[0].image_action == "set"
    assert store.catalog_seq() == seq1 + 1 and store.catalog_changes(seq1 + 1) == []
    assert store.serving_marks() == (None, seq1 + 1)


def test_a_live_upsert_on_a_stale_read_is_refused(store):
    first, _, _ = store.upsert_product_live(ProductInput("p", "P", image_uri="/i/p.png"), _vectors(), expect_updated_at=None)
    with pytest.raises(ConflictError):  # another writer created it after our read
        store.upsert_product_live(ProductInput("p", "P2"), _vectors("clear", status="none"), expect_updated_at=None)
    store.upsert_product_live(ProductInput("p", "P3", image_uri="/i/p.png"), _vectors("keep"), expect_updated_at=first.updated_at)
    with pytest.raises(ConflictError):  # changed since `first` was read
        store.upsert_product_live(ProductInput("p", "P4"), _vectors("keep"), expect_updated_at=first.updated_at)
    assert store.get_product("p").title == "P3" and len(store.catalog_changes(0)) == 2


def test_indexer_state_writes_do_not_overwrite_a_newer_change(store):
    ids = store.upsert_products([ProductInput("a", "A", image_uri="/i/a.png"), ProductInput("b", "B", image_uri="/i/b.png")]).row_ids
    snapshot = {p.row_id: p for p in store.live_products()}
    # An API change lands between the indexer's read and its write.
    a = store.get_product("a")
    store.upsert_product_live(ProductInput("a", "A2", image_uri="/i/new.png"), _vectors(image_hash="fresh"), expect_updated_at=a.updated_at)
    states = [ImageState(ids["a"], "stale", "ok"), ImageState(ids["b"], "hb", "ok")]
    store.record_image_states(states, seen={r: (p.image_uri, p.image_hash) for r, p in snapshot.items()})
    store.record_text_hashes({ids["a"]: "stale-text", ids["b"]: "tb"}, seen={r: p.text_hash for r, p in snapshot.items()})
    a, b = store.get_product("a"), store.get_product("b")
    assert (a.image_hash, a.image_uri, a.text_hash) == ("fresh", "/i/new.png", "t1")
    assert (b.image_hash, b.image_status, b.text_hash) == ("hb", "ok", "tb")


def _edited_over_the_api(store, product_id, title):
    current = store.get_product(product_id)
    return store.upsert_product_live(ProductInput(product_id, title), _vectors(action="clear"),
                                     expect_updated_at=current.updated_at)[0]


def test_a_file_load_keeps_api_edits_newer_than_the_file_unless_told_otherwise(store):
    from datetime import timedelta

    from store import SourcePreference

    store.upsert_products([ProductInput("a", "A"), ProductInput("b", "B"), ProductInput("c", "C")])
    edit = _edited_over_the_api(store, "a", "A from the API")
    assert store.get_product("a").changed_by == "api"
    store.soft_delete_product("b")
    older_file = edit.updated_at - timedelta(minutes=5)
    rows = [ProductInput("a", "A"), ProductInput("b", "B"), ProductInput("c", "C2")]

    kept = store.upsert_products(rows, feed_time=older_file)
    assert sorted(kept.api_edits_kept) == ["a", "b"] and kept.api_edits_overwritten == []
    assert store.get_product("a").title == "A from the API" and store.get_product("b") is None
    assert store.get_product("c").title == "C2" and kept.content_changed == 1

    # The same old file, told to win: both edits are overwritten and the rows are the file's again.
    forced = store.upsert_products(rows, feed_time=older_file, prefer=SourcePreference.FILE)
    assert sorted(forced.api_edits_overwritten) == ["a", "b"] and forced.unchanged == 1
    assert store.get_product("a").title == "A" and store.get_product("b").title == "B"
    assert store.get_product("a").changed_by == "file"

    # A file written after an edit wins by default; prefer=API keeps an edit even then.
    _edited_over_the_api(store, "a", "A again from the API")
    _edited_over_the_api(store, "c", "C from the API")
    later_file = store.get_product("c").updated_at + timedelta(minutes=5)
    api_first = store.upsert_products([ProductInput("c", "C3")], feed_time=later_file, prefer=SourcePreference.API)
    assert api_first.api_edits_kept == ["c"] and store.get_product("c").title == "C from the API"
    newer = store.upsert_products([ProductInput("a", "A4"), ProductInput("c", "C3")], feed_time=later_file)
    assert sorted(newer.api_edits_overwritten) == ["a", "c"] and store.get_product("a").title == "A4"


def test_file_changes_enter_the_journal_once_an_index_version_exists(store):
    store.upsert_products([ProductInput("a", "A", price=1.0), ProductInput("b", "B", image_uri="/i/b.png")])
    assert store.catalog_changes(0) == []  # nothing replays a journal before the first version
    store.register_model_version("m", spec="m", dim=4)
    store.record_index_version("v1", model_version="m", path="v1", manifest={"catalog_seq": 0}, activate=True)
    written = store.upsert_products(
        [ProductInput("a", "A", price=2.0), ProductInput("b", "B2", image_uri="/i/b.png"),
         ProductInput("c", "C", image_uri="/i/c.png")],
        text_hash=lambda it: f"hash-of-{it.title}",
    )
    assert (written.created, written.content_changed, written.metadata_changed) == (1, 1, 1)
    by_product = {c.product_id: c for c in store.catalog_changes(0)}
    assert by_product["a"].op == "meta"
    assert (by_product["b"].op, by_product["b"].text_hash, by_product["b"].image_action) == ("file", "hash-of-B2", "keep")
    assert (by_product["c"].op, by_product["c"].text_hash, by_product["c"].image_action) == ("file", "hash-of-C", "set")
    # An identical row is neither written nor journaled.
    again = store.upsert_products([ProductInput("a", "A", price=2.0)])
    assert again.unchanged == 1 and len(store.catalog_changes(0)) == 3


def test_category_and_brand_filters_and_facets_ignore_case(store):
    store.upsert_products([
        ProductInput("s1", "shoe", category="Shoes", brand="ACME"),
        ProductInput("s2", "shoe", category="shoes", brand="acme"),
        ProductInput("s3", "shoe", category=" SHOES", brand="Globex"),
        ProductInput("h1", "hat", category="hats", brand="acme"),
    ])
    rows = {k: v.row_id for k, v in store.products_by_ids(["s1", "s2", "s3", "h1"]).items()}
    assert set(store.filter_row_ids(ProductFilter(categories=("shoes",)))) == {rows["s1"], rows["s2"], rows["s3"]}
    assert set(store.filter_row_ids(ProductFilter(brands=("Acme",)))) == {rows["s1"], rows["s2"], rows["h1"]}
    facets = store.facets()
    # One entry per value, spelled as the oldest product writes it.
    assert facets["categories"] == [("Shoes", 3), ("hats", 1)]
    assert facets["brands"] == [("ACME", 3), ("Globex", 1)]
