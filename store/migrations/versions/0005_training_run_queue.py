"""training_runs as a queue: queued runs, who asked, which worker ran it, what it started from

Revision ID: 0005
Revises: 0004

Retraining moved out of the serving workers: `POST /v1/retrain` and the nightly schedule enqueue
a row with status "queued" and no `started_at`, and a `prism worker` claims it (compare-and-set
queued -> running). `request_key` is unique so that two schedulers firing the same nightly run
enqueue it once. `serving_index_version` is the index version active when the run started:
promotion activates the candidate only while that version is still active. Rows written before
this revision were requested when they started (by the CLI or a server thread).
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.alter_column("started_at", existing_type=sa.DateTime(timezone=True), nullable=True)
        batch_op.add_column(sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("requested_by", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("request_key", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("worker", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("serving_index_version", sa.String(length=200), nullable=True))
        batch_op.create_unique_constraint("uq_training_runs_request_key", ["request_key"])
        batch_op.create_index("ix_training_runs_status", ["status"], unique=False)
    runs = sa.table("training_runs", sa.column("started_at", sa.DateTime(timezone=True)),
                    sa.column("requested_at", sa.DateTime(timezone=True)))
    op.execute(runs.update().values(requested_at=runs.c.started_at))


def downgrade() -> None:
    # Queued runs never started: they have no started_at for the old NOT NULL column.
    runs = sa.table("training_runs", sa.column("status", sa.String))
    op.execute(runs.delete().where(runs.c.status == "queued"))
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_training_runs_status")
        batch_op.drop_constraint("uq_training_runs_request_key", type_="unique")
        batch_op.drop_column("serving_index_version")
        batch_op.drop_column("worker")
        batch_op.drop_column("request_key")
        batch_op.drop_column("requested_by")
        batch_op.drop_column("requested_at")
        batch_op.alter_column("started_at", existing_type=sa.DateTime(timezone=True), nullable=False)
