"""The lexical index: products.search_text, product_identifiers, the database's full-text search

Revision ID: 0006
Revises: 0005

`products.search_text` is a product's text as the lexical leg of hybrid search matches it (the
configured text fields, joined; `store.LexicalConfig`). `product_identifiers` maps exact
identifiers (product_id, and attribute values such as gtin or sku) to products.

SQLite: an FTS5 table `products_fts` with the trigram tokenizer (substrings of three characters,
so CJK text, which has no spaces, is searchable, and a word with one typo still shares most of its
trigrams), kept current by triggers on products: every write path, present and future, updates
it in the same transaction. Deleted products leave it.

PostgreSQL: GIN indexes on `to_tsvector('simple', search_text)` (whole words) and on its
trigrams (`pg_trgm`'s gin_trgm_ops: typo-tolerant word similarity, and substring ILIKE for CJK).
Expression indexes need no upkeep.

Existing products are indexed here with the default text fields (title, description) and their
product_id; `prism index` rewrites them when PRISM_TEXT_FIELDS or PRISM_ID_ATTRIBUTES differ.
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_SQLITE_TRIGGERS = (
    """CREATE TRIGGER products_fts_insert AFTER INSERT ON products
       WHEN new.deleted_at IS NULL AND new.search_text IS NOT NULL BEGIN
         INSERT INTO products_fts(rowid, search_text) VALUES (new.row_id, new.search_text);
       END""",
    """CREATE TRIGGER products_fts_update AFTER UPDATE OF search_text, deleted_at ON products BEGIN
         DELETE FROM products_fts WHERE rowid = old.row_id;
         INSERT INTO products_fts(rowid, search_text)
           SELECT new.row_id, new.search_text WHERE new.deleted_at IS NULL AND new.search_text IS NOT NULL;
       END""",
    """CREATE TRIGGER products_fts_delete AFTER DELETE ON products BEGIN
         DELETE FROM products_fts WHERE rowid = old.row_id;
       END""",
)


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("products", schema=None) as batch_op:
        batch_op.add_column(sa.Column("search_text", sa.Text(), nullable=True))
    op.create_table(
        "product_identifiers",
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.Column("row_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.ForeignKeyConstraint(["row_id"], ["products.row_id"]),
        sa.PrimaryKeyConstraint("value", "row_id"),
    )
    op.create_index("ix_product_identifiers_row_id", "product_identifiers", ["row_id"])
    # The default text fields: the title, then ". " and the description when there is one.
    op.execute(
        "UPDATE products SET search_text = CASE WHEN description IS NULL OR trim(description) = '' "
        "THEN title ELSE title || '. ' || description END"
    )
    _backfill_product_id_keys(bind)
    if bind.dialect.name == "sqlite":
        op.execute("CREATE VIRTUAL TABLE products_fts USING fts5(search_text, tokenize = 'trigram')")
        for trigger in _SQLITE_TRIGGERS:
            op.execute(trigger)
        op.execute(
            "INSERT INTO products_fts(rowid, search_text) SELECT row_id, search_text FROM products "
            "WHERE deleted_at IS NULL AND search_text IS NOT NULL"
        )
    else:
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute("CREATE INDEX ix_products_search_tsv ON products USING gin (to_tsvector('simple', coalesce(search_text, '')))")
        op.execute("CREATE INDEX ix_products_search_trgm ON products USING gin (search_text gin_trgm_ops)")


def _backfill_product_id_keys(bind, batch: int = 10_000) -> None:
    """Every product_id as an identifier key. Folded in Python as `store.identifier_key` folds a
    query (strip, casefold, 256 characters): SQL's lower() leaves non-ASCII letters alone on
    SQLite and differs from casefold on PostgreSQL ("ß"), so such ids would never match. The rule
    is written out here, not imported: a migration must do what it did when it shipped."""
    rows = sa.table("product_identifiers", sa.column("value"), sa.column("row_id"))
    after = None
    while True:
        q = "SELECT row_id, product_id FROM products" + (" WHERE row_id > :after" if after is not None else "")
        chunk = bind.execute(sa.text(q + " ORDER BY row_id LIMIT :n"), {"after": after, "n": batch}).all()
        if not chunk:
            return
        keys = {(str(pid).strip().casefold()[:256], row) for row, pid in chunk}
        values = [{"value": key, "row_id": row} for key, row in sorted(keys) if key]
        if values:
            bind.execute(rows.insert(), values)
        after = chunk[-1][0]


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for name in ("products_fts_insert", "products_fts_update", "products_fts_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS products_fts")
    else:
        op.execute("DROP INDEX IF EXISTS ix_products_search_tsv")
        op.execute("DROP INDEX IF EXISTS ix_products_search_trgm")
    op.drop_index("ix_product_identifiers_row_id", table_name="product_identifiers")
    op.drop_table("product_identifiers")
    # DROP COLUMN in place (SQLite >= 3.35, PostgreSQL): a batch copy of `products` would drop
    # the table that catalog_changes references, which SQLite's foreign keys refuse.
    op.drop_column("products", "search_text")
