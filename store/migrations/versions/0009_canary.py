"""canaries, and the arm of every position of an interleaved search

Revision ID: 0009
Revises: 0008

A canary interleaves a candidate index version's ranking with the serving one for a fraction of
searches (docs/feedback.md, "Interleaved canary"). `canaries` holds its state, one running at a
time (`running_slot` is 1 while running, NULL after, and unique); `search_log` records which
canary a search was interleaved for and, per served position, the arm that contributed it.
Searches logged before this revision were never interleaved (both columns NULL).
"""
from alembic import op
import sqlalchemy as sa

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "canaries",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("running_slot", sa.Integer(), nullable=True),
        sa.Column("candidate_model_version", sa.String(length=200), nullable=False),
        sa.Column("candidate_index_version", sa.String(length=200), nullable=False),
        sa.Column("serving_model_version", sa.String(length=200), nullable=False),
        sa.Column("serving_index_version", sa.String(length=200), nullable=False),
        sa.Column("fraction", sa.Float(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("started_by", sa.String(length=32), nullable=True),
        sa.Column("training_run_id", RowId, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_by", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.UniqueConstraint("running_slot", name="uq_canaries_running_slot"),
    )
    # Plain ADD COLUMNs, never a batch copy of search_log (events reference it).
    op.add_column("search_log", sa.Column("canary_id", RowId, nullable=True))
    op.add_column("search_log", sa.Column("arms", sa.JSON(), nullable=True))
    op.create_index("ix_search_log_canary_id", "search_log", ["canary_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_search_log_canary_id", table_name="search_log")
    op.drop_column("search_log", "arms")
    op.drop_column("search_log", "canary_id")
    op.drop_table("canaries")
