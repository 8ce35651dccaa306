"""SQLite: new products enter the full-text index from the store, not from a per-row trigger

Revision ID: 0010
Revises: 0009

Migration 0006 kept `products_fts` current with three triggers. The AFTER INSERT one made a
catalog load's inserts 5x slower: every trigger firing is a statement savepoint, and FTS5 writes
its pending terms to a new on-disk segment at each savepoint, so a load of N products wrote N
one-row segments and merged them (200,000 products: 15.9 s of inserts, of which 12.8 s were the
trigger; the same FTS rows written by one INSERT ... SELECT per chunk: 1.8 s). `Store` now writes
the FTS rows of the products it inserts itself, in the inserting transaction
(`_index_inserted_text` in store/db.py, the only code that inserts products). Updates and deletes
keep their triggers: they touch few rows at a time.

PostgreSQL has no triggers for this (expression indexes): nothing changes there.
"""
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_INSERT_TRIGGER = """CREATE TRIGGER products_fts_insert AFTER INSERT ON products
       WHEN new.deleted_at IS NULL AND new.search_text IS NOT NULL BEGIN
         INSERT INTO products_fts(rowid, search_text) VALUES (new.row_id, new.search_text);
       END"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS products_fts_insert")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(_INSERT_TRIGGER)
