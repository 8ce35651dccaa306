"""products.stock: units on hand, for the `in_stock` filter and facet

Revision ID: 0007_products_stock
Revises: 0005

NULL means unknown (a catalog or client that does not track stock): such products are never
filtered out by `in_stock`. Rows written before this revision have no stock, i.e. unknown.
"""
from alembic import op
import sqlalchemy as sa

revision = "0007_products_stock"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("products", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stock", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("products", schema=None) as batch_op:
        batch_op.drop_column("stock")
