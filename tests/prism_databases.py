"""One database per PRISM_HOME for the tests: a SQLite file inside the home (the default), or a
fresh PostgreSQL database on the server that PRISM_TEST_DATABASE_URL points at (`--database
postgresql`). Tests ask this object for URLs and environments instead of writing sqlite:/// paths,
so the same suite runs against both."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


class TestDatabases:
    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, server_url: str | None) -> None:
        if server_url is not None:
            from sqlalchemy.engine import make_url

            parsed = make_url(server_url)
            if parsed.drivername == "postgresql":  # SQLAlchemy's default driver (psycopg2) is not installed
                parsed = parsed.set(drivername="postgresql+psycopg")
            server_url = parsed.render_as_string(hide_password=False)
        self.server_url = server_url
        self._created: set[str] = set()
        self._homes: dict[str, Path] = {}
        self._admin = None

    @property
    def postgres(self) -> bool:
        return self.server_url is not None

    def url(self, home: Path) -> str:
        """The SQLAlchemy URL of this home's database, created on first use."""
        home = Path(home).resolve()
        if not self.postgres:
            return f"sqlite:///{home / 'prism.db'}"
        name = self._name(home)
        if name not in self._created:
            self._execute(f'CREATE DATABASE "{name}"')
            self._created.add(name)
            self._homes[name] = home
        return self._url_of(name)

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """os.environ for a `prism` subprocess working on this home (offline, its own database)."""
        env = {**os.environ, "PRISM_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}
        env.pop("PRISM_DATABASE_URL", None)
        if self.postgres:
            env["PRISM_DATABASE_URL"] = self.url(home)
        return env

    def copy_home(self, source: Path, target: Path, ignore=None) -> None:
        """A private copy of a home: its files and its database (index paths are home-relative)."""
        shutil.copytree(source, target, ignore=ignore)
        if self.postgres:
            self._copy_database(source, target)

    def _copy_database(self, source: Path, target: Path) -> None:
        self.url(source)
        name, template = self._name(Path(target).resolve()), self._name(Path(source).resolve())
        # CREATE DATABASE ... TEMPLATE needs the template to have no sessions; pools of stores the
        # tests closed may still hold idle connections to it.
        self._execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()",
            name=template,
        )
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        self._created.add(name)
        self._homes[name] = Path(target).resolve()

    def drop_under(self, directory: Path) -> None:
        """Drop the databases of homes inside `directory` (a finished test's tmp_path): a suite
        run creates one per home, hundreds in all, too many to keep until the session ends."""
        directory = Path(directory).resolve()
        for name, home in list(self._homes.items()):
            if home == directory or directory in home.parents:
                self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                self._created.discard(name)
                del self._homes[name]

    def drop_all(self) -> None:
        for name in sorted(self._created):
            self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._created.clear()
        self._homes.clear()
        if self._admin is not None:
            self._admin.dispose()

    @staticmethod
    def _name(home: Path) -> str:
        return "prism_test_" + hashlib.sha1(str(home).encode()).hexdigest()[:16]

    def _url_of(self, name: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    def _execute(self, statement: str, **params) -> None:
        from sqlalchemy import create_engine, text

        if self._admin is None:
            self._admin = create_engine(self.server_url, isolation_level="AUTOCOMMIT", poolclass=_null_pool())
        with self._admin.connect() as connection:
            connection.execute(text(statement), params)


def _null_pool():
    from sqlalchemy.pool import NullPool

    return NullPool
