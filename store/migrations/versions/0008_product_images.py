"""product_images: a product's images after the first, one row (and one image-index vector) each

Revision ID: 0008
Revises: 0007

The first image stays on `products`; rows here hold positions 1, 2, ... of the catalog's
`images` list. `image_id` is the FAISS id of the image's vector in an index version's
`image_extra` index; searches join it to `products.row_id` through this table. Ids are never
reused (AUTOINCREMENT on SQLite, a sequence on PostgreSQL): a replaced image list gets new ids,
so an older index version's vectors of the old images map to nothing.
"""
from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "product_images",
        sa.Column("image_id", RowId, primary_key=True, autoincrement=True),
        sa.Column("row_id", RowId, sa.ForeignKey("products.row_id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("image_ref", sa.Text(), nullable=True),
        sa.Column("image_uri", sa.Text(), nullable=True),
        sa.Column("image_hash", sa.String(64), nullable=True),
        sa.Column("image_status", sa.String(32), nullable=False, server_default="pending"),
        sa.Column("image_error", sa.Text(), nullable=True),
        # The vector of an API upload, with its vector space (catalog-file images: NULL).
        sa.Column("vector_space", sa.String(200), nullable=True),
        sa.Column("vector", sa.LargeBinary(), nullable=True),
        sa.UniqueConstraint("row_id", "position", name="uq_product_images_row_position"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_product_images_row_id", "product_images", ["row_id"])


def downgrade() -> None:
    op.drop_index("ix_product_images_row_id", table_name="product_images")
    op.drop_table("product_images")
