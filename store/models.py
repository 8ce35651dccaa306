"""SQLAlchemy models for the DESIGN tables. Table and column names are part of the contract."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an `INTEGER PRIMARY KEY`; everywhere else we want 64-bit ids.
RowId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"

    # Stable int64 row id: the FAISS id of this product in every index version.
    row_id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    product_id: Mapped[str] = mapped_column(String(256), unique=True, nullable=False)
    title: Mapped[str] = mapped_column(Text, nullable=False, default="")
    description: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(256))
    brand: Mapped[str | None] = mapped_column(String(256))
    price: Mapped[float | None] = mapped_column(Float)
    currency: Mapped[str | None] = mapped_column(String(8))
    # Units on hand; NULL = unknown (never filtered out by `in_stock`).
    stock: Mapped[int | None] = mapped_column(Integer)
    # As written in the catalog, and the resolved absolute path or URL it points to.
    image_ref: Mapped[str | None] = mapped_column(Text)
    image_uri: Mapped[str | None] = mapped_column(Text)
    # sha256 of the image bytes / of the embedded text: the join key into the embedding cache.
    image_hash: Mapped[str | None] = mapped_column(String(64))
    text_hash: Mapped[str | None] = mapped_column(String(64))
    # ok | none (no image given) | missing | broken | pending (not yet embedded)
    image_status: Mapped[str] = mapped_column(String(32), nullable=False, default="pending")
    image_error: Mapped[str | None] = mapped_column(Text)
    attributes: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Who wrote the row's current content: "file" (`prism index`) or "api" (PUT, PATCH, DELETE).
    # A file load overwrites an API edit only when it is newer (or `--prefer file`).
    changed_by: Mapped[str] = mapped_column(String(8), nullable=False, default="file", server_default="file")
    # The product's text as the lexical index holds it (the configured text fields, joined). The
    # database's full-text search indexes it: SQLite's FTS5 table `products_fts` (kept by
    # triggers), PostgreSQL's GIN indexes on its tsvector and its trigrams (migration 0006).
    search_text: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_products_category", "category"),
        Index("ix_products_brand", "brand"),
        Index("ix_products_price", "price"),
        Index("ix_products_deleted_at", "deleted_at"),
    )


class ProductIdentifier(Base):
    """Exact identifiers of a product, as `store.identifier_key` folds them: its product_id and the
    values of the configured identifier attributes (gtin, sku, ...). A query equal to one finds
    the product by this table's primary key, whatever the catalog's size."""

    __tablename__ = "product_identifiers"

    value: Mapped[str] = mapped_column(String(256), primary_key=True)
    row_id: Mapped[int] = mapped_column(RowId, ForeignKey("products.row_id"), primary_key=True)

    __table_args__ = (Index("ix_product_identifiers_row_id", "row_id"),)


class ProductImage(Base):
    """A product's images after the first (the `images` catalog column; position 1, 2, ...): the
    first stays on `products` (image_ref, image_uri, image_hash, image_status). Each embedded one
    is a vector of the index version's `image_extra` index, whose FAISS id is this `image_id`; a
    search joins it to its product through this table (`Store.image_rows`), never by position.

    A changed list replaces the product's rows: new image ids, never reused (AUTOINCREMENT on
    SQLite too), so an index version built before the change cannot map a stale vector to the
    new images."""

    __tablename__ = "product_images"

    image_id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    row_id: Mapped[int] = mapped_column(RowId, ForeignKey("products.row_id"), nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    image_ref: Mapped[str | None] = mapped_column(Text)
    image_uri: Mapped[str | None] = mapped_column(Text)
    image_hash: Mapped[str | None] = mapped_column(String(64))
    # ok | pending (not yet embedded) | missing | broken | ... (as products.image_status)
    image_status: Mapped[str] = mapped_column(String(32), nullable=False, default="pending", server_default="pending")
    image_error: Mapped[str | None] = mapped_column(Text)
    # The vector an API upload (PUT images_b64) was embedded to and its vector space, so servers
    # replay it without the model; NULL for catalog-file images (the build's vector cache has them).
    vector_space: Mapped[str | None] = mapped_column(String(200))
    vector: Mapped[bytes | None] = mapped_column(LargeBinary)

    __table_args__ = (
        UniqueConstraint("row_id", "position", name="uq_product_images_row_position"),
        Index("ix_product_images_row_id", "row_id"),
        {"sqlite_autoincrement": True},
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"

    model_version: Mapped[str] = mapped_column(String(200), primary_key=True)
    spec: Mapped[str] = mapped_column(Text, nullable=False)
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    parent: Mapped[str | None] = mapped_column(String(200))
    info: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class IndexVersion(Base):
    __tablename__ = "index_versions"

    index_version: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_version: Mapped[str] = mapped_column(
        String(200), ForeignKey("model_versions.model_version"), nullable=False
    )
    path: Mapped[str] = mapped_column(Text, nullable=False)
    manifest: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SearchLog(Base):
    __tablename__ = "search_log"

    query_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    query_text: Mapped[str | None] = mapped_column(Text)
    image_hash: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(16), nullable=False)
    filters: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    k: Mapped[int] = mapped_column(Integer, nullable=False)
    offset: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    model_version: Mapped[str] = mapped_column(String(200), nullable=False)
    index_version: Mapped[str] = mapped_column(String(200), nullable=False)
    # "More like this" queries: the product whose vector was the query.
    query_product_id: Mapped[str | None] = mapped_column(String(256))
    result_ids: Mapped[list] = mapped_column(JSON, nullable=False, default=list)
    took_ms: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    # An interleaved canary search: the canary, and per served position (offset + 1 on) the arm
    # that contributed the product ("serving" | "candidate"), so clicks are credited to it.
    canary_id: Mapped[int | None] = mapped_column(RowId)
    arms: Mapped[list | None] = mapped_column(JSON)

    __table_args__ = (Index("ix_search_log_ts", "ts"), Index("ix_search_log_canary_id", "canary_id"))


class CatalogChange(Base):
    """Journal of incremental catalog changes (API PUT/DELETE), in commit order.

    An index version records the highest `seq` it already contains; servers replay every later
    change on top of it. Upserts carry the vectors they were embedded to, so a replay needs no
    model when the serving model made them.
    """

    __tablename__ = "catalog_changes"

    seq: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    row_id: Mapped[int] = mapped_column(RowId, ForeignKey("products.row_id"), nullable=False)
    product_id: Mapped[str] = mapped_column(String(256), nullable=False)
    # upsert (API, with vectors) | file (a catalog file changed the embedded content: no vectors;
    # replays take them from the model's vector cache) | meta (metadata only) | delete
    op: Mapped[str] = mapped_column(String(16), nullable=False)
    model_version: Mapped[str | None] = mapped_column(String(200))
    text_hash: Mapped[str | None] = mapped_column(String(64))
    text_vector: Mapped[bytes | None] = mapped_column(LargeBinary)
    image_action: Mapped[str | None] = mapped_column(String(16))  # set | clear | keep
    image_hash: Mapped[str | None] = mapped_column(String(64))
    image_vector: Mapped[bytes | None] = mapped_column(LargeBinary)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)

    __table_args__ = (Index("ix_catalog_changes_row_id", "row_id"),)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    event_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    query_id: Mapped[str] = mapped_column(String(64), ForeignKey("search_log.query_id"), nullable=False)
    product_id: Mapped[str] = mapped_column(String(256), nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)

    __table_args__ = (Index("ix_events_query_id", "query_id"), Index("ix_events_ts", "ts"))


class TrainingRun(Base):
    """One retrain run: queued (by `POST /v1/retrain` or the nightly schedule), then claimed by a
    `prism worker` (compare-and-set queued -> running), then succeeded | skipped | failed."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    # None while queued: a run starts when a worker claims it.
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # queued | running | succeeded | skipped | failed
    status: Mapped[str] = mapped_column(String(32), nullable=False, default="running")
    serving_model_version: Mapped[str | None] = mapped_column(String(200))
    candidate_model_version: Mapped[str | None] = mapped_column(String(200))
    data_window: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    # promoted | rejected | superseded (another version was activated during the run) | none
    decision: Mapped[str | None] = mapped_column(String(32))
    requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=utcnow)
    requested_by: Mapped[str | None] = mapped_column(String(32))  # http | nightly | cli
    # Names what a run was enqueued for ("nightly:<UTC time>"): two schedulers firing the same
    # nightly run insert one row.
    request_key: Mapped[str | None] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(200))  # host:pid of the process that ran it
    # The index version active when the run started: promotion activates its candidate only while
    # this one is still active (an operator's rollback during the run is never undone).
    serving_index_version: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        Index("ix_training_runs_status", "status"),
        UniqueConstraint("request_key", name="uq_training_runs_request_key"),
    )


