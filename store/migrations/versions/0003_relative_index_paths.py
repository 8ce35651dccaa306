"""index_versions.path relative to the home's indexes/ directory

Revision ID: 0003
Revises: 0002

Rows used to hold the version's directory as `PRISM_HOME` spelled it: an absolute path, or one
relative to the writer's working directory (the default home is `prism-data`). A home that was
moved, copied or restored elsewhere, or a server started from another directory, then loaded the
files at the old location or none. A version always lives in `<home>/indexes/<index_version>`, so
the new form is the version itself, resolved against the reader's own home.
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
        # Only paths that end in `indexes/<version>`, as Prism wrote them: anything else was put
        # there by hand, and the engine still reads absolute paths as they are.
        if path != version and ("/" + path.replace("\\", "/").rstrip("/")).endswith("/indexes/" + version):
            connection.execute(
                index_versions.update().where(index_versions.c.index_version == version).values(path=version)
            )


def downgrade() -> None:
    # The absolute form needs the home's location, which the database does not know; code before
    # 0003 cannot read relative rows, so refuse rather than leave a database it cannot serve.
    raise NotImplementedError("index_versions.path cannot be made absolute again without the home's location")
