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
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from embedder import Embedder, ImageDecodeError, ModelIdentity, VectorCache, content_hash
from indexer.ann import AnnConfig, AnnIndex
from indexer.catalog import ImagePolicy, RowError, read_catalog
from indexer.fetch import FetchError, fetch_image_url
from indexer.memory import release_freed_memory
from indexer.retention import apply_retention, build_hold
from indexer.vectors_file import check_vectors_file, read_vectors_file
from indexer.versions import MODALITIES, build_lock, build_scratch, mark_recorded, write_index_version
from store import DEFAULT_TEXT_FIELDS, ImageState, LexicalConfig, ProductInput, ProductRecord, SourcePreference, Store, compose_text

if TYPE_CHECKING:
    from indexer.ray_embed import RayOptions

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
    chunk_rows: int = 5_000  # catalog rows upserted, and products embedded, per chunk
    build_chunk_rows: int = 100_000  # products listed per SQL page when an index is built
    vector_batch_rows: int = 8_192  # rows of a --vectors file read at a time
    keep_versions: int = 3  # index versions kept for rollback besides the active one (PRISM_KEEP_VERSIONS)
    prefer: SourcePreference = SourcePreference.NEWER  # a file row against a newer API edit: who wins
    sync: bool = False  # after indexing, delete the live products the catalog file does not list
    max_delete_fraction: float = 0.2  # a sync deleting more of the live catalog than this deletes nothing


MAX_ROW_ERRORS = 10_000  # kept in a summary; the rest are counted (a wrong file can be all bad rows)
MAX_LISTED_IDS = 10_000  # product ids kept per list in a summary (API edits kept, image failures)


@dataclass
class IndexSummary:
    rows_read: int = 0
    row_errors: list[RowError] = field(default_factory=list)
    rows_rejected: int = 0
    products_upserted: int = 0  # rows written: new, or changed since the last load
    products_unchanged: int = 0
    api_edits_kept: int = 0  # products edited over the API more recently than the file
    api_edits_overwritten: int = 0
    api_edits_kept_ids: list[str] = field(default_factory=list)
    api_edits_overwritten_ids: list[str] = field(default_factory=list)
    products_indexed: int = 0
    images_embedded: int = 0
    images_cached: int = 0
    image_failures: Counter = field(default_factory=Counter)
    failed_images: list[dict] = field(default_factory=list)  # product_id, reason, message (the first 10,000)
    texts_embedded: int = 0
    texts_cached: int = 0
    images_supplied: int = 0  # new vectors taken from a --vectors file
    # Products' images after the first that the new version leaves out: not in the model's vector
    # cache, as after a --vectors run (one image vector per product) or a --ray run (first images
    # only) that no earlier in-process run of this model embedded.
    further_images_left_out: int = 0
    texts_supplied: int = 0
    index_version: str | None = None
    model_version: str | None = None
    indexes: dict = field(default_factory=dict)
    seconds: float = 0.0
    # Wall seconds of each stage of the run: catalog (file -> SQL), vectors (--vectors) or embed, build.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    sync: dict | None = None  # `prism index --sync`: what the feed sync found and did (FeedSync.report)

    @contextmanager
    def timed(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - started

    def reject(self, error: RowError) -> None:
        self.rows_rejected += 1
        if len(self.row_errors) < MAX_ROW_ERRORS:
            self.row_errors.append(error)

    def image_failed(self, product_id: str, reason: str, message: str | None) -> None:
        self.image_failures[reason] += 1
        if len(self.failed_images) < MAX_LISTED_IDS:
            self.failed_images.append({"product_id": product_id, "reason": reason, "message": message or ""})

    def to_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_rejected": self.rows_rejected,
            "row_errors": [{"line": e.line, "product_id": e.product_id, "reason": e.reason} for e in self.row_errors],
            "products_upserted": self.products_upserted,
            "products_unchanged": self.products_unchanged,
            "api_edits_kept": self.api_edits_kept,
            "api_edits_overwritten": self.api_edits_overwritten,
            "api_edits_kept_ids": self.api_edits_kept_ids,
            "api_edits_overwritten_ids": self.api_edits_overwritten_ids,
            "products_indexed": self.products_indexed,
            "images_embedded": self.images_embedded,
            "images_cached": self.images_cached,
            "image_failures": dict(self.image_failures),
            "failed_images": self.failed_images,
            "texts_embedded": self.texts_embedded,
            "texts_cached": self.texts_cached,
            "images_supplied": self.images_supplied,
            "texts_supplied": self.texts_supplied,
            "further_images_left_out": self.further_images_left_out,
            "index_version": self.index_version,
            "model_version": self.model_version,
            "indexes": self.indexes,
            "seconds": round(self.seconds, 2),
            "stage_seconds": {name: round(v, 2) for name, v in self.stage_seconds.items()},
            **({"sync": self.sync} if self.sync is not None else {}),
        }


