"""index_versions.path relative to the home's indexes/ directory

Revision ID: 0003
Revises: 0002

Rows used to hold the absolute path of the version's directory, so a home that was moved, copied
or restored elsewhere went on loading (or failed to find) the files at the old location. A version
always lives in `<home>/indexes/<index_version>`, so the relative form is the version itself.
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    index_versions = sa.table("index_versions", sa.column("index_version", sa.String), sa.column("path", sa.Text))
    connection = op.get_bind()
    rows = connection.execute(sa.select(index_versions.c.index_version, index_versions.c.path)).all()
    for version, path in rows:
        # Only paths that end in the version's own directory name: anything else was put there by
        # hand, and the engine still reads absolute paths as they are.
        if path != version and path.replace("\\", "/").rstrip("/").endswith("/" + version):
            connection.execute(
                index_versions.update().where(index_versions.c.index_version == version).values(path=version)
            )


def downgrade() -> None:
    # The absolute form needs the home's location, which the database does not know; code before
    # 0003 cannot read relative rows, so refuse rather than leave a database it cannot serve.
    raise NotImplementedError("index_versions.path cannot be made absolute again without the home's location")
