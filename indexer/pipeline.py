"""Catalog -> products -> vectors -> index version, as swappable stages:

    read (catalog rows)  ->  write products (SQL)  ->  embed (cache)  ->  build (FAISS)  ->  publish

Each stage is safe to interrupt: products are upserted idempotently, vectors land in the
content-hash cache in atomic shards (a rerun embeds only what is missing), and an index version
becomes visible only after its directory is complete and renamed and its SQL row committed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from embedder import Embedder, ImageDecodeError, VectorCache, content_hash
from indexer.ann import AnnConfig, AnnIndex
from indexer.catalog import CatalogRow, ImagePolicy, RowError, read_catalog
from indexer.fetch import FetchError, fetch_image_url
from indexer.versions import MODALITIES, build_lock, mark_recorded, write_index_version
from store import ImageState, ProductRecord, Store

log = logging.getLogger(__name__)


class Progress(Protocol):
    def start(self, stage: str, total: int | None) -> None: ...

    def advance(self, stage: str, n: int = 1) -> None: ...

    def finish(self, stage: str) -> None: ...


class NoProgress:
    def start(self, stage: str, total: int | None) -> None:
        pass

    def advance(self, stage: str, n: int = 1) -> None:
        pass

    def finish(self, stage: str) -> None:
        pass


@dataclass(frozen=True)
class IndexOptions:
    batch_size: int = 64
    text_batch_size: int = 256
    ann: AnnConfig = AnnConfig()
    image_policy: ImagePolicy = ImagePolicy()
    url_max_bytes: int = 10 * 1024 * 1024
    url_timeout_s: float = 10.0
    activate: bool = True


@dataclass
class IndexSummary:
    rows_read: int = 0
    row_errors: list[RowError] = field(default_factory=list)
    products_upserted: int = 0
    products_indexed: int = 0
    images_embedded: int = 0
    images_cached: int = 0
    image_failures: Counter = field(default_factory=Counter)
    texts_embedded: int = 0
    texts_cached: int = 0
    index_version: str | None = None
    model_version: str | None = None
    indexes: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "row_errors": [{"line": e.line, "product_id": e.product_id, "reason": e.reason} for e in self.row_errors],
            "products_upserted": self.products_upserted,
            "products_indexed": self.products_indexed,
            "images_embedded": self.images_embedded,
            "images_cached": self.images_cached,
            "image_failures": dict(self.image_failures),
            "texts_embedded": self.texts_embedded,
            "texts_cached": self.texts_cached,
            "index_version": self.index_version,
            "model_version": self.model_version,
            "indexes": self.indexes,
            "seconds": round(self.seconds, 2),
        }


def product_text(p: ProductRecord) -> str:
    """The text a product is embedded (and text-searched) by: its title, then its description."""
    return f"{p.title}. {p.description}" if p.description else p.title


class CatalogIndexer:
    """Runs the stages for one PRISM_HOME, store and embedder."""

    def __init__(
        self,
        *,
        home: Path,
        store: Store,
        embedder: Embedder,
        options: IndexOptions = IndexOptions(),
        progress: Progress | None = None,
    ):
        self.home = Path(home)
        self.store = store
        self.embedder = embedder
        self.options = options
        self.progress = progress or NoProgress()

    @property
    def cache_dir(self) -> Path:
        return self.home / "embeddings" / self.embedder.name

    # ---- stage 1+2: read and write products

    def load_catalog(self, catalog: Path, summary: IndexSummary) -> None:
        rows: list[CatalogRow] = []
        self.progress.start("read catalog", None)
        for item in read_catalog(catalog, self.options.image_policy):
            summary.rows_read += 1
            if isinstance(item, RowError):
                summary.row_errors.append(item)
            else:
                rows.append(item)
            self.progress.advance("read catalog")
        self.progress.finish("read catalog")
        products = [r.product for r in rows]
        for start in range(0, len(products), 2000):
            self.store.upsert_products(products[start : start + 2000])
        summary.products_upserted = len(products)

    # ---- stage 3: embed every live product not yet in this model's cache

    def embed(self, summary: IndexSummary) -> VectorCache:
        cache = VectorCache(self.cache_dir, self.embedder.dim)
        # Products added through the API since this model's last build were embedded then.
        built = [v.manifest.get("catalog_seq", 0) for v in self.store.list_index_versions()
                 if v.model_version == self.embedder.name]
        self._cache_journal_vectors(cache, after=max(built, default=0))
        products = self.store.live_products()
        try:
            self._embed_texts(products, cache, summary)
            self._embed_images(products, cache, summary)
        finally:
            cache.flush()  # keep every finished batch, also when interrupted
        return cache

    def _embed_texts(self, products: list[ProductRecord], cache: VectorCache, summary: IndexSummary) -> None:
        self.progress.start("embed texts", len(products))
        items = [(p.row_id, product_text(p)) for p in products]
        recorded = {p.row_id: p.text_hash for p in products}
        for batch in self.embedder.embed_texts(items, batch_size=self.options.text_batch_size, cache=cache):
            summary.texts_embedded += batch.encoded
            summary.texts_cached += batch.attempted - batch.encoded
            changed = {row: h for row, h in zip(batch.keys, batch.hashes) if recorded[row] != h}
            if changed:
                self.store.record_text_hashes(changed, seen=recorded)
            self.progress.advance("embed texts", batch.attempted)
        self.progress.finish("embed texts")

    def _embed_images(self, products: list[ProductRecord], cache: VectorCache, summary: IndexSummary) -> None:
        with_image = [p for p in products if p.image_uri]
        without = [p for p in products if not p.image_uri and p.image_status != "none"]
        seen = {p.row_id: (p.image_uri, p.image_hash) for p in products}
        if without:
            self.store.record_image_states(
                [
                    ImageState(p.row_id, image_hash=None,
                               image_status="none" if "_image_rejected" not in p.attributes else "rejected",
                               image_error=p.attributes.get("_image_rejected"))
                    for p in without
                ],
                seen=seen,
            )
        for p in products:
            if "_image_rejected" in p.attributes:
                summary.image_failures["rejected"] += 1
        self.progress.start("embed images", len(with_image))
        batches = self.embedder.embed_images(
            ((p.row_id, self._image_source(p)) for p in with_image),
            batch_size=self.options.batch_size,
            cache=cache,
        )
        for batch in batches:
            summary.images_embedded += batch.encoded
            summary.images_cached += batch.attempted - batch.encoded - len(batch.failures)
            states = [ImageState(row, image_hash=h, image_status="ok") for row, h in zip(batch.keys, batch.hashes)]
            for row, reason, message in batch.failures:
                summary.image_failures[reason] += 1
                states.append(ImageState(row, image_hash=None, image_status=reason[:32], image_error=message[:2000]))
            self.store.record_image_states(states, seen=seen)
            self.progress.advance("embed images", batch.attempted)
        self.progress.finish("embed images")

    def _cache_journal_vectors(self, cache: VectorCache, *, after: int) -> None:
        """Put vectors that API upserts journaled for this model into the cache (no re-embedding)."""
        added = 0
        for change in self.store.catalog_changes(after):
            if change.op != "upsert" or change.model_version != self.embedder.name:
                continue
            if change.text_vector is not None and change.text_hash:
                cache.put(f"text:{change.text_hash}", change.text_vector, modality="text", ref=change.product_id)
                added += 1
            if change.image_vector is not None and change.image_hash:
                cache.put(f"image:{change.image_hash}", change.image_vector, modality="image", ref=change.product_id)
                added += 1
        if added:
            cache.flush()
            log.info("took %d vectors from the catalog change journal", added)

    def _image_source(self, p: ProductRecord):
        uri = p.image_uri
        if not uri.lower().startswith(("http://", "https://")):
            return uri
        downloads = self.home / "downloads"
        local = downloads / content_hash(uri)
        if local.is_file():
            return str(local)
        try:
            data = fetch_image_url(uri, max_bytes=self.options.url_max_bytes, timeout_s=self.options.url_timeout_s)
        except FetchError as exc:
            raise_later = ImageDecodeError(exc.reason, str(exc))
            return _Failing(raise_later)
        downloads.mkdir(parents=True, exist_ok=True)
        # Unique per writer: two runs fetching the same URL must not write into one temp file.
        tmp = downloads / f".{local.name}.{uuid.uuid4().hex}.part"
        tmp.write_bytes(data)
        tmp.replace(local)
        return str(local)

    # ---- stage 4+5: build and publish an index version

    def build(self, cache: VectorCache, summary: IndexSummary, *, catalog_seq: int | None = None) -> None:
        """Build and publish from the products' current hashes.

        `catalog_seq`: the change-journal position the embed stage started from. Every journaled
        API change after it is replayed by servers on top of this version, so it must be read
        before the products were listed for embedding (a PUT in between then lands in both).
        """
        if catalog_seq is None:
            catalog_seq = self.store.catalog_seq()
        # API changes that landed while this build embedded: their vectors are in the journal.
        self._cache_journal_vectors(cache, after=catalog_seq)
        products = self.store.indexable_products()
        text_rows = [(p.row_id, p.text_hash) for p in products if p.text_hash]
        image_rows = [(p.row_id, p.image_hash) for p in products if p.image_hash]
        text_ids, text_vecs = _gather(cache, "text", text_rows)
        image_ids, image_vecs = _gather(cache, "image", image_rows)
        summary.products_indexed = len(products)
        recorded = lambda version: self.store.get_index_version(version) is not None  # noqa: E731
        with build_lock(self.home / "indexes", is_recorded=recorded):
            self.progress.start("build indexes", 2)
            indexes = {}
            # Each index is tuned with the other modality's vectors as queries: that is the
            # cross-modal traffic it will serve.
            for modality, ids, vecs, queries in (
                ("image", image_ids, image_vecs, text_vecs),
                ("text", text_ids, text_vecs, image_vecs),
            ):
                indexes[modality] = AnnIndex.build(
                    vecs, ids, self.options.ann, tuning_queries=queries if len(queries) else None, dim=self.embedder.dim
                )
                self.progress.advance("build indexes")
            self.progress.finish("build indexes")
            self.store.register_model_version(self.embedder.name, spec=self.embedder.spec, dim=self.embedder.dim)
            version, path, manifest = write_index_version(
                self.home / "indexes",
                model_version=self.embedder.name,
                indexes=indexes,
                extra={
                    "counts": {"products": len(products), "image": len(image_ids), "text": len(text_ids)},
                    "catalog_seq": catalog_seq,
                },
            )
            self.store.record_index_version(
                version, model_version=self.embedder.name, path=path.name, manifest=manifest,
                activate=self.options.activate,
            )
            mark_recorded(self.home / "indexes", version)
        summary.index_version = version
        summary.model_version = self.embedder.name
        summary.indexes = {m: manifest["indexes"][m] for m in MODALITIES}

    def run(self, catalog: Path | None) -> IndexSummary:
        started = time.perf_counter()
        summary = IndexSummary()
        if catalog is not None:
            self.load_catalog(Path(catalog), summary)
        catalog_seq = self.store.catalog_seq()
        with embedding_writer(self.home):
            cache = self.embed(summary)
            self.build(cache, summary, catalog_seq=catalog_seq)
        summary.seconds = time.perf_counter() - started
        return summary


@contextmanager
def embedding_writer(home: Path):
    """Held (shared) by every indexing run of a home while it writes vector shards and downloads.

    A run that finds no other holder first removes what dead runs left half-written: temp shards
    (`embeddings/*/.part-*.tmp`, from a kill during a shard write) and partial downloads
    (`downloads/.*.part`). With another run under way they may be its own, and are left alone.
    The lock is an flock, so a killed run never holds it.
    """
    home = Path(home)
    root = home / "embeddings"
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".writers.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            for leftover in [*root.glob("*/.part-*.tmp"), *(home / "downloads").glob(".*.part")]:
                log.info("removing %s, left half-written by a run that died", leftover)
                leftover.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


class _Failing:
    """An image source that fails when read: lets a failed download surface as a per-row failure."""

    def __init__(self, error: ImageDecodeError):
        self.error = error

    def __fspath__(self) -> str:
        raise self.error


def _gather(cache: VectorCache, modality: str, rows: Iterable[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    rows = list(rows)
    ids = np.asarray([r for r, _ in rows], dtype=np.int64)
    vectors, found = cache.get_many([f"{modality}:{h}" for _, h in rows])
    if not found.all():
        missing = int((~found).sum())
        log.warning("%d %s vectors missing from the cache; those products are left out of this index", missing, modality)
    return ids[found], vectors[found]
