from sqlalchemy import inspect

from store import ProductFilter, ProductInput, Store, UnknownVersionError


def test_migrations_create_contract_tables_and_are_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    first = Store.open(url)
    tables = set(inspect(first.engine).get_table_names())
    assert {"products", "model_versions", "index_versions", "search_log", "events", "training_runs"} <= tables
    assert "alembic_version" in tables
    first.upsert_products([ProductInput("a", "A")])
    first.close()
    again = Store.open(url)  # re-applying migrations must keep data
    assert again.count_products() == 1
    with again.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_upsert_update_delete_and_undelete(store):
    ids = store.upsert_products([ProductInput("a", "Apple", price=1.5, image_uri="/x/a.png"), ProductInput("b", "Bag")])
    assert set(ids) == {"a", "b"} and ids["a"] != ids["b"]
    store.upsert_products([ProductInput("a", "Green apple", price=2.0, image_uri="/x/a.png")])
    a = store.get_product("a")
    assert a.title == "Green apple" and a.price == 2.0 and a.row_id == ids["a"]  # row id is stable
    assert store.soft_delete_product("a").deleted_at is not None
    assert store.get_product("a") is None
    assert store.get_product("a", include_deleted=True) is not None
    assert list(store.deleted_row_ids()) == [ids["a"]]
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