# The index of a version that holds products' images after the first; its FAISS ids are
# `product_images.image_id`s (search joins them to products in SQL). Absent when no product has one.
EXTRA_IMAGE_INDEX = "image_extra"

DEFAULT_MODEL_SPEC = "ViT-B-32:laion2b_s34b_b79k"  # what an empty home embeds with, unless told


def index_model_spec(store: Store, requested: str | None) -> str:
    """The model spec `prism index` embeds with: the one asked for; else the model that built the
    home's active index version, so a re-index keeps the home's vector space (and a promoted
    fine-tuned model) instead of falling back to a global default; else DEFAULT_MODEL_SPEC."""
    if requested:
        return requested
    active = store.active_index_version()
    if active is not None:
        model = store.get_model_version(active.model_version)
        if model is not None:
            return model.spec
    return DEFAULT_MODEL_SPEC


def product_text(p: ProductRecord | ProductInput, text_fields: tuple[str, ...] = DEFAULT_TEXT_FIELDS) -> str:
    """The text a product is embedded (and lexically searched) by: the values of `text_fields`
    (PRISM_TEXT_FIELDS; by default its title, then its description). Its hash is the text's
    cache key, so other fields make other keys: the next build embeds the new texts."""
    return compose_text(p, text_fields)


class CatalogIndexer:
    """Runs the stages for one PRISM_HOME, store and embedder."""

    def __init__(
        self,
        *,
        home: Path,
        store: Store,
        embedder: Embedder | ModelIdentity,
        options: IndexOptions = IndexOptions(),
        progress: Progress | None = None,
    ):
        """`embedder`: the model that embeds, or, for a run that only takes vectors made elsewhere
        (`run(..., vectors=...)`), just its identity (name, spec, width: no weights loaded)."""
        self.home = Path(home)
        self.store = store
        self.embedder = embedder
        self.options = options
        self.progress = progress or NoProgress()
        self.feed: FeedSync | None = None  # set while a `sync` run loads its catalog file

    @property
    def text_fields(self) -> tuple[str, ...]:
        """The fields a product's text is composed of: the store's (PRISM_TEXT_FIELDS), which its
        lexical index holds too, so the embedded text and the lexical text never differ."""
        return self.store.lexical.text_fields

    @property
    def cache_dir(self) -> Path:
        # One cache per model and precision: an int8 build must not reuse fp32 vectors (or back).
        return self.home / "embeddings" / self.embedder.vector_space

    # ---- stage 1+2: read and write products

    def load_catalog(self, catalog: Path, summary: IndexSummary) -> None:
        """Rows go to SQL a chunk at a time: the catalog is never held whole.

        The file's modification time is when its rows were written: a product edited over the
        API after it keeps the edit unless `options.prefer` says otherwise (docs/architecture.md,
        "Catalog source of truth")."""
        feed_time = datetime.fromtimestamp(Path(catalog).stat().st_mtime, timezone.utc)
        if self.feed is not None:
            self.feed.feed_written(feed_time, prefer_file=self.options.prefer is SourcePreference.FILE)
        chunk: list[ProductInput] = []
        self.progress.start("read catalog", None)
        for item in read_catalog(catalog, self.options.image_policy):
            summary.rows_read += 1
            if isinstance(item, RowError):
                summary.reject(item)
                if self.feed is not None:
                    self.feed.named(item.product_id)
            else:
                chunk.append(item.product)
            if len(chunk) >= self.options.chunk_rows:
                self._upsert(chunk, summary, feed_time)
            self.progress.advance("read catalog")
        self._upsert(chunk, summary, feed_time)
        if self.feed is not None:
            self.feed.flush(self.store)
        self.progress.finish("read catalog")
        if summary.api_edits_kept:
            log.warning("%d products edited over the API after %s was written kept their edits (--prefer file "
                        "overwrites them)", summary.api_edits_kept, Path(catalog).name)

    def _upsert(self, chunk: list[ProductInput], summary: IndexSummary, feed_time: datetime) -> None:
        if not chunk:
            return
        written = self.store.upsert_products(
            chunk, text_hash=lambda it: content_hash(product_text(it, self.text_fields)),
            feed_time=feed_time, prefer=self.options.prefer,
        )
        if self.feed is not None:
            self.feed.listed(written.row_ids.values())
            for pid in written.api_edits_kept:  # in the feed, though its row stays as the API left it
                self.feed.named(pid)
            self.feed.flush(self.store)
        summary.products_upserted += written.created + written.content_changed + written.metadata_changed
        summary.products_unchanged += written.unchanged
        summary.api_edits_kept += len(written.api_edits_kept)
        summary.api_edits_overwritten += len(written.api_edits_overwritten)
        for listed, ids in ((summary.api_edits_kept_ids, written.api_edits_kept),
                            (summary.api_edits_overwritten_ids, written.api_edits_overwritten)):
            listed += ids[: MAX_LISTED_IDS - len(listed)]
        chunk.clear()

    # ---- stage 3 (bring your own vectors): vectors made elsewhere, straight into the cache

    def load_vectors(self, vectors_file: Path, summary: IndexSummary) -> VectorCache:
        """`prism index --vectors`: nothing is embedded here. Each supplied vector is stored in
        the cache under `<modality>:<sha256 of its float32 bytes>`, which becomes the product's
        image or text hash, so a rerun with the same vectors finds them all cached."""
        cache = VectorCache(self.cache_dir, self.embedder.dim)
        claimed = _RowSet()
        pending = _SuppliedVectors()
        self.progress.start("read vectors", None)
        for item in read_vectors_file(vectors_file, dim=self.embedder.dim, batch_rows=self.options.vector_batch_rows):
            if isinstance(item, RowError):
                summary.reject(replace(item, reason=f"vectors file: {item.reason}"))
                continue
            rows = self.store.live_row_ids(item.product_ids)
            keep = np.zeros(len(item.product_ids), dtype=bool)
            row_ids = np.full(len(item.product_ids), -1, dtype=np.int64)
            for i, (line, pid) in enumerate(zip(item.lines.tolist(), item.product_ids)):
                row = rows.get(pid)
                if row is None:
                    summary.reject(RowError(line, pid, "vectors file: no live product with this id in the catalog"))
                elif not claimed.add(row):
                    summary.reject(RowError(line, pid, "vectors file: a second row for this product_id"))
                else:
                    keep[i], row_ids[i] = True, row
            hashes: dict[str, list] = {}
            for modality, matrix in item.vectors.items():
                take = keep & item.present[modality]
                digests = [content_hash(v.tobytes()) for v in matrix[take]]
                pending.add(modality, [f"{modality}:{h}" for h in digests], matrix[take],
                            list(compress(item.product_ids, take)))
                column = [None] * len(keep)
                for i, h in zip(np.flatnonzero(take).tolist(), digests):
                    column[i] = h
                hashes[modality] = column
            pending.rows += [
                (int(row_ids[i]), hashes.get("image", [None] * len(keep))[i], hashes.get("text", [None] * len(keep))[i])
                for i in np.flatnonzero(keep).tolist()
            ]
            if pending.size() >= cache.shard_rows:
                pending.write(cache, self.store, summary)
                release_freed_memory()  # each shard's Arrow batches and float copies
            self.progress.advance("read vectors", len(item.product_ids))
        pending.write(cache, self.store, summary)
        release_freed_memory()
        self.progress.finish("read vectors")
        return cache

    # ---- stage 3: embed every live product not yet in this model's cache

    def embed(self, summary: IndexSummary, ray: RayOptions | None = None) -> VectorCache:
        """`ray`: embed on that Ray cluster instead of in this process (`indexer.ray_embed`)."""
        cache = VectorCache(self.cache_dir, self.embedder.dim)
        # Products added through the API since this model's last build were embedded then.
        built = [v.manifest.get("catalog_seq", 0) for v in self.store.list_index_versions()
                 if v.model_version == self.embedder.name]
        self._cache_journal_vectors(cache, after=max(built, default=0))
        total = self.store.count_products()
        try:
            if ray is not None:
                from indexer.ray_embed import embed_on_ray  # imports Ray: only when asked for

                embed_on_ray(self, total, cache, summary, ray)
            else:
                self._embed_texts(total, cache, summary)
                self._embed_images(total, cache, summary)
                self._embed_extra_images(cache, summary)
        finally:
            cache.flush()  # keep every finished batch, also when interrupted
        return cache

    def _embed_texts(self, total: int, cache: VectorCache, summary: IndexSummary) -> None:
        self.progress.start("embed texts", total)
        for products in self.store.iter_live_products(self.options.chunk_rows):
            items = [(p.row_id, product_text(p, self.text_fields)) for p in products]
            recorded = {p.row_id: p.text_hash for p in products}
            for batch in self.embedder.embed_texts(items, batch_size=self.options.text_batch_size, cache=cache):
                summary.texts_embedded += batch.encoded
                summary.texts_cached += batch.attempted - batch.encoded
                changed = {row: h for row, h in zip(batch.keys, batch.hashes) if recorded[row] != h}
                if changed:
                    self.store.record_text_hashes(changed, seen=recorded)
                self.progress.advance("embed texts", batch.attempted)
        self.progress.finish("embed texts")

    def _embed_images(self, total: int, cache: VectorCache, summary: IndexSummary) -> None:
        self.progress.start("embed images", total)
        for products in self.store.iter_live_products(self.options.chunk_rows):
            self._record_imageless(products, summary)
            with_image = [p for p in products if p.image_uri]
            self.progress.advance("embed images", len(products) - len(with_image))
            seen = {p.row_id: (p.image_uri, p.image_hash) for p in with_image}
            product_ids = {p.row_id: p.product_id for p in with_image}
            batches = self.embedder.embed_images(
                ((p.row_id, self._image_source(p)) for p in with_image), batch_size=self.options.batch_size, cache=cache
            )
            for batch in batches:
                summary.images_embedded += batch.encoded
                summary.images_cached += batch.attempted - batch.encoded - len(batch.failures)
                states = [ImageState(row, image_hash=h, image_status="ok") for row, h in zip(batch.keys, batch.hashes)]
                for row, reason, message in batch.failures:
                    summary.image_failed(product_ids[row], reason, message)
                    states.append(ImageState(row, image_hash=None, image_status=reason[:32], image_error=message[:2000]))
                self.store.record_image_states(states, seen=seen)
                self.progress.advance("embed images", batch.attempted)
        self.progress.finish("embed images")

    def _embed_extra_images(self, cache: VectorCache, summary: IndexSummary) -> None:
        """Products' images after the first (`product_images`), each embedded into the cache by its
        content like the first; their states are recorded on their own rows."""
        self.progress.start("embed more images", None)
        for images in self.store.iter_product_images(self.options.chunk_rows):
            usable = [im for im in images if im.image_uri]
            seen = {im.image_id: (im.image_uri, im.image_hash) for im in usable}
            batches = self.embedder.embed_images(
                ((im.image_id, self._image_source(im)) for im in usable), batch_size=self.options.batch_size, cache=cache
            )
            product_ids = self.store.products_by_row_ids({im.row_id for im in usable})
            for batch in batches:
                summary.images_embedded += batch.encoded
                summary.images_cached += batch.attempted - batch.encoded - len(batch.failures)
                states = [ImageState(i, image_hash=h, image_status="ok") for i, h in zip(batch.keys, batch.hashes)]
                by_id = {im.image_id: im for im in usable}
                for image_id, reason, message in batch.failures:
                    product = product_ids.get(by_id[image_id].row_id)
                    summary.image_failed(product.product_id if product else str(image_id), reason,
                                         f"image {by_id[image_id].position + 1}: {message}")
                    states.append(ImageState(image_id, image_hash=None, image_status=reason[:32],
                                             image_error=message[:2000]))
                self.store.record_product_image_states(states, seen=seen)
                self.progress.advance("embed more images", batch.attempted)
        self.progress.finish("embed more images")

    def _extra_image_source(self, cache: VectorCache, summary: IndexSummary) -> "CachedVectors | None":
        """Where the embedded images after the first of live products lie in the cache, by image id.
        Those not there are counted in `summary.further_images_left_out`."""
        ids, locations = [], []
        missing = 0
        for image_ids, hashes in self.store.iter_image_indexable(self.options.build_chunk_rows):
            found = cache.locate([f"image:{h}" for h in hashes])
            ok = found >= 0
            missing += int((~ok).sum())
            ids.append(image_ids[ok])
            locations.append(found[ok])
        missing += self.store.count_unembedded_further_images()
        summary.further_images_left_out = missing
        if missing:
            log.warning("%d images after products' first are not in this model's vector cache and are left out of "
                        "this version (a --vectors file carries one image vector per product, --ray embeds first "
                        "images only): an index run without either embeds them", missing)
        if not ids or not sum(len(x) for x in ids):
            return None
        return CachedVectors(cache, np.concatenate(ids), np.concatenate(locations))

    def _record_imageless(self, products: list[ProductRecord], summary: IndexSummary) -> None:
        # A supplied image vector (`--vectors`) stands for an image the catalog does not carry.
        without = [p for p in products if not p.image_uri and p.image_status not in ("none", "supplied")]
        for p in products:
            if "_image_rejected" in p.attributes:
                summary.image_failed(p.product_id, "rejected", p.attributes["_image_rejected"])
        if without:
            self.store.record_image_states(
                [
                    ImageState(p.row_id, image_hash=None,
                               image_status="none" if "_image_rejected" not in p.attributes else "rejected",
                               image_error=p.attributes.get("_image_rejected"))
                    for p in without
                ],
                seen={p.row_id: (p.image_uri, p.image_hash) for p in without},
            )

    def _cache_journal_vectors(self, cache: VectorCache, *, after: int) -> None:
        """Put vectors that API upserts journaled for this model into the cache (no re-embedding)."""
        added = 0
        for change in self.store.catalog_changes(after, ops=("upsert",)):
            if change.model_version != self.embedder.vector_space:  # another model, or another precision
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

    def build(self, cache: VectorCache, summary: IndexSummary, *, catalog_seq: int | None = None,
              ray: RayOptions | None = None) -> None:
        """Build and publish from the products' current hashes; with `ray` (inside its
        `ray_session`), each index's vectors are added in parallel Ray tasks (`indexer.ray_build`).

        `catalog_seq`: the change-journal position the embed stage started from. Every journaled
        API change after it is replayed by servers on top of this version, so it must be read
        before the products were listed for embedding (a PUT in between then lands in both).
        """
        if catalog_seq is None:
            catalog_seq = self.store.catalog_seq()
        # API changes that landed while this build embedded: their vectors are in the journal.
        self._cache_journal_vectors(cache, after=catalog_seq)
        cache.flush()
        release_freed_memory()  # what embedding or reading the vectors freed: the build's codes grow next
        sources, products = self._sources(cache)
        summary.products_indexed = products
        recorded = lambda version: self.store.get_index_version(version) is not None  # noqa: E731
        with build_lock(self.home / "indexes", is_recorded=recorded, store=self.store), \
                build_scratch(self.home / "indexes") as scratch:
            self.progress.start("build indexes", 2)
            indexes = {}
            # Each index is tuned with the other modality's vectors as queries: that is the
            # cross-modal traffic it will serve.
            for modality, other in (("image", "text"), ("text", "image")):
                queries = sources[other].sample(self.options.ann.tuning_queries)
                if ray is None:
                    # Re-rank codes stream to the scratch dir, not memory; publishing links them.
                    indexes[modality] = AnnIndex.build_from(sources[modality], self.options.ann, tuning_queries=queries,
                                                            rerank_file=scratch / f"{modality}.rerank.faiss")
                else:
                    from indexer.ray_build import CachedShardSource, build_ann_on_ray

                    indexes[modality] = build_ann_on_ray(CachedShardSource.of(sources[modality]), self.options.ann,
                                                         tuning_queries=queries)
                self.progress.advance("build indexes")
            extra = self._extra_image_source(cache, summary)
            if extra is not None:
                # Tuned with text queries, like the image index: the same cross-modal traffic.
                indexes[EXTRA_IMAGE_INDEX] = AnnIndex.build_from(
                    extra, self.options.ann, tuning_queries=sources["text"].sample(self.options.ann.tuning_queries),
                    rerank_file=scratch / f"{EXTRA_IMAGE_INDEX}.rerank.faiss")
            self.progress.finish("build indexes")
            self.store.register_model_version(self.embedder.name, spec=self.embedder.spec, dim=self.embedder.dim)
            version, path, manifest = write_index_version(
                self.home / "indexes",
                model_version=self.embedder.name,
                indexes=indexes,
                extra={
                    "counts": {"products": products, "image": indexes["image"].ntotal, "text": indexes["text"].ntotal,
                               **({EXTRA_IMAGE_INDEX: indexes[EXTRA_IMAGE_INDEX].ntotal}
                                  if EXTRA_IMAGE_INDEX in indexes else {})},
                    "catalog_seq": catalog_seq,
                    "lexical": self.store.lexical.to_dict(),
                    # Queries to this version are encoded at the same precision (search.engine).
                    "precision": self.embedder.precision,
                },
            )
            self.store.record_index_version(
                version, model_version=self.embedder.name, path=path.name, manifest=manifest,
                activate=self.options.activate,
            )
            mark_recorded(self.home / "indexes", version)
            apply_retention(self.store, self.home, self.options.keep_versions)
        summary.index_version = version
        summary.model_version = self.embedder.name
        summary.indexes = dict(manifest["indexes"])

    def _sources(self, cache: VectorCache) -> tuple[dict[str, "CachedVectors"], int]:
        """Where each live product's vectors lie in the cache, per modality (16 bytes a vector:
        row id and cache location), and how many live products there are."""
        found: dict[str, tuple[list, list]] = {m: ([], []) for m in MODALITIES}
        missing = dict.fromkeys(MODALITIES, 0)
        products = 0
        for row_ids, image_hashes, text_hashes in self.store.iter_indexable(self.options.build_chunk_rows):
            products += len(row_ids)
            for modality, hashes in (("image", image_hashes), ("text", text_hashes)):
                has = np.fromiter((h is not None for h in hashes), dtype=bool, count=len(hashes))
                keys = [f"{modality}:{h}" for h in compress(hashes, has)]
                locations = cache.locate(keys)
                ok = locations >= 0
                missing[modality] += int((~ok).sum())
                found[modality][0].append(row_ids[has][ok])
                found[modality][1].append(locations[ok])
        for modality, count in missing.items():
            if count:
                log.warning("%d %s vectors missing from the cache; those products are left out of this index", count, modality)
        sources = {
            m: CachedVectors(cache, np.concatenate(ids) if ids else np.zeros(0, np.int64),
                             np.concatenate(locs) if locs else np.zeros(0, np.int64))
            for m, (ids, locs) in found.items()
        }
        return sources, products

    def _refresh_lexical(self) -> None:
        """Text fields or identifier attributes other than those the active version was built
        with: every product's lexical text and identifiers are rewritten first (the texts are
        re-embedded below, since their content keys change with them)."""
        active = self.store.active_index_version()
        built = LexicalConfig.from_dict(active.manifest.get("lexical") if active is not None else None)
        if built != self.store.lexical:
            changed = self.store.refresh_lexical()
            log.info("text fields %s, identifier attributes %s (were %s, %s): %d products' lexical text rewritten",
                     ",".join(self.store.lexical.text_fields), ",".join(self.store.lexical.id_attributes) or "none",
                     ",".join(built.text_fields), ",".join(built.id_attributes) or "none", changed)

    def run(self, catalog: Path | None, *, vectors: Path | None = None, ray: RayOptions | None = None) -> IndexSummary:
        """Load `catalog` (if given), then embed what is missing with the model (on the Ray
        cluster `ray` says, if given), or, with `vectors`, take the vectors made elsewhere
        instead (nothing is embedded); build, publish."""
        started = time.perf_counter()
        summary = IndexSummary()
        if self.options.sync and catalog is None:
            raise ValueError("a sync needs a catalog file: it deletes what the file does not list")
        if self.options.sync:
            self.feed = FeedSync(self.options.max_delete_fraction, chunk_rows=self.options.chunk_rows)
        if vectors is not None:
            # A file rejected as a whole (a fixed-size list of another model's width is only known
            # now, with the model) must fail before the catalog loads, which writes products and
            # takes long at scale, not after.
            check_vectors_file(vectors, dim=self.embedder.dim)
        self._refresh_lexical()
        if catalog is not None:
            with summary.timed("catalog"):
                self.load_catalog(Path(catalog), summary)
        # The hold is taken before the position is read: a retention in between could otherwise
        # prune entries after it.
        with build_hold(self.home / "indexes", self.store.catalog_seq(), self.embedder.name), \
                embedding_writer(self.home, compact=self.cache_dir):
            catalog_seq = self.store.catalog_seq()
            if vectors is None and isinstance(self.embedder, ModelIdentity):
                raise TypeError("embedding needs a loaded model, not only its identity")
            if ray is None:
                with summary.timed("vectors" if vectors is not None else "embed"):
                    cache = self.load_vectors(Path(vectors), summary) if vectors is not None else self.embed(summary)
                with summary.timed("build"):
                    self.build(cache, summary, catalog_seq=catalog_seq)
            else:
                from indexer.ray_embed import ray_session

                with ray_session(ray):
                    with summary.timed("embed"):
                        cache = self.embed(summary, ray)
                    with summary.timed("build"):
                        self.build(cache, summary, catalog_seq=catalog_seq, ray=ray)
        if self.feed is not None:
            # After the build is published: a failed run deletes nothing.
            summary.sync = self.feed.apply(self.store)
            self.feed = None
        summary.seconds = time.perf_counter() - started
        return summary


