"""The reads every query makes (store/db.py `_hot_read`: the serving marks, exact identifiers) are
statements built once and reused: each call still sees the database as it is then, and the
identifier read's bound key and limit apply per call."""

from store import LexicalConfig, ProductInput, Store

LEXICAL = LexicalConfig(id_attributes=("gtin",))


def test_reused_statements_see_every_change_and_bind_per_call(tmp_path, databases):
    store = Store.open(databases.url(tmp_path), lexical=LEXICAL)
    try:
        assert store.serving_marks_and_canary() == (None, 0, None)
        store.upsert_products([ProductInput("H1", "okapi lamp", attributes={"gtin": "555"}),
                               ProductInput("H2", "okapi lamp twin", attributes={"gtin": "555"}),
                               ProductInput("H3", "narwhal mug", attributes={"gtin": "777"})])
        both = store.identifier_rows("555")
        assert len(both) == 2 and both == sorted(both)
        assert store.identifier_rows("555", limit=1) == both[:1]
        assert store.identifier_rows("777") != both and len(store.identifier_rows("777")) == 1
        store.soft_delete_products(["H1"])
        assert store.identifier_rows("555") == both[1:]
    finally:
        store.close()