class Canary(Base):
    """An interleaved canary: a candidate index version that a fraction of searches interleave with
    the serving one (team draft), until it is promoted or stopped.

    At most one runs: `running_slot` is 1 while it runs and NULL after, under a unique constraint,
    so two starts racing on any database insert one row. Every state change is a compare-and-set
    on `status` = running."""

    __tablename__ = "canaries"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    # running | promoted | stopped | superseded (another version was activated meanwhile)
    status: Mapped[str] = mapped_column(String(32), nullable=False, default="running")
    running_slot: Mapped[int | None] = mapped_column(Integer)
    candidate_model_version: Mapped[str] = mapped_column(String(200), nullable=False)
    candidate_index_version: Mapped[str] = mapped_column(String(200), nullable=False)
    # The index version serving when it started: it is the other arm, and promotion activates the
    # candidate only while this one is still active.
    serving_model_version: Mapped[str] = mapped_column(String(200), nullable=False)
    serving_index_version: Mapped[str] = mapped_column(String(200), nullable=False)
    fraction: Mapped[float] = mapped_column(Float, nullable=False)
    policy: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)  # the decision rule it runs under
    started_by: Mapped[str | None] = mapped_column(String(32))  # cli | http | retrain
    training_run_id: Mapped[int | None] = mapped_column(RowId)  # the run that logged its start
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_by: Mapped[str | None] = mapped_column(String(32))  # cli | http | review
    reason: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)  # counts when it finished

    __table_args__ = (UniqueConstraint("running_slot", name="uq_canaries_running_slot"),)