@contextmanager
def embedding_writer(home: Path, *, compact: Path | None = None):
    """Held (shared) by every indexing run of a home while it writes vector shards and downloads.

    A run that finds no other holder first removes what dead runs left half-written: temp shards
    (`embeddings/*/.part-*.tmp`, from a kill during a shard write) and partial downloads
    (`downloads/.*.part`), and folds the small shards of the cache it will use (`compact`) into
    large ones. With another run under way they may be its own, and are left alone.
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
            if compact is not None:
                VectorCache.compact(compact)
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


class CachedVectors:
    """One modality's vectors for a build, read from the cache by position a chunk at a time
    (an `indexer.ann.VectorSource`)."""

    def __init__(self, cache: VectorCache, ids: np.ndarray, locations: np.ndarray):
        self.cache, self.ids, self.locations = cache, ids, locations
        self.dim = cache.dim

    def read(self, positions: np.ndarray) -> np.ndarray:
        return self.cache.read(self.locations[positions])

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        if not len(self.ids):
            return np.zeros((0, self.dim), np.float32)
        picks = np.random.default_rng(seed).choice(len(self.ids), size=min(size, len(self.ids)), replace=False)
        return self.read(np.sort(picks))


class _SuppliedVectors:
    """Supplied vectors gathered into full cache shards (a file is read in small batches), and
    the products' hashes, written to SQL only once their vectors are in the cache."""

    def __init__(self):
        self.keys: dict[str, list] = {}
        self.vectors: dict[str, list] = {}
        self.refs: dict[str, list] = {}
        self.rows: list[tuple[int, str | None, str | None]] = []

    def add(self, modality: str, keys: list[str], vectors: np.ndarray, refs: list[str]) -> None:
        self.keys.setdefault(modality, []).extend(keys)
        self.vectors.setdefault(modality, []).append(vectors)
        self.refs.setdefault(modality, []).extend(refs)

    def size(self) -> int:
        return max((len(k) for k in self.keys.values()), default=0)

    def write(self, cache: VectorCache, store: Store, summary: "IndexSummary") -> None:
        for modality, keys in self.keys.items():
            new = cache.put_many(keys, np.concatenate(self.vectors[modality]), modality=modality,
                                 refs=self.refs[modality])
            if modality == "image":
                summary.images_supplied += new
                summary.images_cached += len(keys) - new
            else:
                summary.texts_supplied += new
                summary.texts_cached += len(keys) - new
        store.record_supplied_vectors(self.rows)
        self.__init__()


