"""products.stock: units on hand, for the `in_stock` filter and facet

Revision ID: 0007
Revises: 0006

NULL means unknown (a catalog or client that does not track stock): such products are never
filtered out by `in_stock`. Rows written before this revision have no stock, i.e. unknown.
"""
from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN, never a batch copy of the table: on SQLite a copy would drop the
    # full-text triggers that 0006 put on `products`.
    op.add_column("products", sa.Column("stock", sa.Integer(), nullable=True))


def downgrade() -> None:
    # DROP COLUMN in place (SQLite >= 3.35 and PostgreSQL), for the same reason.
    op.drop_column("products", "stock")
