"""catalog change journal; search_log.query_product_id

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "catalog_changes",
        sa.Column("seq", RowId, autoincrement=True, nullable=False),
        sa.Column("row_id", RowId, nullable=False),
        sa.Column("product_id", sa.String(length=256), nullable=False),
        sa.Column("op", sa.String(length=16), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=True),
        sa.Column("text_hash", sa.String(length=64), nullable=True),
        sa.Column("text_vector", sa.LargeBinary(), nullable=True),
        sa.Column("image_action", sa.String(length=16), nullable=True),
        sa.Column("image_hash", sa.String(length=64), nullable=True),
        sa.Column("image_vector", sa.LargeBinary(), nullable=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["row_id"], ["products.row_id"]),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("catalog_changes", schema=None) as batch_op:
        batch_op.create_index("ix_catalog_changes_row_id", ["row_id"], unique=False)
    with op.batch_alter_table("search_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("query_product_id", sa.String(length=256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("search_log", schema=None) as batch_op:
        batch_op.drop_column("query_product_id")
    with op.batch_alter_table("catalog_changes", schema=None) as batch_op:
        batch_op.drop_index("ix_catalog_changes_row_id")
    op.drop_table("catalog_changes")
