"""The lexical leg and exact identifiers, on the database's own full-text search (SQLite FTS5,
PostgreSQL tsvector + pg_trgm), and operator-chosen text fields. Real index, tiny model, both
databases (`--database postgresql`)."""

import json

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import PrismSettings
from indexer import CatalogIndexer, IndexOptions
from sample_catalog import draw_product_image
from search import SearchEngine
from store import AttributeCondition, LexicalConfig, attribute_key, ProductFilter, ProductInput, Store, migrate

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TINY = "prism-tiny-vit:random"
TOKEN = "lexical-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
LEXICAL = LexicalConfig(text_fields=("title", "description", "attributes.title_zh"), id_attributes=("gtin", "sku"))

# Titles that differ by a word or two, as a shop's do; generated colours and nouns.
_COLOURS = ["crimson", "navy", "olive", "amber", "violet", "charcoal"]
_NOUNS = ["sneaker", "backpack", "beanie", "jacket", "wristwatch", "sandal", "scarf"]


def _rows(n: int = 42) -> list[dict]:
    rows = []
    for i in range(n):
        colour, noun = _COLOURS[i % len(_COLOURS)], _NOUNS[(i // len(_COLOURS)) % len(_NOUNS)]
        rows.append({
            "product_id": f"LX{i:04d}",
            "title": f"{colour} {noun} {i}",
            "description": f"a {colour} {noun} from the autumn range",
            "category": "shoes" if noun in ("sneaker", "sandal") else "other",
            "brand": "acme" if i % 2 else "globex",
            "price": 10 + i,
            "image": f"images/{i:05d}.png",
            "attributes": {"gtin": f"{4006381333900 + i:013d}", "sku": f"SKU-{i:04d}-X"},
        })
    rows[5]["attributes"]["title_zh"] = "红色苹果手机壳"
    rows[6]["title"] = "Running shoe"
    return rows


@pytest.fixture(scope="module")
def lexical_home(tmp_path_factory, tiny_embedder, databases):
    root = tmp_path_factory.mktemp("lexical")
    (root / "images").mkdir()
    rows = _rows()
    for i in range(len(rows)):
        draw_product_image(i, 48).save(root / "images" / f"{i:05d}.png")
    catalog = root / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    home = root / "home"
    store = Store.open(databases.url(home), lexical=LEXICAL)
    try:
        summary = CatalogIndexer(home=home, store=store, embedder=tiny_embedder,
                                 options=IndexOptions(batch_size=32)).run(catalog)
    finally:
        store.close()
    settings = PrismSettings(
        home=home, device="cpu", model=TINY, database_url=databases.url(home), admin_token=TOKEN,
        text_fields="title,description,attributes.title_zh", id_attributes="gtin,sku",
    )
    return settings, catalog, rows, summary


@pytest.fixture(scope="module")
def client(lexical_home):
    settings = lexical_home[0]
    with TestClient(create_app(settings), headers=ADMIN) as c:
        yield c


def _search(client, q, target="hybrid", k=10, **params):
    r = client.get("/v1/search", params={"q": q, "target": target, "k": k, **params})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _ids(results) -> list[str]:
    return [r["product_id"] for r in results]


# ---------------------------------------------------------------- exact identifiers


@pytest.mark.parametrize("target", ["image", "text", "hybrid"])
def test_an_exact_identifier_returns_its_product_first_for_every_target(client, lexical_home, target):
    rows = lexical_home[2]
    for row, value in ((rows[3], rows[3]["product_id"]), (rows[17], rows[17]["attributes"]["gtin"]),
                       (rows[29], rows[29]["attributes"]["sku"].lower())):
        results = _search(client, value, target=target, k=5)
        assert results[0]["product_id"] == row["product_id"], (value, _ids(results))
        assert results[0]["scores"].get("exact") == 1.0
        assert row["product_id"] not in _ids(results)[1:]  # once, not again further down


def test_an_identifier_that_matches_nothing_leaves_vector_targets_pure(client):
    """image and text stay vector searches: scores are their cosines, no lexical or exact part."""
    for target in ("image", "text"):
        results = _search(client, "crimson sneaker", target=target)
        assert all(set(r["scores"]) == {target} for r in results)


def test_cli_search_finds_an_identifier(lexical_home, databases):
    from prism_cli import run_prism

    settings, _, rows, _ = lexical_home
    env = databases.env(settings.home, PRISM_MODEL=TINY, PRISM_DEVICE="cpu", PRISM_ID_ATTRIBUTES="gtin,sku",
                        PRISM_TEXT_FIELDS="title,description,attributes.title_zh")
    out = run_prism(["search", rows[11]["attributes"]["gtin"], "--target", "text", "-k", "3", "--json"], env)
    assert json.loads(out.stdout)["results"][0]["product_id"] == rows[11]["product_id"]


# ---------------------------------------------------------------- lexical leg


def test_hybrid_ranks_a_typed_title_first(client, lexical_home):
    rows = lexical_home[2]
    for row in rows[:12]:
        results = _search(client, row["title"], k=6)
        assert results[0]["product_id"] == row["product_id"], (row["title"], _ids(results))
        assert "lexical" in results[0]["scores"]


def test_a_word_with_one_typo_still_matches(client, lexical_home, databases):
    store = client.app.state.services.store
    rows = lexical_home[2]
    # A transposition, a transposition, a deletion.
    for typed, row in (("amber wristwacth 27", rows[27]), ("navy bakcpack 7", rows[7]), ("charcol sneaker 5", rows[5])):
        assert typed != row["title"] and len(typed.split()) == len(row["title"].split())
        assert row["product_id"] in _ids(_search(client, typed, k=10)), typed
        found = store.lexical_search(typed, limit=10)
        assert store.products_by_row_ids([found[0][0]])[found[0][0]].product_id == row["product_id"], typed


def test_a_chinese_attribute_title_is_matched_lexically(client, lexical_home):
    """attributes.title_zh is a text field here: CJK substrings match (two characters, four)."""
    target = lexical_home[2][5]["product_id"]
    store = client.app.state.services.store
    for q in ("苹果", "手机壳", "红色苹果手机壳"):
        found = store.lexical_search(q, limit=5)
        assert found and store.products_by_row_ids([found[0][0]])[found[0][0]].product_id == target, q
        assert _ids(_search(client, q, k=3))[0] == target, q


@pytest.mark.parametrize("query", [
    '"', '""', '"running', "shoe*", "NEAR(running shoe)", "running NEAR( shoe", "-running", "running -shoe",
    "running OR", "AND", "NOT shoe", "title:running", "^running", "(", ")", "{col}:x", "%", "_", "\\", "'; DROP TABLE products; --",
    "a" * 1999, "running " * 240, "红" * 600, "\u0000", "🙂🙂🙂", "   x   ",
])
def test_hostile_queries_never_fail(client, query):
    for target in ("hybrid", "text"):
        r = client.get("/v1/search", params={"q": query, "target": target, "k": 5})
        assert r.status_code in (200, 422), (query[:40], r.status_code, r.text[:200])
        if r.status_code == 422:
            assert r.json()["detail"]
    r = client.post("/v1/search", json={"text": query, "target": "hybrid", "k": 5})
    assert r.status_code in (200, 422), r.text[:200]


def test_filters_apply_to_the_lexical_leg_and_to_identifiers(client, lexical_home):
    rows = lexical_home[2]
    sneaker = rows[0]  # "crimson sneaker 0": category shoes
    assert sneaker["category"] == "shoes"
    results = _search(client, sneaker["title"], category="other", k=20)
    assert results and sneaker["product_id"] not in _ids(results)
    assert all(r["category"] == "other" for r in results)
    results = _search(client, sneaker["attributes"]["gtin"], target="text", category="other", k=5)
    assert sneaker["product_id"] not in _ids(results)
    engine: SearchEngine = client.app.state.services.engine
    allowed = engine.serving.filters.allowed(ProductFilter(price_max=20))
    pinned, lexical = engine._lexical("sneaker", engine_target("hybrid"), allowed)
    assert lexical and all(int(r) in set(allowed.ids.tolist()) for r, _ in lexical)


def test_a_narrow_filter_still_gets_the_lexical_matches_ranked_below_the_first_page(client, monkeypatch):
    """The database ranks full-text matches before the filter applies: when the filter keeps too few
    of the first rows, the leg asks for more rather than contributing nothing."""
    import search.engine as engine_module

    engine: SearchEngine = client.app.state.services.engine
    monkeypatch.setattr(engine_module, "LEXICAL_DEPTH", 2)
    monkeypatch.setattr(engine_module, "LEXICAL_FILTERED_DEPTH", 64)
    everything = engine.store.lexical_search("autumn range", limit=64)
    assert len(everything) > 8  # every description says it
    last_row = everything[-1][0]
    sku = engine.store.products_by_row_ids([last_row])[last_row].attributes["sku"]
    allowed = engine.serving.filters.allowed(ProductFilter(attributes=(AttributeCondition("sku", (attribute_key(sku),)),)))
    _, lexical = engine._lexical("autumn range", engine_target("hybrid"), allowed)
    assert [row for row, _ in lexical] == [last_row]


def engine_target(name):
    from search import Target

    return Target(name)


# ---------------------------------------------------------------- kept current


def test_put_and_delete_keep_the_lexical_index_and_identifiers_current(client):
    store = client.app.state.services.store
    r = client.put("/v1/products/LXNEW", json={"title": "zebra striped umbrella", "attributes": {"sku": "ZB-77"}})
    assert r.status_code in (200, 201), r.text
    created = store.get_product("LXNEW").row_id
    # the store itself enters a new product into the full-text table (no insert trigger, 0010)
    assert created in [row for row, _ in store.lexical_search("zebra striped", limit=10)]
    assert _ids(_search(client, "zebra striped umbrella", k=3))[0] == "LXNEW"
    assert _ids(_search(client, "zb-77", target="image", k=3))[0] == "LXNEW"
    r = client.put("/v1/products/LXNEW", json={"title": "quokka plush toy", "attributes": {"sku": "QK-1"}})
    assert r.status_code == 200, r.text
    assert "LXNEW" not in [store.products_by_row_ids([row])[row].product_id for row, _ in store.lexical_search("zebra striped", limit=10)]
    assert _ids(_search(client, "quokka plush", k=3))[0] == "LXNEW"
    assert store.identifier_rows("zb-77") == [] and len(store.identifier_rows("qk-1")) == 1
    assert client.delete("/v1/products/LXNEW").status_code == 204
    assert store.lexical_search("quokka plush", limit=10) == []
    assert store.identifier_rows("qk-1") == [] and store.identifier_rows("LXNEW") == []
    assert "LXNEW" not in _ids(_search(client, "LXNEW", k=5))


def test_a_file_reload_rewrites_changed_products(tmp_path, databases):
    store = Store.open(databases.url(tmp_path), lexical=LEXICAL)
    try:
        store.upsert_products([ProductInput("F1", "okapi lamp", attributes={"gtin": "111"}),
                               ProductInput("F2", "narwhal mug")])
        row = store.identifier_rows("F1")[0]
        assert [r for r, _ in store.lexical_search("okapi lamp")] == [row]
        store.upsert_products([ProductInput("F1", "capybara lamp", attributes={"gtin": "222"}),
                               ProductInput("F2", "narwhal mug")])
        assert store.lexical_search("okapi") == []
        assert [r for r, _ in store.lexical_search("capybara lamp")] == [row]
        assert store.identifier_rows("111") == [] and store.identifier_rows("222") == [row]
        store.soft_delete_products(["F1"])
        assert store.lexical_search("capybara") == [] and store.identifier_rows("222") == []
        store.upsert_products([ProductInput("F1", "capybara lamp", attributes={"gtin": "222"})])  # restored
        assert [r for r, _ in store.lexical_search("capybara")] == [row] and store.identifier_rows("222") == [row]
    finally:
        store.close()


def test_the_migration_indexes_products_an_older_schema_holds(tmp_path, databases):
    from sqlalchemy import text

    from store.db import _make_engine

    url = databases.url(tmp_path)
    engine = _make_engine(url)
    migrate(engine, "0005")
    with engine.begin() as c:
        for pid, title, desc in (("OLD-1", "vintage brass telescope", "for stargazers"), ("OLD-2", "鹦鹉螺 lamp", None),
                                ("ÄRMEL-Straße ", "sleeve", None)):
            c.execute(text("INSERT INTO products (product_id, title, description, image_status, attributes, created_at, "
                           "updated_at, changed_by) VALUES (:p, :t, :d, 'none', '{}', CURRENT_TIMESTAMP, "
                           "CURRENT_TIMESTAMP, 'file')"), {"p": pid, "t": title, "d": desc})
    engine.dispose()
    store = Store.open(url)
    try:
        old1 = store.get_product("OLD-1").row_id
        assert [r for r, _ in store.lexical_search("brass telescope")] == [old1]
        assert [r for r, _ in store.lexical_search("stargazers")] == [old1]
        assert [r for r, _ in store.lexical_search("telescpoe")] == [old1]  # a typo
        assert store.identifier_rows("old-1") == [old1]
        # folded as a query is (casefold), not by SQL's lower(): ASCII-only on SQLite, no "ß" -> "ss"
        assert store.identifier_rows("ärmel-strasse") == [store.get_product("ÄRMEL-Straße ").row_id]
        assert [r for r, _ in store.lexical_search("鹦鹉螺")] == [store.get_product("OLD-2").row_id]
    finally:
        store.close()


# ---------------------------------------------------------------- text fields


def test_processes_without_the_settings_follow_the_config_the_index_was_built_with(lexical_home, databases, tmp_path):
    """Only `prism index` applies PRISM_TEXT_FIELDS / PRISM_ID_ATTRIBUTES: a server or CLI started
    without them must not write products with the defaults (that would drop every SKU from the
    identifiers and embed PUT texts unlike the index's)."""
    settings, _, rows, _ = lexical_home
    home = tmp_path / "home"
    databases.copy_home(settings.home, home)
    store = Store.open(databases.url(home))
    try:
        assert store.lexical == LEXICAL
    finally:
        store.close()
    plain = PrismSettings(home=home, device="cpu", model=TINY, database_url=databases.url(home), admin_token=TOKEN)
    assert plain.lexical() is None
    sku = rows[3]["attributes"]["sku"]
    with TestClient(create_app(plain), headers=ADMIN) as c:
        r = c.patch(f"/v1/products/{rows[3]['product_id']}", json={"price": 99.0})
        assert r.status_code == 200, r.text
        assert _ids(_search(c, sku, target="image", k=3))[0] == rows[3]["product_id"]
        assert c.app.state.services.store.identifier_rows(sku)


def test_text_fields_are_recorded_and_a_change_re_embeds(lexical_home, tiny_embedder, databases, tmp_path):
    settings, catalog, rows, first = lexical_home
    from store import LexicalConfig as LC

    home = tmp_path / "home"
    databases.copy_home(settings.home, home)
    store = Store.open(databases.url(home), lexical=LEXICAL)
    try:
        manifest = store.active_index_version().manifest
        assert manifest["lexical"] == {"text_fields": ["title", "description", "attributes.title_zh"],
                                       "id_attributes": ["gtin", "sku"]}
        same = CatalogIndexer(home=home, store=store, embedder=tiny_embedder).run(catalog)
        assert same.texts_embedded == 0
    finally:
        store.close()
    store = Store.open(databases.url(home), lexical=LC(text_fields=("title",), id_attributes=("gtin",)))
    try:
        changed = CatalogIndexer(home=home, store=store, embedder=tiny_embedder).run(catalog)
        # Every product with a description (all) or a Chinese title now has another text.
        assert changed.texts_embedded == len(rows)
        assert store.active_index_version().manifest["lexical"]["text_fields"] == ["title"]
        assert store.lexical_search("autumn range") == []  # descriptions left the lexical index
        assert store.lexical_search("苹果") == []
        assert store.identifier_rows(rows[4]["attributes"]["sku"]) == []
        assert len(store.identifier_rows(rows[4]["attributes"]["gtin"])) == 1
    finally:
        store.close()


def test_text_fields_setting_is_validated():
    from pydantic import ValidationError

    assert PrismSettings(text_fields=" title , attributes.title_zh ").lexical().text_fields == ("title", "attributes.title_zh")
    for bad in ("", "price", "attributes.", "title,nope"):
        with pytest.raises(ValidationError):
            PrismSettings(text_fields=bad)


def test_the_lexical_and_stock_migrations_downgrade_with_journal_rows_and_upgrade_again(tmp_path, databases):
    """0007 and 0006 drop their columns in place: a copy of `products` would be refused while
    catalog_changes references it (SQLite's foreign keys)."""
    from alembic import command
    from alembic.config import Config

    from store.db import _MIGRATIONS, _make_engine, _migrating_connection

    url = databases.url(tmp_path)
    store = Store.open(url)
    try:
        store.upsert_products([ProductInput("DOWN-1", "folding brass telescope", attributes={"gtin": "333"})])
        row = store.get_product("DOWN-1").row_id
        store.soft_delete_products(["DOWN-1"])  # a journal row that references the product
        assert store.catalog_seq() > 0
    finally:
        store.close()
    engine = _make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with _migrating_connection(engine) as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0005")
    migrate(engine, "head")
    engine.dispose()
    store = Store.open(url)
    try:
        store.upsert_products([ProductInput("DOWN-1", "folding brass telescope", attributes={"gtin": "333"})])
        assert [r for r, _ in store.lexical_search("brass telescope")] == [row]
    finally:
        store.close()