class FeedSync:
    """`prism index FEED --sync`: which live products FEED does not list, and their deletion.

    While the feed loads, the row of every product it names is marked in a bitmap (one byte per
    row id): rows written or unchanged, API edits the file did not overwrite, and rows rejected
    for a bad field, which still name their product_id (a bad price must not delete a product).
    Afterwards the live catalog is walked in row-id pages (`Store.iter_live_ids`), twice: once to
    count the unmarked products, and, when they are at most `max_delete_fraction` of the live
    catalog, once to delete them a page at a time through `Store.soft_delete_products`, which
    journals each deletion as `prism products delete` does. Neither the feed nor the catalog is
    held whole. A product changed after the feed was written (its file's modification time: an
    API edit or creation since the export, or during the run) is newer than the feed and stays,
    as the file load keeps such edits; with `--prefer file` only changes during the run stay. A
    rejected row that names no product_id (unreadable JSON) could be
    any product: then nothing is deleted."""

    def __init__(self, max_delete_fraction: float, *, chunk_rows: int = 5_000):
        if not 0.0 <= max_delete_fraction <= 1.0:
            raise ValueError(f"max_delete_fraction must be between 0 and 1, got {max_delete_fraction}")
        self.max_delete_fraction = max_delete_fraction
        self.chunk_rows = chunk_rows
        self.started = datetime.now(timezone.utc)
        self.cutoff = self.started  # products changed at or after this stay; see `feed_written`
        self.rows = _RowSet()
        self.pending: list[str] = []
        self.unnamed = 0
        self.rejected_named = 0

    def feed_written(self, feed_time: datetime, *, prefer_file: bool) -> None:
        if not prefer_file:
            self.cutoff = min(self.started, feed_time)

    def listed(self, rows) -> None:
        for row in rows:
            self.rows.add(int(row))

    def named(self, product_id: str | None) -> None:
        if product_id is None or not str(product_id).strip():
            self.unnamed += 1
            return
        self.pending += list(dict.fromkeys([str(product_id), str(product_id).strip()]))

    def flush(self, store: Store) -> None:
        if self.pending:
            self.listed(store.live_row_ids(self.pending).values())
            self.pending = []

    def _absent(self, page: list[tuple[int, str, datetime]]) -> list[str]:
        return [pid for row, pid, updated in page if row not in self.rows and updated < self.cutoff]

    def apply(self, store: Store) -> dict:
        """Count, then delete unless refused; the report either way."""
        live = absent = 0
        for page in store.iter_live_ids(self.chunk_rows):
            live += len(page)
            absent += len(self._absent(page))
        fraction = absent / live if live else 0.0
        report = {"live_before": live, "absent": absent, "deleted": 0, "fraction": round(fraction, 6),
                  "max_delete_fraction": self.max_delete_fraction, "refused": False, "reason": None,
                  "unnamed_rejected_rows": self.unnamed}
        if self.unnamed:
            report.update(refused=True, reason=(
                f"{self.unnamed} rejected row(s) name no product_id: the products they stand for cannot be told "
                "apart from the absent ones; fix the feed"))
        elif fraction > self.max_delete_fraction:
            report.update(refused=True, reason=(
                f"{absent} of {live} live products ({fraction:.1%}) are absent from the feed, above the "
                f"{self.max_delete_fraction:.0%} allowed; --max-delete-fraction {min(1.0, round(fraction + 0.005, 2))} "
                "allows it"))
        if report["refused"]:
            log.warning("feed sync refused: %s", report["reason"])
            return report
        deleted = 0
        for page in store.iter_live_ids(self.chunk_rows):
            gone = self._absent(page)
            if gone:
                deleted += store.soft_delete_products(gone)
        report["deleted"] = deleted
        return report


class _RowSet:
    """Row ids seen so far, as a growable bitmap (a set of 10M ints would take ~0.5 GB)."""

    def __init__(self):
        self._bits = np.zeros(1 << 16, dtype=bool)

    def __contains__(self, row: int) -> bool:
        return 0 <= row < len(self._bits) and bool(self._bits[row])

    def add(self, row: int) -> bool:
        """False when `row` was already in the set."""
        if row >= len(self._bits):
            grown = np.zeros(max(row + 1, 2 * len(self._bits)), dtype=bool)
            grown[: len(self._bits)] = self._bits
            self._bits = grown
        if self._bits[row]:
            return False
        self._bits[row] = True
        return True
