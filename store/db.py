"""The Store: the only place in Prism that speaks SQL."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, bindparam, case, create_engine, delete, event, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from store.models import (
    Canary, CatalogChange, Event, IndexVersion, ModelVersion, Product, ProductIdentifier, ProductImage, SearchLog,
    TrainingRun,
    utcnow,
)
from store.records import (
    AttributeCondition,
    CanaryRecord,
    CanarySearch,
    CatalogChangeRecord,
    CatalogWrite,
    EventInput,
    ImageState,
    IndexVersionRecord,
    LexicalConfig,
    LoggedEvent,
    ModelVersionRecord,
    ProductFacts,
    ProductFilter,
    ProductImageRecord,
    ProductInput,
    ProductRecord,
    ProductVectors,
    SearchContext,
    SourcePreference,
    TrainingRunRecord,
    attribute_keys,
    attribute_number,
    filter_key,
    LEXICAL_EVERY_WORD,
    identifier_key,
    text_field_values,
)

log = logging.getLogger(__name__)

# The product columns a metadata-only change may set: none of them is embedded.
METADATA_COLUMNS = ("category", "brand", "price", "currency", "stock", "attributes")

_MIGRATIONS = Path(__file__).parent / "migrations"
# SQLite caps bound parameters per statement (32766 on modern builds); stay well below.
_IN_CHUNK = 900
# Bind parameters one multi-row INSERT may carry: SQLite before 3.32 allowed 999 (PostgreSQL 65535).
_MAX_BIND_PARAMS = 999
# Any constant: the PostgreSQL advisory lock that makes journal sequence numbers commit in order.
_JOURNAL_LOCK = 0x505249534D
_MIGRATION_LOCK = 0x505249534E
# Activations take this transaction-scoped lock on PostgreSQL: two activations at once, each
# deactivating what its statement's snapshot saw active, could otherwise leave two active rows.
_ACTIVATION_LOCK = 0x505249534F
# SQLite databases that are no file (":memory:"): their cluster locks are this process's own.
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


class StoreError(RuntimeError):
    pass


class UnknownVersionError(StoreError):
    pass


class LockBusyError(StoreError):
    """`Store.cluster_lock(name, wait=False)` found the lock held; `holder` says by whom, if known."""

    def __init__(self, name: str, holder: str):
        self.name, self.holder = name, holder
        super().__init__(f"the {name} lock is held by {holder}")


class ConflictError(StoreError):
    """A compare-and-set write found the row changed since it was read; nothing was written."""


class ActiveVersionChangedError(ConflictError):
    """A compare-and-set activation found another index version active than the one expected."""

    def __init__(self, expected: str | None, active: str | None):
        self.expected, self.active = expected, active
        super().__init__(f"index version {active!r} is active, not {expected!r} as expected; nothing was activated")


class EventIdReusedError(ConflictError):
    """A batch reuses event_ids for events with other content; nothing of the batch was written.

    `conflicts` holds (index in the batch, event_id, what differs) per offending event."""

    def __init__(self, conflicts: list[tuple[int, str, str]]):
        self.conflicts = conflicts
        super().__init__(f"{len(conflicts)} event(s) reuse an event_id with other content")


class CanaryConflictError(ConflictError):
    """A canary cannot start (one is running already, or the candidate is what serves), or a
    compare-and-set on a canary found it no longer running; nothing was written."""


class UnknownSearchError(StoreError):
    """Events name query_ids the search log no longer holds (pruned while the batch was checked)."""

    def __init__(self, query_ids: set[str]):
        self.query_ids = query_ids
        super().__init__(f"unknown query_id(s): {', '.join(sorted(query_ids))}")


def _as_utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything Prism writes is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _adapter_bases(s: Session, exclude: set[str] = frozenset()) -> set[str]:
    """The model versions that recorded adapter versions (other than `exclude`) load on top of."""
    bases = set()
    for name, info in s.execute(select(ModelVersion.model_version, ModelVersion.info)):
        base = (info or {}).get("base_model") if isinstance(info, dict) else None
        if name not in exclude and isinstance(base, dict) and base.get("version"):
            bases.add(str(base["version"]))
    return bases


def _chunks(items: Sequence, size: int = _IN_CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _to_record(record_cls, row):
    """Copy an ORM row into its frozen record, field by field, datetimes as aware UTC."""
    values = {}
    for f in fields(record_cls):
        value = getattr(row, f.name)
        if isinstance(value, datetime):
            value = _as_utc(value)
        elif isinstance(value, dict):
            value = dict(value)
        values[f.name] = value
    return record_cls(**values)


def _apply_input(p: Product, it: ProductInput, now: datetime) -> None:
    """Copy a product's catalog fields onto its row; a changed image resets its image state."""
    if p.image_uri != it.image_uri:
        p.image_status, p.image_hash, p.image_error = "pending", None, None
    for column, value in _catalog_fields(it, now).items():
        setattr(p, column, value)
    p.deleted_at = None


def _catalog_fields(it: ProductInput, now: datetime) -> dict:
    """A product's catalog fields as column values (what `_apply_input` sets on an ORM row)."""
    return {
        "title": it.title, "description": it.description, "category": it.category, "brand": it.brand,
        "price": it.price, "currency": it.currency, "image_ref": it.image_ref, "image_uri": it.image_uri,
        "attributes": dict(it.attributes), "stock": it.stock, "updated_at": now,
    }


def _file_change(
    row_id: int, it: ProductInput, now: datetime, text_hash: Callable[[ProductInput], str] | None, *, text: bool, image: bool
) -> dict:
    """The journal row of a catalog-file change to embedded content: the hash of the text to embed
    when the text changed (`text_hash(it)`, computed only here), and what became of the image."""
    return {
        "row_id": row_id, "product_id": it.product_id, "op": "file", "ts": now,
        "text_hash": text_hash(it) if text and text_hash is not None else None,
        "image_action": ("set" if it.image_uri else "clear") if image else "keep",
    }


def _insert_many(s: Session, table, rows: list[dict]) -> None:
    """INSERT many rows with the same keys, in the caller's transaction, through the driver's
    executemany, each value converted by its column type's own bind processor.

    For a catalog load's millions of rows: SQLAlchemy's executemany builds and processes every
    parameter set in Python, which cost 7.7 s of a 200,000-product load's 17.4 s of SQL writes
    (cProfile). The SQL is still SQLAlchemy's, compiled for the dialect; no defaults run, so a
    row carries every column the table would default."""
    if not rows:
        return
    conn = s.connection()
    dialect = conn.dialect
    names = list(rows[0])
    compiled = table.insert().inline().compile(dialect=dialect, column_keys=names)
    wanted = sorted(bind.key for bind in compiled.binds.values())
    if wanted != sorted(names):  # a column default would need a value no row has
        raise ValueError(f"insert into {table.name}: rows must give {wanted}, not {sorted(names)}")
    order = list(compiled.positiontup) if dialect.positional else names
    processors = [(name, table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in order]
    if dialect.positional:
        params = [tuple(row[n] if p is None else p(row[n]) for n, p in processors) for row in rows]
    else:
        params = [{n: row[n] if p is None else p(row[n]) for n, p in processors} for row in rows]
    conn.exec_driver_sql(str(compiled), params)


def _replace_identifiers(s: Session, by_row: dict[int, list[str]]) -> None:
    """Rows' exact identifiers become these (`LexicalConfig.identifiers`), in the caller's transaction."""
    if not by_row:
        return
    table = ProductIdentifier.__table__
    rows = list(by_row)
    for chunk in _chunks(rows):
        s.execute(delete(table).where(table.c.row_id.in_(chunk)))
    _insert_many(s, table, [{"value": v, "row_id": row} for row, keys in by_row.items() for v in keys])


def _index_inserted_text(s: Session, row_ids: Sequence[int]) -> None:
    """Newly inserted products into SQLite's full-text table, in the caller's transaction.

    Every code path that inserts into `products` calls this (updates and deletes are kept by
    triggers). It is not a trigger because a per-row trigger makes FTS5 write one on-disk segment
    per product (migration 0010); one INSERT ... SELECT a chunk keeps its terms in memory until
    commit. PostgreSQL's full-text indexes are expression indexes and need nothing."""
    if s.get_bind().dialect.name != "sqlite" or not row_ids:
        return
    for chunk in _chunks(list(row_ids)):
        s.execute(text("INSERT INTO products_fts(rowid, search_text) SELECT row_id, search_text FROM products "
                       f"WHERE row_id IN ({','.join(str(int(r)) for r in chunk)}) "
                       "AND deleted_at IS NULL AND search_text IS NOT NULL"))


def _image_lists(s: Session, row_ids: Sequence[int]) -> dict[int, tuple[tuple[str | None, str | None], ...]]:
    """row_id -> its images after the first, as (image_ref, image_uri) in position order."""
    table = ProductImage.__table__
    out: dict[int, list] = {}
    for chunk in _chunks(list(row_ids)):
        rows = s.execute(select(table.c.row_id, table.c.image_ref, table.c.image_uri)
                         .where(table.c.row_id.in_(chunk)).order_by(table.c.row_id, table.c.position))
        for row, ref, uri in rows:
            out.setdefault(row, []).append((ref, uri))
    return {row: tuple(images) for row, images in out.items()}


def _replace_images(s: Session, by_row: dict[int, tuple[tuple[str, str], ...]]) -> None:
    """Rows' images after the first become these (new image ids, state pending), in the caller's
    transaction. Replaced wholesale: an index version holding the old ids then maps them to no
    product, instead of to whatever image took their position."""
    if not by_row:
        return
    table = ProductImage.__table__
    for chunk in _chunks(list(by_row)):
        s.execute(delete(table).where(table.c.row_id.in_(chunk)))
    values = [{"row_id": row, "position": position, "image_ref": ref, "image_uri": uri, "image_status": "pending"}
              for row, images in by_row.items() for position, (ref, uri) in enumerate(images, start=1)]
    if values:
        s.execute(table.insert(), values)


def _write_embedded_images(s: Session, row_id: int, images, vector_space: str) -> None:
    """An API upsert's images after the first, embedded already: they replace the product's, with
    their vectors (servers replay them from here)."""
    table = ProductImage.__table__
    s.execute(delete(table).where(table.c.row_id == row_id))
    if images:
        s.execute(table.insert(), [
            {"row_id": row_id, "position": position, "image_ref": ref, "image_uri": uri, "image_hash": digest,
             "image_status": "ok", "vector_space": vector_space, "vector": _to_blob(vector)}
            for position, (ref, uri, digest, vector) in enumerate(images, start=1)
        ])


def _image_record(r: ProductImage) -> ProductImageRecord:
    record = _to_record(ProductImageRecord, r)
    return replace(record, vector=_from_blob(r.vector))


def _serialise_journal(s: Session) -> None:
    # SQLite serialises writers already. On PostgreSQL, sequence values can commit out of order,
    # and a reader that saw seq 11 before seq 10 committed would skip 10 forever: hold a
    # transaction-scoped lock so journal entries commit in sequence order.
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _JOURNAL_LOCK})


def _serialise_activation(s: Session) -> None:
    # First statement of every activating transaction (see _ACTIVATION_LOCK). SQLite has one
    # writer at a time, and each activation's first write reads the rows it changes afresh.
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ACTIVATION_LOCK})


def lock_key(name: str) -> int:
    """The PostgreSQL advisory lock key of a named cluster lock: a stable signed 64-bit hash (the
    same on every host and Python version, unlike `hash()`)."""
    return int.from_bytes(hashlib.sha256(f"prism:{name}".encode()).digest()[:8], "big", signed=True)


def _holder_name(name: str) -> str:
    return f"prism {socket.gethostname()}:{os.getpid()} {name}"[:63]  # application_name's limit


