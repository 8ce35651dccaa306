"""products.changed_by: whether a product's current content came from a catalog file or the API

Revision ID: 0004
Revises: 0003

`prism index` decides per product whether a catalog file may overwrite an edit made over the
HTTP API since (the newer change wins unless `--prefer` says otherwise), so the store must know
which of the two wrote a row last. Rows written before this revision came from files or from API
edits alike; they are marked "file", which lets the next file load win as it did before.
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("products", schema=None) as batch_op:
        batch_op.add_column(sa.Column("changed_by", sa.String(length=8), nullable=False, server_default="file"))


def downgrade() -> None:
    with op.batch_alter_table("products", schema=None) as batch_op:
        batch_op.drop_column("changed_by")