def _to_blob(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _from_blob(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cursor = dbapi_conn.cursor()
            # WAL lets readers (the server) proceed while a writer (an indexing run) commits.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; Prism's `postgres` extra installs psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True)


@contextmanager
def _file_lock(path: Path, name: str, *, wait: bool) -> Iterator[None]:
    """An flock on `path`, with its holder ("pid N on HOST") written in the file for the busy message."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise LockBusyError(name, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _migrating_connection(engine: Engine):
    """A connection in a transaction, held by one migrating process at a time per database.

    `prism serve --workers N` migrates in every worker at once; one at a time, the others then
    find the schema current. PostgreSQL: a transaction-scoped advisory lock. SQLite: pysqlite opens
    its transaction only at the first write, so two workers would both read the old revision and
    the second one's version update would match no row; an flock on a file beside the database
    orders them instead (the kernel releases it if a holder dies)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    with ExitStack() as held:
        if database and database != ":memory:" and not database.startswith("file:"):
            import fcntl

            fcntl.flock(held.enter_context(open(f"{database}.migrate.lock", "a")), fcntl.LOCK_EX)
        connection = held.enter_context(engine.begin())
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        yield connection


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`, the newest migration by default (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    with _migrating_connection(engine) as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


class Store:
    """Catalog, versions and logs in SQL. Construct with `Store.open(url)`."""

    def __init__(self, engine: Engine, *, lexical: LexicalConfig | None = None):
        """`lexical`: which fields form a product's text and which attributes are exact identifiers
        (PRISM_TEXT_FIELDS, PRISM_ID_ATTRIBUTES); every product write indexes them so."""
        self.engine = engine
        self.lexical = lexical or LexicalConfig()
        # A config given by the caller (`prism index` with PRISM_TEXT_FIELDS) stays; otherwise the
        # store follows the config of the index version being served (`follow_lexical`).
        self._lexical_given = lexical is not None
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Reads of one statement on PostgreSQL run in autocommit: one statement sees one snapshot
        # either way, and psycopg's BEGIN and the ROLLBACK that ends a read transaction are two
        # round trips of the three a small read cost (`_one_statement_read`).
        self._one_statement_engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else engine
        )
        self._one_statement_reads = (
            sessionmaker(self._one_statement_engine, expire_on_commit=False)
            if engine.dialect.name == "postgresql" else self._sessions
        )
        # SQLite has one writer at a time, and a blocked writer sleeps in growing steps (up to
        # 100 ms) before retrying: 32 request threads logging searches at once made most of them
        # sleep, and throughput fell 4x. Threads of this process queue on a lock instead.
        self._hot_writes = threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()

    @classmethod
    def open(cls, url: str, *, apply_migrations: bool = True, lexical: LexicalConfig | None = None) -> "Store":
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = _make_engine(url)
        if apply_migrations:
            migrate(engine)
        store = cls(engine, lexical=lexical)
        if lexical is None and apply_migrations:  # without them the schema may not hold versions yet
            store.lexical = store.recorded_lexical()
        return store

    def recorded_lexical(self) -> LexicalConfig:
        """The lexical config the active index version was built with (the defaults before any)."""
        active = self.active_index_version()
        return LexicalConfig.from_dict(active.manifest.get("lexical") if active is not None else None)

    def follow_lexical(self, config: LexicalConfig) -> None:
        """Write products' texts and identifiers as `config` says from now on (a server swapping in
        a version built with other text fields), unless the caller gave this store its config.
        Products texts must be composed as the served index composed them: a PUT embedded with
        other fields would not match the index's own text vectors."""
        if not self._lexical_given and config != self.lexical:
            log.info("text fields %s, identifier attributes %s, as the served index version was built",
                     ",".join(config.text_fields), ",".join(config.id_attributes) or "none")
            self.lexical = config

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- cluster locks

    @contextmanager
    def cluster_lock(self, name: str, *, wait: bool, path: Path | str | None = None) -> Iterator[None]:
        """An exclusive lock called `name` over every process that uses this database, for the block.

        PostgreSQL (replicas on many hosts): a session advisory lock keyed by `lock_key(name)`,
        taken on a connection of its own that is held, idle, for the block. It ends with its
        session, so a holder that crashes never leaves it stale: at once when its process dies,
        within about a minute when its host does (the session's TCP keepalives are set short).
        SQLite (one host): an flock on `path` (default: beside the database file), which the
        kernel drops when its holder dies. Either way a second `cluster_lock` of the same name is
        excluded, in this process too. `wait=False`: `LockBusyError` at once while another holds it.
        """
        if self.engine.dialect.name == "postgresql":
            with self._advisory_lock(name, wait=wait):
                yield
            return
        database = self.engine.url.database
        if path is None and (not database or database == ":memory:" or database.startswith("file:")):
            with self._process_lock(name, wait=wait):
                yield
            return
        with _file_lock(Path(path) if path is not None else Path(f"{database}.{name}.lock"), name, wait=wait):
            yield

    @contextmanager
    def _advisory_lock(self, name: str, *, wait: bool) -> Iterator[None]:
        key = lock_key(name)
        # Autocommit: the lock is session-scoped, and an idle open transaction would hold back
        # vacuum for as long as the lock is held (a retrain run: tens of minutes).
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            # Keepalives every 10 s after 30 s idle, 3 misses: the server ends the session of a
            # host that vanished (and so frees its lock) in about a minute, not the OS's 2 hours.
            for setting, value in (("application_name", _holder_name(name)), ("tcp_keepalives_idle", "30"),
                                   ("tcp_keepalives_interval", "10"), ("tcp_keepalives_count", "3")):
                connection.execute(text("SELECT set_config(:setting, :value, false)"), {"setting": setting, "value": value})
            if wait:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
                busy = None
            elif connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}):
                busy = None
            else:
                busy = LockBusyError(name, self._advisory_holder(connection, key))
        except BaseException:
            connection.invalidate()  # its session, and anything it may have taken, ends with it
            connection.close()
            raise
        if busy is not None:
            connection.exec_driver_sql("RESET ALL")
            connection.close()  # it took nothing: back to the pool
            raise busy
        try:
            yield
        finally:
            try:
                released = connection.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.exec_driver_sql("RESET ALL")  # the pool's next user gets a plain session
            except Exception as exc:  # the session is gone, and the lock with it
                log.warning("the %s lock's connection failed before it was released: %s", name, exc)
                released = False
            if not released:
                connection.invalidate()  # never hand a session that may still hold it back to the pool
            connection.close()

    @staticmethod
    def _advisory_holder(connection, key: int) -> str:
        """Who holds an advisory lock: the holding session's application_name, address and pid."""
        row = connection.execute(
            text(
                "SELECT a.application_name, host(a.client_addr), a.pid FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.classid::bigint = :hi AND l.objid::bigint = :lo AND l.objsubid = 1 LIMIT 1"
            ),
            {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
        ).first()
        if row is None:
            return "another session (it may just have released it)"
        application, address, pid = row
        return f"{application or 'a session'} (database backend pid {pid}{f', from {address}' if address else ''})"

    @contextmanager
    def _process_lock(self, name: str, *, wait: bool) -> Iterator[None]:
        with _PROCESS_LOCKS_GUARD:
            lock = _PROCESS_LOCKS.setdefault(f"{self.engine.url}:{name}", threading.Lock())
        if not lock.acquire(blocking=wait):
            raise LockBusyError(name, "another thread of this process")
        try:
            yield
        finally:
            lock.release()

    def session(self) -> Session:
        return self._sessions()

    def _one_statement_read(self) -> Session:
        """A session for a read that issues exactly one statement and writes nothing: what a
        server runs per query (`serving_marks_and_canary`) and per journal replay."""
        return self._one_statement_reads()

    def _one_statement_connection(self):
        """`_one_statement_read` as a Core connection, for the reads every query makes (`_hot_read`)."""
        return self._one_statement_engine.connect()

    # ---------------------------------------------------------------- products

    def upsert_products(
        self,
        items: Sequence[ProductInput],
        *,
        text_hash: Callable[[ProductInput], str] | None = None,
        feed_time: datetime | None = None,
        prefer: SourcePreference = SourcePreference.NEWER,
    ) -> CatalogWrite:
        """Write catalog-file rows: insert new products, update changed ones, skip identical ones.

        A product edited over the API since the last file load (`changed_by == "api"`) is
        overwritten only if `prefer` allows it: NEWER compares `feed_time` (when the file was
        written; None = now) with the edit's time. Every row that changes enters the change
        journal in the same transaction ("file" when the embedded content changed, "meta" when
        only metadata did), so servers and older index versions replay it like an API change. A
        "file" entry names what to embed: `text_hash(item)` (the hash of the text it is embedded
        by, computed only for entries written) when the text changed, `image_action` set/clear/keep.

        A re-upserted product is un-deleted. When its image changes, its image state is reset so
        the next indexing run embeds it again. Core SQL in executemany batches, not ORM objects:
        a catalog load is millions of rows, and per-row ORM work made it the slowest stage.
        """
        now = utcnow()
        feed_time = _as_utc(feed_time) or now
        table = Product.__table__
        c = table.c
        out = CatalogWrite()
        same_image = c.image_uri.is_not_distinct_from(bindparam("b_new_uri"))
        update_stmt = (
            update(table)
            .where(c.row_id == bindparam("b_row"))
            .values(
                title=bindparam("title"), description=bindparam("description"), category=bindparam("category"),
                brand=bindparam("brand"), price=bindparam("price"), currency=bindparam("currency"),
                image_ref=bindparam("image_ref"), image_uri=bindparam("image_uri"),
                attributes=bindparam("attributes"), stock=bindparam("stock"), updated_at=bindparam("updated_at"),
                deleted_at=None, changed_by="file", search_text=bindparam("search_text"),
                # A changed image resets its state; an unchanged one keeps the state as it is at
                # the write, not as read above (another run may have recorded it meanwhile).
                image_status=case((same_image, c.image_status), else_="pending"),
                image_hash=case((same_image, c.image_hash), else_=None),
                image_error=case((same_image, c.image_error), else_=None),
            )
        )
        current_columns = (c.product_id, c.row_id, c.title, c.description, c.image_uri, c.image_ref, c.category,
                           c.brand, c.price, c.currency, c.attributes, c.deleted_at, c.updated_at, c.changed_by,
                           c.stock)
        with self.session() as s, s.begin():
            _serialise_journal(s)
            # Before the first index version nothing replays the journal (a first load of 10M
            # products would otherwise write 10M entries that no server ever reads).
            journaling = s.scalar(select(IndexVersion.index_version).limit(1)) is not None
            for chunk in _chunks(list({it.product_id: it for it in items}.values())):
                ids = [it.product_id for it in chunk]
                existing = {r.product_id: r for r in s.execute(select(*current_columns).where(c.product_id.in_(ids)))}
                stored_images = _image_lists(s, [r.row_id for r in existing.values()])
                image_lists: dict[int, tuple[tuple[str, str], ...]] = {}
                inserts, updates, journal, new_items = [], [], [], []
                identifiers: dict[str, list[str]] = {}
                for it in chunk:
                    fields_ = {**_catalog_fields(it, now), "search_text": self.lexical.document(it)}
                    row = existing.get(it.product_id)
                    if row is None:
                        inserts.append({**fields_, "product_id": it.product_id, "created_at": now,
                                        "image_status": "pending", "deleted_at": None, "changed_by": "file"})
                        new_items.append(it)
                        identifiers[it.product_id] = self.lexical.identifiers(it)
                        out.created += 1
                        continue
                    if not it.stock_listed:
                        it = replace(it, stock=row.stock)
                        fields_["stock"] = row.stock
                    restored = row.deleted_at is not None
                    text_changed = restored or (row.title, row.description) != (it.title, it.description) \
                        or text_field_values(row, self.lexical.text_fields) != text_field_values(it, self.lexical.text_fields)
                    had_images = stored_images.get(row.row_id, ())
                    # The other images are embedded content: a changed one re-embeds the product.
                    image_changed = restored or row.image_uri != it.image_uri \
                        or [uri for _, uri in had_images] != [uri for _, uri in it.extra_images]
                    content = text_changed or image_changed
                    metadata = (row.category, row.brand, row.price, row.currency, row.image_ref, dict(row.attributes or {}),
                                row.stock, had_images) \
                        != (it.category, it.brand, it.price, it.currency, it.image_ref, dict(it.attributes), it.stock,
                            tuple(it.extra_images))
                    if not (content or metadata):
                        out.unchanged += 1
                        out.row_ids[it.product_id] = row.row_id
                        continue
                    if row.changed_by == "api":
                        file_wins = prefer == SourcePreference.FILE or (
                            prefer == SourcePreference.NEWER and feed_time > _as_utc(row.updated_at))
                        if not file_wins:
                            out.api_edits_kept.append(it.product_id)
                            continue
                        out.api_edits_overwritten.append(it.product_id)
                    updates.append({**fields_, "b_new_uri": it.image_uri, "b_row": row.row_id})
                    if had_images != tuple(it.extra_images):
                        image_lists[row.row_id] = tuple(it.extra_images)
                    identifiers[it.product_id] = self.lexical.identifiers(it)
                    if journaling and content:
                        journal.append(_file_change(row.row_id, it, now, text_hash, text=text_changed, image=image_changed))
                    elif journaling:
                        journal.append({"row_id": row.row_id, "product_id": it.product_id, "op": "meta", "ts": now,
                                        "text_hash": None, "image_action": None})
                    out.row_ids[it.product_id] = row.row_id
                    if content:
                        out.content_changed += 1
                    else:
                        out.metadata_changed += 1
                if updates:
                    s.execute(update_stmt, updates)
                if inserts:
                    _insert_many(s, table, inserts)
                    created = dict(s.execute(select(c.product_id, c.row_id).where(
                        c.product_id.in_([r["product_id"] for r in inserts]))).tuples().all())
                    out.row_ids.update(created)
                    _index_inserted_text(s, list(created.values()))
                    image_lists.update((created[it.product_id], tuple(it.extra_images)) for it in new_items
                                       if it.extra_images)
                    if journaling:
                        journal += [_file_change(created[it.product_id], it, now, text_hash, text=True, image=True)
                                    for it in new_items]
                if journal:
                    s.execute(CatalogChange.__table__.insert(), journal)
                _replace_identifiers(s, {out.row_ids[pid]: keys for pid, keys in identifiers.items()})
                _replace_images(s, image_lists)
        return out

    def record_text_hashes(self, hashes: dict[int, str], *, seen: dict[int, str | None]) -> None:
        """row_id -> sha256 of the text the product was embedded by.

        Compare-and-set against `seen` (the text_hash the indexer read): a product changed
        through the API meanwhile keeps the hash its own change recorded.
        """
        if not hashes:
            return
        table = Product.__table__
        stmt = (
            update(table)
            .where(table.c.row_id == bindparam("b_row"), table.c.text_hash.is_not_distinct_from(bindparam("b_seen")))
            .values(text_hash=bindparam("b_hash"))
        )
        with self.session() as s, s.begin():
            s.execute(stmt, [{"b_row": row, "b_hash": h, "b_seen": seen.get(row)} for row, h in hashes.items()])

    def record_image_states(self, states: Sequence[ImageState], *, seen: dict[int, tuple[str | None, str | None]]) -> None:
        """What embedding found out about products' images.

        Compare-and-set against `seen` (row -> the image_uri and image_hash the indexer read), so
        an image changed meanwhile (API PUT, catalog load) is not overwritten with a stale state.
        """
        self._write_image_states(Product.__table__, Product.__table__.c.row_id, states, seen)

    def get_product(self, product_id: str, *, include_deleted: bool = False) -> ProductRecord | None:
        with self.session() as s:
            p = s.scalar(select(Product).where(Product.product_id == product_id))
            if p is None or (p.deleted_at is not None and not include_deleted):
                return None
            return _to_record(ProductRecord, p)

    def products_by_row_ids(self, row_ids: Iterable[int]) -> dict[int, ProductRecord]:
        ids = [int(r) for r in row_ids]
        out: dict[int, ProductRecord] = {}
        with self.session() as s:
            for chunk in _chunks(ids):
                for p in s.scalars(select(Product).where(Product.row_id.in_(chunk))):
                    out[p.row_id] = _to_record(ProductRecord, p)
        return out

    def products_by_ids(self, product_ids: Iterable[str]) -> dict[str, ProductRecord]:
        ids = list(product_ids)
        out: dict[str, ProductRecord] = {}
        with self.session() as s:
            for chunk in _chunks(ids):
                for p in s.scalars(select(Product).where(Product.product_id.in_(chunk))):
                    out[p.product_id] = _to_record(ProductRecord, p)
        return out

    def live_products(self) -> list[ProductRecord]:
        """Every product not deleted, in row-id order."""
        with self.session() as s:
            q = select(Product).where(Product.deleted_at.is_(None)).order_by(Product.row_id)
            return [_to_record(ProductRecord, p) for p in s.scalars(q)]

    def iter_live_products(self, chunk_size: int = 5_000) -> Iterator[list[ProductRecord]]:
        """Live products in row-id order, a chunk at a time (keyset pages: each is one indexed
        range scan, and no more than one chunk is held)."""
        after = -1
        while True:
            with self.session() as s:
                q = (select(Product).where(Product.deleted_at.is_(None), Product.row_id > after)
                     .order_by(Product.row_id).limit(chunk_size))
                chunk = [_to_record(ProductRecord, p) for p in s.scalars(q)]
            if not chunk:
                return
            yield chunk
            after = chunk[-1].row_id

    def iter_indexable(self, chunk_size: int = 100_000) -> Iterator[tuple[np.ndarray, list, list]]:
        """(row ids, image hashes, text hashes) of live products in row-id order, a chunk at a
        time: what an index build needs, without product rows."""
        c = Product.__table__.c
        after = -1
        while True:
            with self.session() as s:
                rows = s.execute(
                    select(c.row_id, c.image_hash, c.text_hash)
                    .where(c.deleted_at.is_(None), c.row_id > after).order_by(c.row_id).limit(chunk_size)
                ).all()
            if not rows:
                return
            row_ids, image_hashes, text_hashes = zip(*rows)
            yield np.asarray(row_ids, dtype=np.int64), list(image_hashes), list(text_hashes)
            after = int(row_ids[-1])

    # ---------------------------------------------------------------- a product's other images

    def iter_product_images(self, chunk_size: int = 5_000) -> Iterator[list[ProductImageRecord]]:
        """The images after the first of live products, in image-id order, a keyset page at a time."""
        i, p = ProductImage.__table__.c, Product.__table__.c
        after = -1
        while True:
            with self.session() as s:
                rows = s.execute(
                    select(ProductImage).join(Product, p.row_id == i.row_id)
                    .where(i.image_id > after, p.deleted_at.is_(None)).order_by(i.image_id).limit(chunk_size)
                ).scalars().all()
                chunk = [_image_record(r) for r in rows]
            if not chunk:
                return
            yield chunk
            after = chunk[-1].image_id

    def record_product_image_states(self, states: Sequence[ImageState], *,
                                    seen: dict[int, tuple[str | None, str | None]]) -> None:
        """What embedding found out about images after the first (`ImageState.row_id` holds the
        image id here). Compare-and-set against `seen` (image id -> the uri and hash the indexer
        read), as `record_image_states` does for the first image."""
        self._write_image_states(ProductImage.__table__, ProductImage.__table__.c.image_id, states, seen)

    def _write_image_states(self, table, key, states, seen: dict) -> None:
        """What embedding found out about images (`ImageState.row_id`: the value of `key`, a product's
        row id or an image id), compare-and-set against the uri and hash the indexer read (`seen`), so
        an image changed meanwhile (API PUT, catalog load) is not overwritten with a stale state."""
        if not states:
            return
        stmt = (
            update(table)
            .where(
                key == bindparam("b_key"),
                table.c.image_uri.is_not_distinct_from(bindparam("b_uri")),
                table.c.image_hash.is_not_distinct_from(bindparam("b_seen")),
            )
            .values(image_hash=bindparam("b_hash"), image_status=bindparam("b_status"), image_error=bindparam("b_error"))
        )
        rows = []
        for st in states:
            uri, old = seen.get(st.row_id, (None, None))
            rows.append({"b_key": st.row_id, "b_uri": uri, "b_seen": old, "b_hash": st.image_hash,
                         "b_status": st.image_status, "b_error": st.image_error})
        with self.session() as s, s.begin():
            s.execute(stmt, rows)

    def count_unembedded_further_images(self) -> int:
        """Images after the first of live products that no run has embedded yet (state pending): what
        a `--vectors` or `--ray` run, which embeds first images only, leaves out of its version."""
        i, p = ProductImage.__table__.c, Product.__table__.c
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(ProductImage.__table__)
                                .join(Product, p.row_id == i.row_id)
                                .where(p.deleted_at.is_(None), i.image_status == "pending")) or 0)

    def iter_image_indexable(self, chunk_size: int = 100_000) -> Iterator[tuple[np.ndarray, list[str]]]:
        """(image ids, image hashes) of the embedded images after the first of live products, in
        image-id order: what the build of an `image_extra` index needs."""
        i, p = ProductImage.__table__.c, Product.__table__.c
        after = -1
        while True:
            with self.session() as s:
                rows = s.execute(
                    select(i.image_id, i.image_hash).join(Product, p.row_id == i.row_id)
                    .where(i.image_id > after, p.deleted_at.is_(None), i.image_status == "ok",
                           i.image_hash.is_not(None))
                    .order_by(i.image_id).limit(chunk_size)
                ).all()
            if not rows:
                return
            ids, hashes = zip(*rows)
            yield np.asarray(ids, dtype=np.int64), list(hashes)
            after = int(ids[-1])

    def image_rows(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, the row id of each one's product), sorted by image id, of those of
        `image_ids` that still exist: the join from an `image_extra` index's FAISS ids to products.
        Ids of images replaced since (a new image list) are left out."""
        table = ProductImage.__table__
        found_ids: list[int] = []
        found_rows: list[int] = []
        with self.session() as s:
            for chunk in _chunks([int(x) for x in image_ids]):
                for image_id, row in s.execute(select(table.c.image_id, table.c.row_id)
                                               .where(table.c.image_id.in_(chunk))):
                    found_ids.append(int(image_id))
                    found_rows.append(int(row))
        ids = np.asarray(found_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        return ids[order], np.asarray(found_rows, dtype=np.int64)[order]

    def product_images(self, row_ids: Iterable[int]) -> dict[int, list[ProductImageRecord]]:
        """row_id -> its images after the first, in position order."""
        out: dict[int, list[ProductImageRecord]] = {}
        with self.session() as s:
            for chunk in _chunks([int(r) for r in row_ids]):
                q = select(ProductImage).where(ProductImage.row_id.in_(chunk)).order_by(ProductImage.row_id,
                                                                                     ProductImage.position)
                for r in s.scalars(q):
                    out.setdefault(r.row_id, []).append(_image_record(r))
        return out

    def images_by_ids(self, image_ids: Iterable[int]) -> dict[int, ProductImageRecord]:
        with self.session() as s:
            out = {}
            for chunk in _chunks([int(x) for x in image_ids]):
                for r in s.scalars(select(ProductImage).where(ProductImage.image_id.in_(chunk))):
                    out[r.image_id] = _image_record(r)
            return out

    def iter_image_failures(self, chunk_size: int = 5_000) -> Iterator[tuple[str, str, str | None]]:
        """(product_id, image_status, image_error) of every live product whose image could not be
        embedded, in row order, a keyset page at a time."""
        c = Product.__table__.c
        ok = ("ok", "none", "pending", "supplied")
        after = 0
        while True:
            with self.session() as s:
                rows = s.execute(
                    select(c.row_id, c.product_id, c.image_status, c.image_error)
                    .where(c.row_id > after, c.deleted_at.is_(None), c.image_status.not_in(ok))
                    .order_by(c.row_id).limit(chunk_size)
                ).all()
            if not rows:
                return
            yield from ((r.product_id, r.image_status, r.image_error) for r in rows)
            after = rows[-1].row_id

    def iter_live_ids(self, chunk_size: int = 10_000) -> Iterator[list[tuple[int, str, datetime]]]:
        """(row_id, product_id, updated_at) of live products in row-id order, a keyset page at a
        time: what a feed sync compares with the feed, without product rows."""
        c = Product.__table__.c
        after = -1
        while True:
            with self.session() as s:
                rows = s.execute(
                    select(c.row_id, c.product_id, c.updated_at, c.deleted_at)
                    .where(c.row_id > after).order_by(c.row_id).limit(chunk_size)
                ).all()
            if not rows:
                return
            # Liveness tested here, as in live_row_ids: the deleted_at index would lead the plan.
            yield [(int(r.row_id), r.product_id, _as_utc(r.updated_at)) for r in rows if r.deleted_at is None]
            after = int(rows[-1].row_id)

    def live_row_ids(self, product_ids: Sequence[str]) -> dict[str, int]:
        """product_id -> row_id of those that are live products."""
        c = Product.__table__.c
        out: dict[str, int] = {}
        with self.session() as s:
            for chunk in _chunks(list(product_ids)):
                # Liveness is tested here, not in SQL: with `deleted_at IS NULL` in the query,
                # SQLite's planner scanned the deleted_at index (every live row) per chunk.
                rows = s.execute(select(c.product_id, c.row_id, c.deleted_at).where(c.product_id.in_(chunk)))
                out.update((pid, row) for pid, row, deleted in rows if deleted is None)
        return out

    def record_supplied_vectors(self, rows: Sequence[tuple[int, str | None, str | None]]) -> None:
        """(row_id, image vector hash or None, text vector hash or None) for vectors a team made
        elsewhere (`prism index --vectors`): the hashes become the products' cache keys, and a
        supplied image vector stands for the product's image (status `supplied`)."""
        table = Product.__table__
        c = table.c
        image_rows = [{"b_row": r, "b_hash": i} for r, i, _ in rows if i is not None]
        text_rows = [{"b_row": r, "b_hash": t} for r, _, t in rows if t is not None]
        with self.session() as s, s.begin():
            if image_rows:
                s.execute(update(table).where(c.row_id == bindparam("b_row"))
                          .values(image_hash=bindparam("b_hash"), image_status="supplied", image_error=None), image_rows)
            if text_rows:
                s.execute(update(table).where(c.row_id == bindparam("b_row"))
                          .values(text_hash=bindparam("b_hash")), text_rows)

    def count_products(self, *, include_deleted: bool = False) -> int:
        with self.session() as s:
            q = select(func.count()).select_from(Product)
            if not include_deleted:
                q = q.where(Product.deleted_at.is_(None))
            return int(s.scalar(q) or 0)

    def upsert_product_live(
        self, item: ProductInput, vectors: ProductVectors, *, expect_updated_at: datetime | None
    ) -> tuple[ProductRecord, bool, int]:
        """Upsert one product with the vectors it was just embedded to, and journal the change.

        One transaction: the product row and its journal entry commit together, so a server
        replaying the journal never sees one without the other. `expect_updated_at` is the
        product's `updated_at` when the caller read it (None: it did not exist); if the row
        changed since, ConflictError is raised and nothing is written, because the caller's
        choices (keep the image or not) were made on stale data. Returns (product, created, seq).
        """
        try:
            return self._upsert_product_live(item, vectors, expect_updated_at)
        except IntegrityError:
            # Two first PUTs of one new product raced to the insert: the loser saw no row.
            raise ConflictError(f"product {item.product_id!r} was created concurrently") from None

    def _upsert_product_live(self, item, vectors, expect_updated_at) -> tuple[ProductRecord, bool, int]:
        now = utcnow()
        with self.session() as s, s.begin():
            _serialise_journal(s)
            p = s.scalar(select(Product).where(Product.product_id == item.product_id))
            found = None if p is None else _as_utc(p.updated_at)
            if found != expect_updated_at:
                raise ConflictError(f"product {item.product_id!r} changed concurrently")
            created = p is None or p.deleted_at is not None
            inserted = p is None
            if p is None:
                p = Product(product_id=item.product_id, created_at=now, image_status="pending")
                s.add(p)
            _apply_input(p, item, now)
            p.search_text = self.lexical.document(item)
            p.changed_by = "api"
            p.text_hash = vectors.text_hash
            if vectors.image_action == "set":
                p.image_hash, p.image_status, p.image_error = vectors.image_hash, "ok", None
            elif vectors.image_action == "clear":
                p.image_hash, p.image_status, p.image_error = None, vectors.image_status or "none", vectors.image_error
            s.flush()
            change = CatalogChange(
                row_id=p.row_id,
                product_id=p.product_id,
                op="upsert",
                model_version=vectors.model_version,
                text_hash=vectors.text_hash,
                text_vector=_to_blob(vectors.text_vector),
                image_action=vectors.image_action,
                image_hash=vectors.image_hash if vectors.image_action == "set" else None,
                image_vector=_to_blob(vectors.image_vector) if vectors.image_action == "set" else None,
                ts=now,
            )
            s.add(change)
            s.flush()
            if inserted:
                _index_inserted_text(s, [p.row_id])
            _replace_identifiers(s, {p.row_id: self.lexical.identifiers(item)})
            if vectors.extra_images is not None:
                _write_embedded_images(s, p.row_id, vectors.extra_images, vectors.model_version)
            return _to_record(ProductRecord, p), created, int(change.seq)

    def update_product_metadata(self, item: ProductInput, *, expect_updated_at: datetime) -> tuple[ProductRecord, int]:
        """Change a live product's metadata (category, brand, price, currency, stock, attributes) and
        journal it as a "meta" change, which carries no vectors: its title, description and image
        stay as they are, so do its vectors in every index and overlay.

        Compare-and-set on `updated_at` like `upsert_product_live`: the caller decided that only
        metadata changed from the row as it read it. Returns (product, seq).
        """
        now = utcnow()
        with self.session() as s, s.begin():
            _serialise_journal(s)
            p = s.scalar(select(Product).where(Product.product_id == item.product_id))
            if p is None or p.deleted_at is not None or _as_utc(p.updated_at) != expect_updated_at:
                raise ConflictError(f"product {item.product_id!r} changed concurrently")
            p.category, p.brand, p.price, p.currency = item.category, item.brand, item.price, item.currency
            p.attributes = dict(item.attributes)
            p.stock = item.stock
            return self._journal_metadata_change(s, p, now)

    def patch_product_metadata(self, product_id: str, fields: dict) -> tuple[ProductRecord, int] | None:
        """Set some metadata columns (category, brand, price, currency, stock, attributes) of a
        live product and journal a "meta" change, in one transaction: the read, the write and the
        journal entry see the same row (its lock held on PostgreSQL), so no compare-and-set retry
        is needed and a concurrent change is never overwritten by stale fields. `attributes`
        replaces the object but keeps Prism's own "_" keys. None: no live product by that id.
        The lexical text and identifiers follow (an identifier is an attribute); the caller sends
        changes to embedded text fields the embedding way instead."""
        unknown = set(fields) - set(METADATA_COLUMNS)
        if unknown:
            raise ValueError(f"not metadata columns: {', '.join(sorted(unknown))}")
        now = utcnow()
        if "attributes" not in fields and not set(fields) & set(self.lexical.text_fields):
            return self._patch_plain_columns(product_id, fields, now)
        with self.session() as s, s.begin():
            _serialise_journal(s)
            p = s.scalar(select(Product).where(Product.product_id == product_id).with_for_update())
            if p is None or p.deleted_at is not None:
                return None
            identifiers = self.lexical.identifiers(p)
            for column, value in fields.items():
                if column == "attributes":
                    value = {**{k: v for k, v in (p.attributes or {}).items() if k.startswith("_")}, **(value or {})}
                setattr(p, column, value)
            return self._journal_metadata_change(s, p, now, identifiers_before=identifiers)

    def _patch_plain_columns(self, product_id: str, fields: dict, now: datetime) -> tuple[ProductRecord, int] | None:
        """`patch_product_metadata` of columns that neither the lexical text nor the identifiers
        are made of (price, currency, stock; category and brand unless they are text fields): no
        read first, since nothing written depends on the row's other fields. The UPDATE takes the
        row's lock and returns the row as written, in the same journal-serialised transaction as
        the "meta" entry; on PostgreSQL one statement does both (a data-modifying CTE), so a price
        change is three round trips (lock, write, commit) instead of seven."""
        table, journal = Product.__table__, CatalogChange.__table__
        written = (
            update(table)
            .where(table.c.product_id == product_id, table.c.deleted_at.is_(None))
            .values(**fields, updated_at=now, changed_by="api")
            .returning(*table.c)
        )
        with self.session() as s, s.begin():
            _serialise_journal(s)
            if s.get_bind().dialect.name == "postgresql":
                row_cte = written.cte("written")
                entry = (
                    journal.insert()
                    .from_select(["row_id", "product_id", "op", "ts"],
                                 select(row_cte.c.row_id, row_cte.c.product_id,
                                        bindparam("op", "meta", type_=journal.c.op.type),
                                        bindparam("ts", now, type_=journal.c.ts.type)))
                    .returning(journal.c.seq, journal.c.row_id)
                    .cte("journaled")
                )
                row = s.execute(
                    select(row_cte, entry.c.seq).join_from(row_cte, entry, entry.c.row_id == row_cte.c.row_id)
                ).one_or_none()
                if row is None:
                    return None
                seq = row.seq
            else:
                row = s.execute(written).one_or_none()
                if row is None:
                    return None
                seq = s.execute(journal.insert().values(row_id=row.row_id, product_id=row.product_id, op="meta", ts=now)
                                .returning(journal.c.seq)).scalar_one()
            return _to_record(ProductRecord, row), int(seq)

    def _journal_metadata_change(self, s: Session, p: Product, now: datetime,
                                 identifiers_before: list[str] | None = None) -> tuple[ProductRecord, int]:
        """The end of a metadata write: the lexical text and identifiers follow the row (a text
        field or an identifier may be an attribute), and a "meta" change carrying no vectors is
        journaled. Identifiers the row had before (`identifiers_before`, as read in this
        transaction) and still has are not rewritten. Returns (product, seq)."""
        p.search_text = self.lexical.document(p)
        p.updated_at = now
        p.changed_by = "api"
        change = CatalogChange(row_id=p.row_id, product_id=p.product_id, op="meta", ts=now)
        s.add(change)
        s.flush()
        identifiers = self.lexical.identifiers(p)
        if identifiers != identifiers_before:
            _replace_identifiers(s, {p.row_id: identifiers})
        return _to_record(ProductRecord, p), int(change.seq)

    def soft_delete_product(self, product_id: str) -> ProductRecord | None:
        """Mark a product deleted and journal it; None when there is no live product by that id."""
        with self.session() as s, s.begin():
            _serialise_journal(s)
            p = s.scalar(select(Product).where(Product.product_id == product_id, Product.deleted_at.is_(None)))
            if p is None:
                return None
            p.deleted_at = utcnow()
            p.updated_at = p.deleted_at
            p.changed_by = "api"
            s.add(CatalogChange(row_id=p.row_id, product_id=p.product_id, op="delete", ts=p.deleted_at))
            s.flush()
            return _to_record(ProductRecord, p)

    def soft_delete_products(self, product_ids: Sequence[str]) -> int:
        """Delete many live products, each journaled like `soft_delete_product`, a chunk per
        transaction (a feed dropping thousands of products); returns how many were deleted."""
        c = Product.__table__.c
        journal = CatalogChange.__table__
        deleted = 0
        for chunk in _chunks(list(dict.fromkeys(product_ids))):
            now = utcnow()
            with self.session() as s, s.begin():
                _serialise_journal(s)
                # Liveness tested here: with `deleted_at IS NULL` in SQL, SQLite's planner walked the
                # deleted_at index (every live product) per chunk: 100k deletes took 5 minutes at 10M.
                rows = s.execute(select(c.row_id, c.product_id, c.deleted_at).where(c.product_id.in_(chunk))).all()
                live = [r for r in rows if r.deleted_at is None]
                if not live:
                    continue
                s.execute(update(Product.__table__).where(c.row_id.in_([r.row_id for r in live]))
                          .values(deleted_at=now, updated_at=now))
                s.execute(journal.insert(), [{"row_id": r.row_id, "product_id": r.product_id, "op": "delete", "ts": now}
                                             for r in live])
                deleted += len(live)
        return deleted

    # ---------------------------------------------------------------- change journal

    def catalog_seq(self) -> int:
        """The newest journal sequence number (0 before any change)."""
        with self.session() as s:
            return int(s.scalar(select(func.max(CatalogChange.seq))) or 0)

    def catalog_changes(self, after: int, *, ops: Sequence[str] | None = None) -> list[CatalogChangeRecord]:
        """Journal entries with seq > `after` (of the kinds in `ops`, or all), oldest first."""
        with self._one_statement_read() as s:
            q = select(CatalogChange).where(CatalogChange.seq > after)
            if ops is not None:
                q = q.where(CatalogChange.op.in_(list(ops)))
            rows = s.scalars(q.order_by(CatalogChange.seq))
            return [
                CatalogChangeRecord(
                    seq=int(c.seq),
                    row_id=int(c.row_id),
                    product_id=c.product_id,
                    op=c.op,
                    model_version=c.model_version,
                    text_hash=c.text_hash,
                    text_vector=_from_blob(c.text_vector),
                    image_action=c.image_action,
                    image_hash=c.image_hash,
                    image_vector=_from_blob(c.image_vector),
                    ts=_as_utc(c.ts),
                )
                for c in rows
            ]

    def serving_marks(self) -> tuple[str | None, int]:
        """(active index version, newest journal seq) in one round trip: what a server polls per query."""
        active = select(IndexVersion.index_version).where(IndexVersion.is_active.is_(True)).scalar_subquery()
        newest = select(func.max(CatalogChange.seq)).scalar_subquery()
        with self._one_statement_read() as s:
            version, seq = s.execute(select(active, newest)).one()
            return version, int(seq or 0)

    def filter_row_ids(self, flt: ProductFilter) -> np.ndarray:
        """Row ids of live products matching the filter, as sorted int64: the reference that the
        servers' in-memory `FilterIndex` is tested against. Categories and brands compare by
        `filter_key` in Python, since SQL's lower() folds only ASCII on SQLite."""
        q = select(Product.row_id, Product.category, Product.brand, Product.stock, Product.attributes).where(
            Product.deleted_at.is_(None))
        if flt.price_min is not None:
            q = q.where(Product.price >= flt.price_min)
        if flt.price_max is not None:
            q = q.where(Product.price <= flt.price_max)
        categories = {filter_key(v) for v in flt.categories}
        brands = {filter_key(v) for v in flt.brands}
        with self.session() as s:
            rows = s.execute(q.order_by(Product.row_id)).all()
        ids = [r.row_id for r in rows
               if (not categories or (r.category is not None and filter_key(r.category) in categories))
               and (not brands or (r.brand is not None and filter_key(r.brand) in brands))
               and _stock_matches(r.stock, flt.in_stock)
               and all(_attribute_matches(r.attributes or {}, cond) for cond in flt.attributes)]
        return np.asarray(ids, dtype=np.int64)

    def iter_filter_facts(self, *, chunk: int = 50_000) -> Iterator[ProductFacts]:
        """The filter columns of every live product, in row-id order, `chunk` rows per query.

        Pages by row id (the primary key), so each query is an index range scan and no
        transaction stays open across chunks; a change committed meanwhile is in the journal.
        """
        last = 0
        while True:
            q = (
                select(Product.row_id, Product.category, Product.brand, Product.price, Product.stock, Product.attributes)
                .where(Product.deleted_at.is_(None), Product.row_id > last)
                .order_by(Product.row_id)
                .limit(chunk)
            )
            with self.session() as s:
                rows = s.execute(q).all()
            if not rows:
                return
            yield _facts(rows, live=True)
            last = int(rows[-1].row_id)
            if len(rows) < chunk:
                return

    def filter_facts(self, row_ids: Iterable[int]) -> ProductFacts:
        """The filter columns of these rows as they are now, deleted and unknown rows not live."""
        ids = sorted({int(r) for r in row_ids})
        found = []
        parts = list(_chunks(ids))
        # Several chunks read in one transaction, so that they see one snapshot.
        with self._one_statement_read() if len(parts) <= 1 else self.session() as s:
            for part in parts:
                found += s.execute(
                    select(Product.row_id, Product.category, Product.brand, Product.price, Product.stock,
                           Product.attributes, Product.deleted_at)
                    .where(Product.row_id.in_(part))
                ).all()
        by_row = {int(r.row_id): r for r in found}
        facts = _facts([by_row[r] for r in ids if r in by_row], live=None)
        missing = [r for r in ids if r not in by_row]
        if not missing:
            return facts
        return ProductFacts(
            rows=np.concatenate([facts.rows, np.asarray(missing, dtype=np.int64)]),
            categories=facts.categories + [None] * len(missing),
            brands=facts.brands + [None] * len(missing),
            prices=np.concatenate([facts.prices, np.full(len(missing), np.nan)]),
            live=np.concatenate([facts.live, np.zeros(len(missing), dtype=bool)]),
            stocks=np.concatenate([facts.stocks, np.full(len(missing), np.nan)]),
            attributes=facts.attributes + [{}] * len(missing),
        )

    def facets(self, *, limit: int = 200) -> dict:
        """Live products' categories and brands (most common first) and price range."""
        live = Product.deleted_at.is_(None)
        out: dict = {}
        with self.session() as s:
            for name, column in (("categories", Product.category), ("brands", Product.brand)):
                # Spellings that differ in case are one value (filters match them alike), shown as
                # the oldest product writes it.
                key = func.lower(func.trim(column))
                rows = s.execute(
                    select(func.min(Product.row_id), func.count())
                    .where(live, column.is_not(None))
                    .group_by(key)
                    .order_by(func.count().desc(), key)
                    .limit(limit)
                ).all()
                spelled = dict(s.execute(select(Product.row_id, column).where(
                    Product.row_id.in_([r[0] for r in rows]))).tuples().all()) if rows else {}
                out[name] = [(spelled[first], int(count)) for first, count in rows]
            low, high, count = s.execute(select(func.min(Product.price), func.max(Product.price), func.count()).where(live)).one()
        out.update(price_min=low, price_max=high, products=int(count))
        return out

    # ---------------------------------------------------------------- lexical index

    def identifier_rows(self, query: str, *, limit: int = 10) -> list[int]:
        """Live products one of whose exact identifiers (product_id, configured identifier
        attributes) equals `query` as `identifier_key` folds it, by row id."""
        key = identifier_key(query)
        if key is None:
            return []
        # Every text query asks this: a statement built once, on a Core connection (see _HOT_READS).
        with self._one_statement_connection() as c:
            return [int(r) for r in c.scalars(_hot_read("identifier_rows"), {"key": key, "limit": limit})]

    def lexical_search(self, query: str, *, limit: int = 50) -> list[tuple[int, float]]:
        """Live products whose indexed text matches `query`, best first: (row id, score).

        Served by the database's full-text search (docs/design.md, "Lexical leg"): products
        containing every word of the query rank first, then those that share enough of its
        trigrams (a word with a typo still matches). Any text is a valid query: it is never
        passed to the database as query syntax."""
        words = _query_words(query)
        if not words or limit < 1:
            return []
        with self.session() as s:
            if s.get_bind().dialect.name == "postgresql":
                return _lexical_postgresql(s, " ".join(words), limit)
            return _lexical_sqlite(s, words, limit)

    def refresh_lexical(self, *, chunk_size: int = 5_000) -> int:
        """Rewrite every product's indexed text and identifiers with this store's `lexical`
        configuration (after PRISM_TEXT_FIELDS or PRISM_ID_ATTRIBUTES changed); returns how many
        products' text changed. Keyset pages, one transaction each."""
        c = Product.__table__.c
        stmt = update(Product.__table__).where(c.row_id == bindparam("b_row")).values(search_text=bindparam("b_text"))
        after, changed = -1, 0
        while True:
            with self.session() as s, s.begin():
                rows = s.execute(
                    select(c.row_id, c.product_id, c.title, c.description, c.category, c.brand, c.attributes, c.search_text)
                    .where(c.row_id > after).order_by(c.row_id).limit(chunk_size)
                ).all()
                if not rows:
                    return changed
                texts = [{"b_row": r.row_id, "b_text": self.lexical.document(r)} for r in rows]
                texts = [t for t, r in zip(texts, rows) if t["b_text"] != r.search_text]
                if texts:
                    s.execute(stmt, texts)
                    changed += len(texts)
                _replace_identifiers(s, {r.row_id: self.lexical.identifiers(r) for r in rows})
            after = rows[-1].row_id

    # ---------------------------------------------------------------- versions

    def register_model_version(
        self, model_version: str, *, spec: str, dim: int, parent: str | None = None, info: dict | None = None
    ) -> ModelVersionRecord:
        with self.session() as s, s.begin():
            m = s.get(ModelVersion, model_version)
            if m is None:
                m = ModelVersion(model_version=model_version, spec=spec, dim=dim, parent=parent, info=info or {})
                s.add(m)
            elif m.dim != dim:
                raise StoreError(f"model version {model_version!r} is registered with dim {m.dim}, not {dim}")
            s.flush()
            return _to_record(ModelVersionRecord, m)

    def get_model_version(self, model_version: str) -> ModelVersionRecord | None:
        with self.session() as s:
            m = s.get(ModelVersion, model_version)
            return None if m is None else _to_record(ModelVersionRecord, m)

    def list_model_versions(self) -> list[ModelVersionRecord]:
        with self.session() as s:
            return [_to_record(ModelVersionRecord, m) for m in s.scalars(select(ModelVersion).order_by(ModelVersion.created_at))]

    def record_index_version(
        self, index_version: str, *, model_version: str, path: str, manifest: dict, activate: bool
    ) -> IndexVersionRecord:
        """Record a built (already renamed into place) index version; optionally activate it, atomically."""
        with self.session() as s, s.begin():
            if activate:
                _serialise_activation(s)
            v = IndexVersion(
                index_version=index_version, model_version=model_version, path=path, manifest=manifest
            )
            s.add(v)
            s.flush()
            if activate:
                self._activate(s, v)
            return _to_record(IndexVersionRecord, v)

    def activate_index_version(self, index_version: str, *, expected_active: str | None = None) -> IndexVersionRecord:
        """Activate `index_version` (deactivating the active one) in one transaction.

        With `expected_active`, a compare-and-set: only while `expected_active` is still the
        active version (the one a retrain run started from); otherwise `ActiveVersionChangedError`
        names the version active now and nothing changes, so an activation made meanwhile (an
        operator's rollback) stands."""
        with self.session() as s, s.begin():
            _serialise_activation(s)
            if expected_active is not None:
                # A write first: on SQLite it begins the transaction, so no other writer can
                # activate between this check and the switch.
                taken = s.execute(
                    update(IndexVersion)
                    .where(IndexVersion.index_version == expected_active, IndexVersion.is_active.is_(True))
                    .values(is_active=False)
                ).rowcount
                if not taken:
                    active = s.scalar(select(IndexVersion.index_version).where(IndexVersion.is_active.is_(True)))
                    raise ActiveVersionChangedError(expected_active, active)
            v = s.get(IndexVersion, index_version)
            if v is None:
                raise UnknownVersionError(f"no index version {index_version!r}")
            self._activate(s, v)
            return _to_record(IndexVersionRecord, v)

    @staticmethod
    def _activate(s: Session, v: IndexVersion) -> None:
        s.execute(
            update(IndexVersion)
            .where(IndexVersion.is_active.is_(True), IndexVersion.index_version != v.index_version)
            .values(is_active=False)
        )
        v.is_active = True
        v.activated_at = utcnow()

    def active_index_version(self) -> IndexVersionRecord | None:
        with self.session() as s:
            v = s.scalar(select(IndexVersion).where(IndexVersion.is_active.is_(True)))
            return None if v is None else _to_record(IndexVersionRecord, v)

    def get_index_version(self, index_version: str) -> IndexVersionRecord | None:
        with self.session() as s:
            v = s.get(IndexVersion, index_version)
            return None if v is None else _to_record(IndexVersionRecord, v)

    def list_index_versions(self) -> list[IndexVersionRecord]:
        with self.session() as s:
            return [_to_record(IndexVersionRecord, v) for v in s.scalars(select(IndexVersion).order_by(IndexVersion.created_at))]

    def retention_candidates(self, keep: int) -> list[IndexVersionRecord]:
        """Index versions beyond the newest `keep` by creation, the active one excepted: what
        `prune_index_versions` may drop."""
        if keep < 1:
            raise ValueError("keep at least the newest index version")
        with self.session() as s:
            newest_first = s.scalars(
                select(IndexVersion).order_by(IndexVersion.created_at.desc(), IndexVersion.index_version.desc())
            ).all()
            canary = _running_canary_versions(s)
            return [_to_record(IndexVersionRecord, v) for v in newest_first[keep:]
                    if not v.is_active and v.index_version not in canary]

    def prune_index_versions(self, index_versions: Iterable[str], *, keep_after: int | None = None) -> tuple[list[str], int]:
        """Forget these index versions, then the journal entries every remaining version holds.

        A version activated meanwhile is kept. Journal entries with seq <= the lowest
        `catalog_seq` among the versions still recorded (and <= `keep_after`: the position an
        unfinished build started from) are deleted: no version that can still be served, rolled
        back to or published replays them. One transaction. Returns (versions dropped, journal
        entries deleted)."""
        names = list(dict.fromkeys(index_versions))
        with self.session() as s, s.begin():
            # The two versions a running canary compares are in use, whatever their age (nightly
            # builds of later candidates would otherwise push its candidate out).
            canary = _running_canary_versions(s)
            for part in _chunks([name for name in names if name not in canary]):
                s.execute(
                    delete(IndexVersion).where(IndexVersion.index_version.in_(part), IndexVersion.is_active.is_(False))
                )
            remaining = s.execute(select(IndexVersion.index_version, IndexVersion.manifest)).all()
            left = {name for name, _ in remaining}
            dropped = [name for name in names if name not in left]
            if not remaining:
                return dropped, 0
            # A version without catalog_seq (made before the journal) replays it all.
            through = min(int((manifest or {}).get("catalog_seq") or 0) for _, manifest in remaining)
            if keep_after is not None:
                through = min(through, keep_after)
            pruned = s.execute(delete(CatalogChange).where(CatalogChange.seq <= through)).rowcount or 0
            return dropped, int(pruned)

    def model_retention_candidates(self, keep: int) -> list[str]:
        """Model versions beyond the newest `keep` by creation that no index version uses: what
        `prune_model_versions` may drop (a candidate that lost its gate, a model replaced since)."""
        if keep < 1:
            raise ValueError("keep at least the newest model version")
        with self.session() as s:
            newest_first = s.scalars(
                select(ModelVersion.model_version).order_by(ModelVersion.created_at.desc(), ModelVersion.model_version.desc())
            ).all()
            used = set(s.scalars(select(IndexVersion.model_version).distinct()))
            candidates = [name for name in newest_first[keep:] if name not in used]
            bases = _adapter_bases(s, exclude=set(candidates))
            return [name for name in candidates if name not in bases]

    def prune_model_versions(self, model_versions: Iterable[str]) -> list[str]:
        """Forget these model versions, except one an index version uses or a running training run
        names (as its serving model or its candidate): checked in the same statement, so a version
        that an index or a run took up since it was chosen is kept. Returns the versions dropped."""
        names = list(dict.fromkeys(model_versions))
        with self.session() as s, s.begin():
            running = TrainingRun.status == "running"
            by_index = select(IndexVersion.model_version)
            by_run_serving = select(TrainingRun.serving_model_version).where(
                running, TrainingRun.serving_model_version.is_not(None))
            by_run_candidate = select(TrainingRun.candidate_model_version).where(
                running, TrainingRun.candidate_model_version.is_not(None))
            version = ModelVersion.model_version
            # An adapter version loads on top of its base: a base that any recorded version points
            # at stays. First the versions no one points at; then those whose only referrers
            # went in the first pass (an adapter version's base is always a full version: no chains).
            for _ in range(2):
                referenced = _adapter_bases(s)
                for part in _chunks([n for n in names if n not in referenced]):
                    s.execute(
                        delete(ModelVersion)
                        .where(version.in_(part), version.not_in(by_index), version.not_in(by_run_serving),
                               version.not_in(by_run_candidate))
                        .execution_options(synchronize_session=False)
                    )
            left = set(s.scalars(select(ModelVersion.model_version).where(ModelVersion.model_version.in_(names)))) if names else set()
            return [name for name in names if name not in left]

    # ---------------------------------------------------------------- search log

    def log_search(self, **row) -> None:
        with self._hot_writes, self.session() as s, s.begin():
            s.add(SearchLog(**row))

    def log_searches(self, rows: Sequence[dict]) -> None:
        """Write a group of search_log rows (as `log_search` takes them, each with its own `ts`)
        in one transaction: multi-row INSERTs, as many rows each as the driver's bind-parameter
        limit allows. One commit per group is what makes logging off the request path cheap on
        SQLite, where every commit is a file sync under the single-writer lock."""
        if not rows:
            return
        table = SearchLog.__table__
        names = [c.name for c in table.columns]
        # Every row names every column: a multi-row VALUES takes one column list for all rows.
        full = [{name: row.get(name) for name in names} for row in rows]
        for row in full:
            row["filters"] = row["filters"] if row["filters"] is not None else {}
            row["result_ids"] = row["result_ids"] if row["result_ids"] is not None else []
            row["offset"] = row["offset"] or 0
            row["took_ms"] = row["took_ms"] or 0.0
            row["ts"] = row["ts"] or utcnow()
        per_statement = max(1, _MAX_BIND_PARAMS // len(names))
        with self._hot_writes, self.session() as s, s.begin():
            for chunk in _chunks(full, per_statement):
                s.execute(table.insert().values(list(chunk)))

    def get_search(self, query_id: str) -> dict | None:
        with self.session() as s:
            r = s.get(SearchLog, query_id)
            if r is None:
                return None
            return {c.name: getattr(r, c.name) for c in SearchLog.__table__.columns}

    def searches_by_ids(self, query_ids: Iterable[str]) -> dict[str, SearchContext]:
        wanted = list(dict.fromkeys(query_ids))
        out: dict[str, SearchContext] = {}
        with self.session() as s:
            for chunk in _chunks(wanted):
                for r in s.scalars(select(SearchLog).where(SearchLog.query_id.in_(chunk))):
                    out[r.query_id] = _search_context(r)
        return out

    def prune_search_log(self, before: datetime, *, batch: int = 1_000) -> tuple[int, int]:
        """Delete the searches logged before `before` and the events that refer to them, `batch`
        searches to a transaction (oldest first); returns (searches, events) deleted.

        An event goes with its search: it references the search, and mining selects events by
        their search's time. Short transactions, because servers keep logging searches and
        storing events meanwhile (and SQLite has one writer at a time).
        """
        if batch < 1:
            raise ValueError("prune at least one search per transaction")
        before = _as_utc(before).astimezone(timezone.utc)
        searches = events = 0
        while True:
            with self._hot_writes, self.session() as s, s.begin():
                # FOR UPDATE (PostgreSQL; SQLite has one writer anyway): an event for one of these
                # searches waits for this transaction, then fails its foreign key instead of
                # landing between the two deletes.
                ids = list(s.scalars(
                    select(SearchLog.query_id).where(SearchLog.ts < before)
                    .order_by(SearchLog.ts, SearchLog.query_id).limit(batch).with_for_update()
                ))
                for chunk in _chunks(ids):
                    events += s.execute(delete(Event).where(Event.query_id.in_(chunk))).rowcount or 0
                    searches += s.execute(delete(SearchLog).where(SearchLog.query_id.in_(chunk))).rowcount or 0
            if len(ids) < batch:
                return searches, events

    # ---------------------------------------------------------------- events

    def add_events(self, events: Sequence[EventInput]) -> tuple[int, int]:
        """Store a batch in one transaction; an event_id already stored is skipped, not doubled.

        An event whose event_id is stored (or earlier in the batch) with the same content (type,
        query_id, product_id, position, ts as an instant) is a retry and counts as a duplicate; with
        other content it is a conflict: `EventIdReusedError`, and nothing of the batch is written,
        so the client can fix it and send the batch again. Returns (stored, duplicates). When this
        returns, the batch is committed.
        """
        # SQLite keeps a datetime's wall clock and drops its offset: store the instant, in UTC.
        batch = [replace(e, ts=_as_utc(e.ts).astimezone(timezone.utc)) for e in events]
        for attempt in range(3):
            try:
                with self._hot_writes, self.session() as s, s.begin():
                    known = {event_id: (content, None) for event_id, content in
                             self._stored_events(s, [e.event_id for e in batch]).items()}
                    new, conflicts = [], []
                    for index, e in enumerate(batch):
                        content = _event_content(e)
                        if e.event_id not in known:
                            known[e.event_id] = (content, index)
                            new.append(e)
                        elif known[e.event_id][0] != content:
                            conflicts.append((index, e.event_id, _event_difference(*known[e.event_id], content)))
                    if conflicts:
                        raise EventIdReusedError(conflicts)
                    if attempt:
                        # The insert failed: a concurrent retry stored some ids (seen above now),
                        # or a search was pruned after the batch was checked against the log.
                        wanted = list({e.query_id for e in new})
                        present: set[str] = set()
                        for chunk in _chunks(wanted):
                            present.update(s.scalars(select(SearchLog.query_id).where(SearchLog.query_id.in_(chunk))))
                        if set(wanted) - present:
                            raise UnknownSearchError(set(wanted) - present)
                    now = utcnow()
                    for e in new:
                        s.add(Event(event_id=e.event_id, type=e.type, query_id=e.query_id, product_id=e.product_id,
                                    position=e.position, ts=e.ts, received_at=now))
                return len(new), len(batch) - len(new)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _stored_events(s: Session, event_ids: Sequence[str]) -> dict[str, tuple]:
        """The content of the stored events among these ids, as `_event_content` makes it."""
        found: dict[str, tuple] = {}
        for chunk in _chunks(list(dict.fromkeys(event_ids))):
            for e in s.scalars(select(Event).where(Event.event_id.in_(chunk))):
                found[e.event_id] = _event_content(e)
        return found

    def stored_event_ids(self, event_ids: Iterable[str]) -> set[str]:
        """Which of these event_ids are stored: how a client (or an audit) checks what was kept."""
        with self.session() as s:
            return self._stored_event_ids(s, list(dict.fromkeys(event_ids)))

    @staticmethod
    def _stored_event_ids(s: Session, event_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(event_ids):
            found.update(s.scalars(select(Event.event_id).where(Event.event_id.in_(chunk))))
        return found

    def count_events(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(Event.type, func.count()).group_by(Event.type)).all()
        return {t: int(n) for t, n in rows}

    def events_between(self, start: datetime | None, end: datetime | None) -> list[LoggedEvent]:
        """Events whose *search* happened in [start, end), joined to it, in time order."""
        with self.session() as s:
            q = select(Event, SearchLog).join(SearchLog, Event.query_id == SearchLog.query_id)
            if start is not None:
                q = q.where(SearchLog.ts >= start)
            if end is not None:
                q = q.where(SearchLog.ts < end)
            q = q.order_by(SearchLog.ts, Event.ts, Event.id)
            return [
                LoggedEvent(e.event_id, e.type, e.query_id, e.product_id, e.position, _as_utc(e.ts), _search_context(r))
                for e, r in s.execute(q).tuples()
            ]

    # ---------------------------------------------------------------- training runs

    def start_training_run(
        self, *, serving_model_version: str | None, data_window: dict, serving_index_version: str | None = None,
        requested_by: str | None = None, worker: str | None = None,
    ) -> TrainingRunRecord:
        """A run that starts now, not through the queue (`prism retrain`)."""
        with self.session() as s, s.begin():
            now = utcnow()
            run = TrainingRun(status="running", started_at=now, requested_at=now, serving_model_version=serving_model_version,
                              data_window=data_window, metrics={}, serving_index_version=serving_index_version,
                              requested_by=requested_by, worker=worker)
            s.add(run)
            s.flush()
            return _to_record(TrainingRunRecord, run)

    def enqueue_training_run(self, *, requested_by: str, request_key: str | None = None) -> tuple[TrainingRunRecord, bool]:
        """Queue a retrain run for a `prism worker`; returns (the run, whether this call queued it).

        A run already queued answers this request too: it has not read the events yet, so it will
        train on everything a second one would. With `request_key` (a nightly run's time), a run
        queued under that key before, by another scheduler, is returned, and a queued run taking
        this request over gets the key. Under the queue's cluster lock: requests on every host agree.
        """
        with self.cluster_lock("retrain-queue", wait=True):
            for attempt in range(2):
                try:
                    with self.session() as s, s.begin():
                        if request_key is not None:
                            known = s.scalar(select(TrainingRun).where(TrainingRun.request_key == request_key))
                            if known is not None:
                                return _to_record(TrainingRunRecord, known), False
                        queued = s.scalar(
                            select(TrainingRun).where(TrainingRun.status == "queued").order_by(TrainingRun.id).limit(1)
                        )
                        if queued is not None:
                            if request_key is not None and queued.request_key is None:
                                queued.request_key = request_key
                            return _to_record(TrainingRunRecord, queued), False
                        run = TrainingRun(status="queued", started_at=None, requested_at=utcnow(),
                                          requested_by=requested_by, request_key=request_key, data_window={}, metrics={})
                        s.add(run)
                        s.flush()
                        return _to_record(TrainingRunRecord, run), True
                except IntegrityError:
                    # request_key is unique: a scheduler outside this lock (an older release) won.
                    if attempt:
                        raise
        raise AssertionError("unreachable")

    def claim_training_run(self, *, worker: str) -> TrainingRunRecord | None:
        """Take the oldest queued run for `worker` (None when none is queued).

        A compare-and-set, queued -> running: of two workers that read the same run, one update
        matches it and the other matches nothing and tries the next queued run."""
        while True:
            with self.session() as s, s.begin():
                run_id = s.scalar(
                    select(TrainingRun.id).where(TrainingRun.status == "queued").order_by(TrainingRun.id).limit(1)
                )
                if run_id is None:
                    return None
                claimed = s.execute(
                    update(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.status == "queued")
                    .values(status="running", started_at=utcnow(), worker=worker)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if claimed:
                    return _to_record(TrainingRunRecord, s.get(TrainingRun, run_id))

    def record_training_run_start(
        self, run_id: int, *, serving_model_version: str, serving_index_version: str, data_window: dict
    ) -> TrainingRunRecord:
        """What a claimed run starts from: the serving versions and the window of events it reads."""
        with self.session() as s, s.begin():
            run = s.get(TrainingRun, run_id)
            if run is None:
                raise StoreError(f"no training run {run_id}")
            run.serving_model_version, run.serving_index_version = serving_model_version, serving_index_version
            run.data_window = data_window
            return _to_record(TrainingRunRecord, run)

    def count_training_runs(self, status: str) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(TrainingRun).where(TrainingRun.status == status)) or 0)

    def get_training_run(self, run_id: int) -> TrainingRunRecord | None:
        with self.session() as s:
            run = s.get(TrainingRun, run_id)
            return None if run is None else _to_record(TrainingRunRecord, run)

    def finish_training_run(
        self, run_id: int, *, status: str, decision: str | None, metrics: dict,
        candidate_model_version: str | None = None, data_window: dict | None = None,
    ) -> TrainingRunRecord:
        with self.session() as s, s.begin():
            run = s.get(TrainingRun, run_id)
            if run is None:
                raise StoreError(f"no training run {run_id}")
            run.status, run.decision, run.metrics = status, decision, metrics
            run.candidate_model_version = candidate_model_version
            if data_window is not None:
                run.data_window = data_window
            run.finished_at = utcnow()
            return _to_record(TrainingRunRecord, run)

    def list_training_runs(self, limit: int = 50) -> list[TrainingRunRecord]:
        with self.session() as s:
            q = select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)
            return [_to_record(TrainingRunRecord, r) for r in s.scalars(q)]

    def abandon_running_training_runs(self, reason: str) -> int:
        """Runs still marked running when no run can be (the job lock is free): they died half-way."""
        with self.session() as s, s.begin():
            return s.execute(
                update(TrainingRun).where(TrainingRun.status == "running")
                .values(status="failed", decision="none", finished_at=utcnow(), metrics={"error": reason})
            ).rowcount or 0

    # ---------------------------------------------------------------- canaries

    def start_canary(self, *, candidate_index_version: str, fraction: float, policy: dict, started_by: str,
                     training_run_id: int | None = None, run_metrics: dict | None = None,
                     expected_serving: str | None = None) -> CanaryRecord:
        """Start a canary of `candidate_index_version` against the active index version.

        One transaction, serialised with activations: the serving side it records is the version
        active at its commit. Without `training_run_id` a `training_runs` row logs the start (decision
        "canary"). Raises `UnknownVersionError`, or `CanaryConflictError` when a canary is running
        (the unique running slot settles a race on any database) or the candidate is what serves;
        with `expected_serving`, `ActiveVersionChangedError` when another index version is active.
        """
        try:
            with self.session() as s, s.begin():
                _serialise_activation(s)
                candidate = s.get(IndexVersion, candidate_index_version)
                if candidate is None:
                    raise UnknownVersionError(f"no index version {candidate_index_version!r}")
                active = s.scalar(select(IndexVersion).where(IndexVersion.is_active.is_(True)))
                if expected_serving is not None and (active is None or active.index_version != expected_serving):
                    raise ActiveVersionChangedError(expected_serving, active.index_version if active else None)
                if active is None:
                    raise CanaryConflictError("no index version is serving: nothing to compare a candidate with")
                if active.index_version == candidate.index_version or active.model_version == candidate.model_version:
                    raise CanaryConflictError(
                        f"{candidate.index_version} (model {candidate.model_version}) is what serves now: a canary "
                        "compares another model version with the serving one")
                running = s.scalar(select(Canary).where(Canary.running_slot == 1))
                if running is not None:
                    raise CanaryConflictError(
                        f"canary {running.id} ({running.candidate_index_version}) is running: stop it first "
                        "(`prism models canary --stop`)")
                now = utcnow()
                canary = Canary(status="running", running_slot=1, candidate_model_version=candidate.model_version,
                                candidate_index_version=candidate.index_version,
                                serving_model_version=active.model_version, serving_index_version=active.index_version,
                                fraction=fraction, policy=policy, started_by=started_by, training_run_id=training_run_id,
                                started_at=now, result={})
                s.add(canary)
                s.flush()
                if training_run_id is None:
                    run = TrainingRun(status="succeeded", decision="canary", started_at=now, finished_at=now,
                                      requested_at=now, requested_by=started_by,
                                      serving_model_version=active.model_version,
                                      serving_index_version=active.index_version,
                                      candidate_model_version=candidate.model_version, data_window={},
                                      metrics={"canary": {"id": canary.id, "event": "started", "fraction": fraction,
                                                          "candidate_index_version": candidate.index_version,
                                                          **(run_metrics or {})}})
                    s.add(run)
                    s.flush()
                    canary.training_run_id = run.id
                return _to_record(CanaryRecord, canary)
        except IntegrityError:
            raise CanaryConflictError("another canary started at the same moment: stop it first") from None


    def running_canary(self) -> CanaryRecord | None:
        with self.session() as s:
            c = s.scalar(select(Canary).where(Canary.running_slot == 1))
            return None if c is None else _to_record(CanaryRecord, c)


    def get_canary(self, canary_id: int) -> CanaryRecord | None:
        with self.session() as s:
            c = s.get(Canary, canary_id)
            return None if c is None else _to_record(CanaryRecord, c)


    def list_canaries(self, limit: int = 20) -> list[CanaryRecord]:
        with self.session() as s:
            return [_to_record(CanaryRecord, c) for c in s.scalars(select(Canary).order_by(Canary.id.desc()).limit(limit))]


    def finish_canary(self, canary_id: int, *, status: str, finished_by: str, reason: str, result: dict,
                      promote: bool = False) -> CanaryRecord:
        """End a running canary (compare-and-set: only while it runs) and log it in `training_runs`.

        With `promote`, its candidate is activated in the same transaction, compare-and-set against
        the version it started from: `ActiveVersionChangedError` when another was activated meanwhile
        (then nothing is written). `CanaryConflictError` when it is no longer running (another worker
        ended it first)."""
        with self.session() as s, s.begin():
            _serialise_activation(s)
            now = utcnow()
            ended = s.execute(
                update(Canary).where(Canary.id == canary_id, Canary.status == "running")
                .values(status=status, running_slot=None, finished_at=now, finished_by=finished_by, reason=reason,
                        result=result)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not ended:
                c = s.get(Canary, canary_id)
                raise CanaryConflictError(f"no canary {canary_id}" if c is None else f"canary {canary_id} is {c.status} already")
            c = s.get(Canary, canary_id)
            s.refresh(c)
            if promote:
                taken = s.execute(
                    update(IndexVersion)
                    .where(IndexVersion.index_version == c.serving_index_version, IndexVersion.is_active.is_(True))
                    .values(is_active=False)
                ).rowcount
                if not taken:
                    active = s.scalar(select(IndexVersion.index_version).where(IndexVersion.is_active.is_(True)))
                    raise ActiveVersionChangedError(c.serving_index_version, active)
                candidate = s.get(IndexVersion, c.candidate_index_version)
                if candidate is None:  # the transaction rolls back: the serving version stays active
                    raise UnknownVersionError(f"canary {canary_id}'s candidate {c.candidate_index_version!r} is gone")
                self._activate(s, candidate)
            decision = {"promoted": "promoted", "stopped": "canary-stopped", "superseded": "superseded"}[status]
            s.add(TrainingRun(status="succeeded", decision=decision, started_at=c.started_at, finished_at=now,
                              requested_at=now, requested_by=finished_by, serving_model_version=c.serving_model_version,
                              serving_index_version=c.serving_index_version,
                              candidate_model_version=c.candidate_model_version, data_window={},
                              metrics={"canary": {"id": c.id, "event": status, "reason": reason,
                                                  "candidate_index_version": c.candidate_index_version,
                                                  "started_by_run": c.training_run_id, **result}}))
            return _to_record(CanaryRecord, c)


    def canary_searches(self, canary_id: int) -> list[CanarySearch]:
        """The interleaved searches of a canary, each with the positions its impressions and clicks name."""
        with self.session() as s:
            searches = {qid: (offset, list(arms or [])) for qid, offset, arms in s.execute(
                select(SearchLog.query_id, SearchLog.offset, SearchLog.arms).where(SearchLog.canary_id == canary_id))}
            seen: dict[str, dict[str, set[int]]] = {}
            rows = s.execute(
                select(Event.query_id, Event.type, Event.position)
                .join(SearchLog, Event.query_id == SearchLog.query_id).where(SearchLog.canary_id == canary_id))
            for qid, kind, position in rows:
                seen.setdefault(qid, {"impression": set(), "click": set()}).setdefault(kind, set()).add(int(position))
        return [CanarySearch(qid, int(offset or 0), arms, frozenset(seen.get(qid, {}).get("impression", ())),
                             frozenset(seen.get(qid, {}).get("click", ()))) for qid, (offset, arms) in searches.items()]


    def serving_marks_and_canary(self) -> tuple[str | None, int, tuple | None]:
        """`serving_marks` and the running canary (id, candidate index version, fraction, the serving
        index version it compares with) in the same round trip: what a server polls per query."""
        with self._one_statement_connection() as c:
            version, seq, *canary = c.execute(_hot_read("serving_marks_and_canary")).one()
        return version, int(seq or 0), (None if canary[0] is None else (int(canary[0]), canary[1], float(canary[2]), canary[3]))


def _serving_marks_statement():
    active = select(IndexVersion.index_version).where(IndexVersion.is_active.is_(True)).scalar_subquery()
    newest = select(func.max(CatalogChange.seq)).scalar_subquery()
    running = [select(column).where(Canary.running_slot == 1).scalar_subquery()
               for column in (Canary.id, Canary.candidate_index_version, Canary.fraction, Canary.serving_index_version)]
    return select(active, newest, *running)


def _identifier_rows_statement():
    i, p = ProductIdentifier.__table__.c, Product.__table__.c
    return (select(i.row_id).join(Product.__table__, p.row_id == i.row_id)
            .where(i.value == bindparam("key"), p.deleted_at.is_(None)).order_by(i.row_id).limit(bindparam("limit")))


# The reads every query makes (the serving marks, exact identifiers), each built once and run on a
# Core connection: building a statement and computing its cache key took longer than SQLite
# took to run it, and an ORM session adds its own setup (0.35 ms -> 0.05 ms per read, measured).
_HOT_READS = {"serving_marks_and_canary": _serving_marks_statement, "identifier_rows": _identifier_rows_statement}
_hot_statements: dict = {}


def _hot_read(name: str):
    statement = _hot_statements.get(name)
    if statement is None:
        statement = _hot_statements[name] = _HOT_READS[name]()
    return statement


def _stock_matches(stock: int | None, in_stock: bool | None) -> bool:
    if in_stock is None:
        return True
    if in_stock:
        return stock is None or stock > 0  # unknown stock is never filtered out
    return stock is not None and stock <= 0


def _attribute_matches(attributes: dict, cond: AttributeCondition) -> bool:
    value = attributes.get(cond.name) if not cond.name.startswith("_") else None
    if cond.numeric:
        number = attribute_number(value)
        return number is not None and (cond.low is None or number >= cond.low) and (cond.high is None or number <= cond.high)
    return any(key in cond.values for key in attribute_keys(value))


def product_facts(records: Sequence[ProductRecord]) -> ProductFacts:
    """The filter facts of product records a caller holds already (a write's returned row): what
    `Store.filter_facts` would read back for them."""
    return _facts(records, live=None)


def _facts(rows, *, live: bool | None) -> ProductFacts:
    """ProductFacts of result rows; `live` None: from each row's `deleted_at`."""
    return ProductFacts(
        rows=np.asarray([r.row_id for r in rows], dtype=np.int64),
        categories=[r.category for r in rows],
        brands=[r.brand for r in rows],
        prices=np.asarray([np.nan if r.price is None else r.price for r in rows], dtype=np.float64),
        live=np.full(len(rows), live, dtype=bool) if live is not None
        else np.asarray([r.deleted_at is None for r in rows], dtype=bool),
        stocks=np.asarray([np.nan if r.stock is None else r.stock for r in rows], dtype=np.float64),
        attributes=[r.attributes if isinstance(r.attributes, dict) else {} for r in rows],
    )


# What a client sent of an event: a resend with the same event_id must match it to be a retry.
_EVENT_CONTENT = ("type", "query_id", "product_id", "position", "ts")


def _event_content(e) -> tuple:
    return (e.type, e.query_id, e.product_id, e.position, _as_utc(e.ts).astimezone(timezone.utc))


def _event_difference(known: tuple, source: int | None, sent: tuple) -> str:
    """Which fields of a reused event_id differ, for the client to see what it got wrong."""
    other, mine = ("stored", "sent") if source is None else (f"in [{source}]", "here")
    changed = "; ".join(f"{name}: {_shown(old)} {other}, {_shown(new)} {mine}"
                        for name, old, new in zip(_EVENT_CONTENT, known, sent) if old != new)
    by = "a stored event" if source is None else f"event [{source}] of this batch"
    return f"event_id already used by {by} with other content ({changed})"


def _shown(value) -> str:
    return value.isoformat() if isinstance(value, datetime) else repr(value)


def _search_context(r: SearchLog) -> SearchContext:
    return SearchContext(
        query_id=r.query_id, query_text=r.query_text, image_hash=r.image_hash, query_product_id=r.query_product_id,
        target=r.target, offset=r.offset, result_ids=list(r.result_ids or []), model_version=r.model_version,
        ts=_as_utc(r.ts),
    )


# ---------------------------------------------------------------- lexical queries

_WORD = re.compile(r"\w+")
MAX_QUERY_WORDS = 32
MAX_FUZZY_TRIGRAMS = 48


def _query_words(query: str) -> list[str]:
    """The query's words (Unicode letters and digits; everything else, FTS syntax included, is a
    separator), case-folded, the first MAX_QUERY_WORDS of at most 64 characters each."""
    return [w.casefold()[:64] for w in _WORD.findall(query or "")[:MAX_QUERY_WORDS]]


def _names(doc: str | None, words: list[str]) -> float:
    """2 when the query is the first field of the indexed text (a product's name), word for word;
    1 when it is that but for one edit in one word of four or more letters (a name typed with a
    typo; in a shorter word one edit makes another word); else 0. The first field ends where
    ". " follows its last word (titles such as "Flag: St. Helena" hold ". " themselves)."""
    if not doc or not words:
        return 0.0
    found = []
    for m in _WORD.finditer(doc):
        if len(found) == len(words):
            break
        found.append((m.group().casefold()[:64], m.end()))
    if len(found) < len(words):
        return 0.0
    rest = doc[found[-1][1]:]
    cut = rest.find(". ")
    if _WORD.search(rest if cut < 0 else rest[:cut]):
        return 0.0  # more words follow in the first field
    differ = [(a, b) for (a, _), b in zip(found, words) if a != b]
    if not differ:
        return 2.0
    a, b = differ[0]
    return 1.0 if len(differ) == 1 and min(len(a), len(b)) >= 4 and _one_edit(a, b) else 0.0


def _one_edit(a: str, b: str) -> bool:
    """Whether b is a with one substitution, insertion, deletion or swap of neighbours."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                   and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = next((i for i in range(len(short)) if short[i] != long_[i]), len(short))
    return short[i:] == long_[i + 1 :]


def _fraction(x: float) -> float:
    """A positive score squashed into [0, 1): orders products within a tier, never across tiers."""
    return x / (1.0 + x) if x > 0 else 0.0


def _like_escape(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _running_canary_versions(s: Session) -> set[str]:
    row = s.execute(select(Canary.candidate_index_version, Canary.serving_index_version)
                    .where(Canary.running_slot == 1)).first()
    return set(row) if row is not None else set()


def _lexical_sqlite(s: Session, words: list[str], limit: int) -> list[tuple[int, float]]:
    """FTS5 with the trigram tokenizer. First the products holding every word: words of three or
    more characters match as substrings through the index (ranked by bm25), shorter ones (two-
    character CJK words, sizes, model numbers) by LIKE on the rows found (or on the FTS table when
    no word is longer). Then, to fill `limit`, the products sharing the most trigrams of the query
    (windows across word boundaries included, so short words count too): a typo costs a word
    at most three of its trigrams, not the match."""
    found: dict[int, float] = {}
    long_words = [w for w in words if len(w) >= 3]
    short = [w for w in words if len(w) < 3]
    likes = " AND ".join(f"search_text LIKE :w{i} ESCAPE '\\'" for i in range(len(short)))
    params = {f"w{i}": f"%{_like_escape(w)}%" for i, w in enumerate(short)}
    if long_words:
        # Each word a quoted string: FTS5 reads it as a phrase of its trigrams, never as syntax.
        match = " AND ".join(f'"{w}"' for w in long_words)
        rows = s.execute(text("SELECT rowid, bm25(products_fts) AS r, search_text FROM products_fts "
                              f"WHERE products_fts MATCH :m {'AND ' + likes if likes else ''} ORDER BY r, rowid LIMIT :n"),
                         {"m": match, "n": limit, **params}).all()
    else:
        rows = s.execute(text(f"SELECT rowid, 0.0, search_text FROM products_fts WHERE {likes} ORDER BY rowid LIMIT :n"),
                         {**params, "n": limit}).all()
    for row, rank, doc in rows:
        # bm25 is negative, better more so: a fraction of a point between products holding every word.
        found[int(row)] = LEXICAL_EVERY_WORD + _names(doc, words) + _fraction(-float(rank))
    phrase = " ".join(words)
    trigrams = list(dict.fromkeys(phrase[i : i + 3] for i in range(len(phrase) - 2)))[:MAX_FUZZY_TRIGRAMS]
    if len(found) < limit and trigrams:
        match = " OR ".join(f'"{t}"' for t in trigrams)
        rows = s.execute(text("SELECT rowid, bm25(products_fts) AS r, search_text FROM products_fts "
                              "WHERE products_fts MATCH :m ORDER BY r, rowid LIMIT :n"),
                         {"m": match, "n": limit + len(found)}).all()
        best = min((float(r) for _, r, _ in rows), default=0.0) or -1.0
        for row, rank, doc in rows:
            if len(found) >= limit:
                break
            share = min(float(rank) / best, 1.0) * 0.999  # of the best fuzzy score: below every-word matches
            name = _names(doc, words)
            found.setdefault(int(row), LEXICAL_EVERY_WORD + name + share if name else share)
    return sorted(found.items(), key=lambda item: (-item[1], item[0]))


_PG_LEXICAL = text("""
    SELECT row_id, search_text,
           (to_tsvector('simple', coalesce(search_text, '')) @@ plainto_tsquery('simple', :q)
            OR search_text ILIKE :pattern ESCAPE '\\') AS every_word,
           word_similarity(:q, search_text) + similarity(:q, search_text) AS closeness
      FROM products
     WHERE deleted_at IS NULL
       AND (to_tsvector('simple', coalesce(search_text, '')) @@ plainto_tsquery('simple', :q)
            OR :q <% search_text
            OR search_text ILIKE :pattern ESCAPE '\\')
     ORDER BY every_word DESC, closeness DESC, row_id
     LIMIT :n
""")


def _lexical_postgresql(s: Session, query: str, limit: int) -> list[tuple[int, float]]:
    """tsvector ('simple': whole words, no stemming) for every-word matches, pg_trgm word
    similarity for typos, ILIKE (trigram-indexed) for substrings such as CJK words, which the
    'simple' parser does not split from the text around them."""
    with s.begin():
        # One edit in a short word removes up to three of its trigrams: 0.6 (the default) misses many.
        s.execute(text("SET LOCAL pg_trgm.word_similarity_threshold = 0.45"))
        rows = s.execute(_PG_LEXICAL, {"q": query, "pattern": f"%{_like_escape(query)}%", "n": limit}).all()
    # Every word: LEXICAL_EVERY_WORD and up; closeness (two similarities, 0..2) only: below it.
    out = []
    for r in rows:
        closeness = float(r.closeness or 0.0) * 0.999 / 2
        name = _names(r.search_text, query.split())
        out.append((int(r.row_id), LEXICAL_EVERY_WORD + name + closeness if r.every_word or name else closeness))
    return sorted(out, key=lambda item: (-item[1], item[0]))
