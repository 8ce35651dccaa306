"""The query engine: one active index version, any query modality, filters, hybrid fusion.

Routing:
    text  query, target=image   text->image   (cross-modal, the main use)
    text  query, target=text    text->text
    image query, target=image   image->image
    image query, target=text    image->text
    either,      target=hybrid  both indexes (and, for a text query, the lexical leg), fused by
                                weighted reciprocal rank fusion

Exact identifiers: a text query equal to a product's product_id, or to a value of an identifier
attribute (PRISM_ID_ATTRIBUTES), puts that product first for every target (`scores["exact"]`);
the rest of the ranking follows as the target ranks it.

Hybrid fusion: each leg returns its ranked candidates; a product's fused score is
sum over legs of weight / (rrf_k + rank), with rank starting at 1 and rrf_k = 60 (Cormack et al.).
RRF needs no calibration between the very different cosine ranges of same-modal and cross-modal
matches, nor against full-text scores. The legs: the image index and the text index (weight 1
each) and, for text queries, the lexical leg (`Store.lexical_search`, the database's full-text
search; weight `lexical_weight`, 2 by default). A product whose name (its first text field) the
query is, word for word or but for one typo, gets `title_boost` / (rrf_k + 1) more: a shopper typing a product's name
expects it first, and the image leg (cross-modal, the weakest) must not outvote two legs that
agree (docs/design.md, "Hybrid fusion"). Per-leg scores are returned in `scores`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image

from embedder import (
    Embedder,
    ImageLimits,
    ImageSource,
    ModelThread,
    QueryCache,
    QueryCacheConfig,
    content_hash,
    decode_image,
    load_embedder,
    model_version_base,
    parse_precision,
    read_image_bytes,
    vector_space,
)
from indexer import (
    EXTRA_IMAGE_INDEX,
    IndexVersionError,
    LoadedIndexVersion,
    copy_version,
    index_version_path,
    load_index_version,
)
from search.batcher import BatchConfig, QueryBatcher
from search.filters import FilterIndex
from search.images import ExtraImages, ExtraOverlay
from search.interleave import ARM_NAMES, search_draw, team_draft
from search.journal import replay_changes
from search.metadata import MetadataCache
from search.results import ResultCache
from search.overlay import MODALITIES, Overlay
from store import (
    LEXICAL_NAME,
    CatalogChangeRecord,
    LexicalConfig,
    ProductFilter,
    ProductImageRecord,
    ProductRecord,
    Store,
    product_facts,
)

log = logging.getLogger(__name__)

# Results one query can page through: offset + k. A deeper page costs candidates and re-ranking
# for every result above it, so an anonymous request must not ask for 11,000 of them.
MAX_RESULT_WINDOW = 1000
MAX_K = MAX_RESULT_WINDOW
MAX_OFFSET = MAX_RESULT_WINDOW - 1
# Candidate depths a ranking is built in (see SearchEngine._ranked): a page is cut from the first
# depth that covers it, so every page of a query is cut from one ranking. The first is a usual
# first page, which then costs one search of its own depth (candidates grow with the depth).
RANKING_DEPTHS = (10, 50, 100, 200, 400, 800, MAX_RESULT_WINDOW)
MAX_QUERY_CHARS = 2000
# Facet counts one query may ask for, and values returned per facet (the most frequent): a filter
# panel shows a handful of facets, and a facet of a per-product attribute (a SKU) would otherwise
# answer with one entry per product.
MAX_FACETS = 8
MAX_FACET_VALUES = 50
# Candidates the lexical leg contributes to a hybrid ranking (whatever the page's depth: every page
# of a query is cut from one fusion).
LEXICAL_DEPTH = 100
# With a filter, the full-text search is asked again for up to this many rows when the filter left
# fewer than LEXICAL_DEPTH of the first ones: the database ranks before the filter applies, and a
# narrow filter would otherwise drop the leg's only matches (a brand's products ranked 101st).
LEXICAL_FILTERED_DEPTH = 3200
# A text query longer than this is not sent to the full-text search (nobody types a product name
# that long; the trigram work grows with it).
MAX_LEXICAL_QUERY_CHARS = 256
# A version that failed to load is tried again after this long (its files may have been repaired).
FAILED_VERSION_RETRY_S = 60.0


# Key of a ranking entry's parts naming the image its image-leg score is of (0: the product's first
# image, else a `product_images.image_id`); taken out before the parts become a hit's `scores`.
_MATCHED = "_matched_image"


class Target(str, Enum):
    IMAGE = "image"
    TEXT = "text"
    HYBRID = "hybrid"


class QueryError(ValueError):
    """The query itself is wrong (maps to HTTP 4xx / CLI exit 2)."""


class ProductNotFoundError(LookupError):
    """A query refers to a product that does not exist (or was deleted)."""


class NotReadyError(RuntimeError):
    """No index version is active yet."""


@dataclass(frozen=True)
class SearchQuery:
    """What was asked, as the search log records it."""

    kind: str  # text | image | product
    target: Target
    k: int
    offset: int
    filters: ProductFilter
    text: str | None = None
    image_hash: str | None = None
    similar_to: str | None = None


@dataclass
class SearchHit:
    product: ProductRecord
    score: float
    rank: int
    scores: dict[str, float] = field(default_factory=dict)
    # The product's image its image-leg score is of (position 0: its first image); None when no
    # image leg ranked it (target=text, an exact identifier match).
    matched_image: ProductImageRecord | None = None


@dataclass
class SearchResult:
    query_id: str
    model_version: str
    index_version: str
    took_ms: float
    hits: list[SearchHit]
    timings_ms: dict[str, float]
    query: SearchQuery
    facets: dict[str, dict[str, int]] | None = None  # asked-for facet counts over the filter's matches
    # An interleaved canary search: the canary, and per hit the arm that contributed it.
    canary_id: int | None = None
    arms: list[str] | None = None

    @property
    def query_kind(self) -> str:
        return self.query.kind

    @property
    def target(self) -> Target:
        return self.query.target


@dataclass
class _Plan:
    """A prepared query (SearchEngine._prepare): the query as logged, then either its known
    vector or the payload to encode (and `remember`, which caches the encoded vector)."""

    query: SearchQuery
    vector: np.ndarray | None = None
    payload: object = None
    remember: object = None
    exclude: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pinned: list[int] = field(default_factory=list)
    lexical: list[tuple[int, float]] | None = None
    image: object = None  # an image query's bytes (or PIL image), for a canary's candidate to encode


class _StageTimer:
    """Milliseconds per search stage, measured in one place (`with timer("ann"): ...`)."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(stage, (time.perf_counter() - t0) * 1000.0)

    def record(self, stage: str, ms: float) -> None:
        self.timings[stage] = round(ms, 3)


@dataclass(frozen=True)
class _Serving:
    version: LoadedIndexVersion
    embedder: Embedder
    overlay: Overlay
    filters: FilterIndex
    extra: ExtraImages | None = None  # products' images after the first (search/images.py)
    extra_overlay: ExtraOverlay | None = None  # those of products changed since the build


@dataclass(frozen=True)
class _Canary:
    """A running canary's candidate, loaded beside the serving version (feedback/canary.py)."""

    canary_id: int
    fraction: float
    serving_index_version: str  # interleaved only while this version serves
    candidate: _Serving


class SearchEngine:
    def __init__(
        self,
        store: Store,
        *,
        indexes_dir: Path,
        models_dir: Path | None = None,
        device: str = "auto",
        image_limits: ImageLimits | None = None,
        rrf_k: int = 60,
        exact_subset_max: int = 4096,
        verify_files: bool = True,
        model_thread: ModelThread | None = None,
        batching: BatchConfig | None = None,
        local_copies: Path | None = None,
        lexical_weight: float = 2.0,
        title_boost: float = 1.0,
        query_cache: QueryCacheConfig | None = None,
        precision: str = "fp32",
        metadata_cache_entries: int = 50_000,
        result_cache_entries: int = 0,
    ):
        """`indexes_dir`: the home's `indexes/`, which recorded index-version paths are relative to.
        `model_thread`: run model loading and encoding there (servers); None: on the caller's thread.
        `batching`: micro-batch concurrent text queries (servers; needs a model thread).
        `local_copies`: a replica's own disk. Index and model versions published to a shared
        location (`indexes_dir`, `models_dir` under PRISM_SHARED_DIR) are copied there and served
        from there: memory-mapping index files over a network filesystem would make every query's
        page faults network round trips, and a copy is checked against its sha256 digests once.
        `query_cache`: bounds of the query-vector cache (None: the defaults; 0 entries: off).
        `precision`: the encoder precision the settings ask for. Queries are encoded at the
        precision the serving index was built with (its manifest), whatever this says: vectors
        of two precisions differ, and an index is only as good as queries made like its vectors.
        A difference is logged once per version.
        `metadata_cache_entries`: product records kept for hits (search/metadata.py; 0: off).
        `result_cache_entries`: ranked pages of repeated text queries kept (search/results.py; 0: off)."""
        self.store = store
        self.model_thread = model_thread
        self.indexes_dir = indexes_dir
        self.models_dir = models_dir
        self.device = device
        self.image_limits = image_limits or ImageLimits()
        self.rrf_k = rrf_k
        self.lexical_weight = lexical_weight
        self.title_boost = title_boost
        self.exact_subset_max = exact_subset_max
        self.verify_files = verify_files
        self.local_copies = local_copies
        self._serving: _Serving | None = None
        # Keyed by vector space (the model version, plus the precision when not fp32).
        self._embedders: dict[str, Embedder] = {}
        self.query_cache = QueryCache(query_cache)
        self.precision = parse_precision(precision).value
        # `_lock` guards the swap (and journal replays); `_loading` serialises version loads, which
        # take seconds to minutes and must not hold up queries or replays meanwhile.
        self._lock = threading.Lock()
        self._loading = threading.Lock()
        self._loader: threading.Thread | None = None
        self._loading_version: str | None = None
        # An active version that failed to load is not retried on every query (loading verifies
        # every file's sha256); the version serving before it keeps serving.
        self._failed: tuple[str, Exception, float] | None = None
        # Every query's model and ANN work goes through the batcher (one path: see `search`); it
        # batches only in servers (a model thread) with batching on, else it runs each job at once.
        batch_config = batching if batching is not None and model_thread is not None else BatchConfig(enabled=False)
        self._batcher = QueryBatcher(batch_config, run=model_thread.run if model_thread is not None else None)
        self.metadata = MetadataCache(store, metadata_cache_entries)
        self.results = ResultCache(result_cache_entries)
        # A running canary's candidate, once loaded (in the background, like an activation).
        self._canary: _Canary | None = None
        self._canary_loader: threading.Thread | None = None
        self._canary_failed: tuple[int, float] | None = None
        # The latest swap's warm-up and metadata refill (logs, tests, benchmarks).
        self.last_swap: dict | None = None

    def close(self) -> None:
        self._batcher.close()

    # ---------------------------------------------------------------- versions

    @property
    def ready(self) -> bool:
        return self._serving is not None

    @property
    def serving(self) -> _Serving:
        serving = self._serving
        if serving is None:
            raise NotReadyError("no index version is active yet: run `prism index CATALOG` first")
        return serving

    def embedder_for(self, model_version: str, precision: str = "fp32") -> Embedder:
        space = vector_space(model_version, precision)
        embedder = self._embedders.get(space)
        if embedder is None:
            record = self.store.get_model_version(model_version)
            if record is None:
                raise NotReadyError(f"model version {model_version!r} is not registered")
            models_dir = self._models_dir_for(model_version)
            load = lambda: load_embedder(  # noqa: E731
                record.spec, device=self.device, models_dir=models_dir, image_limits=self.image_limits,
                precision=precision,
            )
            if self.model_thread is None:
                embedder = load()
            else:
                # Loaded beside the model thread, which keeps answering queries meanwhile.
                embedder = self.model_thread.bind(self.model_thread.load(load))
            if embedder.name != model_version:
                raise NotReadyError(
                    f"model spec {record.spec!r} now loads as {embedder.name!r}, not {model_version!r}: "
                    "its weights changed since the index was built"
                )
            self._embedders[space] = embedder
        return embedder

    def _models_dir_for(self, model_version: str) -> Path | None:
        """Where to load a model version from: the replica's verified copy of a version published
        to the shared location, else `models_dir` itself (pretrained specs ignore it)."""
        if self.local_copies is None or self.models_dir is None:
            return self.models_dir
        published = Path(self.models_dir) / model_version
        if not (published / "model.json").is_file():
            return self.models_dir
        copy_version(published, self.local_copies / "models" / model_version)
        # An adapter version loads on top of its base version: the replica needs that one too.
        base = model_version_base(self.models_dir, model_version)
        if base is not None and (Path(self.models_dir) / base / "model.json").is_file():
            copy_version(Path(self.models_dir) / base, self.local_copies / "models" / base)
        return self.local_copies / "models"

    def refresh(self) -> bool:
        """Load the active index version if it differs from the one serving; True when swapped.

        The new version is fully loaded (its model ready, the change journal since its build
        replayed) before one reference assignment swaps it in, so a search in flight finishes on
        the version it started with. Synchronous: start-up, the activate route and the CLI call
        it; a serving replica's queries never do (see `sync`).
        """
        with self._loading:
            return self._load_active()

    def _load_active(self) -> bool:
        active = self.store.active_index_version()
        if active is None:
            return False
        current = self._serving
        if current is not None and current.version.index_version == active.index_version:
            return False
        if self._failed is not None and self._failed[0] == active.index_version:
            if time.monotonic() < self._failed[2] + FAILED_VERSION_RETRY_S:
                if current is None:
                    raise self._failed[1]
                return False
        self._loading_version = active.index_version
        try:
            version = self._load_version_files(active)
            precision = self._index_precision(version)
            embedder = self.embedder_for(version.model_version, precision)
        except Exception as exc:
            self._failed = (active.index_version, exc, time.monotonic())
            log.error(
                "cannot load index version %s (%s); %s", active.index_version, exc,
                f"still serving {current.version.index_version}" if current else "nothing is serving",
            )
            raise
        finally:
            self._loading_version = None
        loaded = self._start_serving(version, embedder)
        built_seq = int(version.manifest.get("catalog_seq", 0))
        self.store.follow_lexical(LexicalConfig.from_dict(version.manifest.get("lexical")))
        warm_ms, encoded = None, False
        if current is not None and self.model_thread is not None:
            warm_ms, encoded = self._warm(loaded, current)
        # Read before the swap, here on the loading thread: clearing the cache at the swap made
        # the first searches after it read their hits by SQL, inside their requests.
        refill = self.metadata.reread()
        # Before the swap, so whoever sees the new version serving also sees dropped copies gone.
        self._prune_local_copies(version, current.version if current else None)
        with self._lock:
            # Changes journaled while the version loaded: a short replay, then the swap.
            self._serving = self._replay(loaded)
        self._failed = None
        # What indexing wrote outside the journal (image states) serves with its version: the
        # records re-read above (after the activation, so after that indexing) replace the old.
        refilled = self.metadata.refill(refill)
        self.last_swap = {"index_version": version.index_version, "warm_ms": warm_ms, "warm_encoded": encoded,
                          "metadata_refilled": refilled}
        # Models no version serves any more would otherwise stay in memory, one per promotion;
        # their cached query vectors go with them.
        self._drop_unused_models()
        log.info(
            "serving index version %s (model %s, %d journaled changes replayed)",
            version.index_version, version.model_version, self._serving.overlay.seq - built_seq,
        )
        return True

    def _start_serving(self, version: LoadedIndexVersion, embedder: Embedder) -> _Serving:
        """A loaded index version ready to serve: its filters, its overlay, the journal replayed."""
        filters = FilterIndex.load(self.store.iter_filter_facts())
        # Products deleted after the build outside the journal (or before it existed) stay hidden;
        # only those the indexes hold need a mask, not every product ever deleted.
        indexed = {m: version.indexes[m].ids() for m in MODALITIES}
        extra = None
        if EXTRA_IMAGE_INDEX in version.indexes:
            extra = ExtraImages.load(version.indexes[EXTRA_IMAGE_INDEX], self.store)
            # A product whose other images are indexed is in the image leg's base even when its
            # first image is not: its deletion or change must be masked there as well.
            indexed["image"] = np.union1d(indexed["image"], extra.rows)
        tombstones = np.concatenate([ids[~filters.base_live(ids)] for ids in indexed.values()] or [np.zeros(0, np.int64)])
        overlay = Overlay.start(
            int(version.manifest.get("catalog_seq", 0)), embedder.dim, np.unique(tombstones), indexed=indexed
        )
        return self._replay(_Serving(version, embedder, overlay, filters, extra, ExtraOverlay(embedder.dim)))

    def _drop_unused_models(self) -> None:
        """Keep the models (and cached query vectors) of the serving version and a canary's only."""
        spaces = {s.embedder.vector_space for s in (self._serving, self._canary and self._canary.candidate) if s}
        self._embedders = {name: e for name, e in self._embedders.items() if name in spaces}
        self.query_cache.drop_spaces(spaces)

    # ---------------------------------------------------------------- canary

    def _sync_canary(self, mark: tuple | None, seq: int) -> None:
        """Follow the running canary (`mark`: id, candidate index version, fraction, the serving
        version it compares with): load a new one in the background, drop an ended one, replay
        catalog changes into the candidate as into the serving version."""
        loaded = self._canary
        if mark is None:
            if loaded is not None:
                with self._lock:
                    self._canary = None
                self._drop_unused_models()
                log.info("canary %d ended: its candidate %s is unloaded", loaded.canary_id,
                         loaded.candidate.version.index_version)
            return
        if loaded is None or loaded.canary_id != mark[0]:
            self._load_canary_in_background(mark)
            return
        if seq > loaded.candidate.overlay.seq:
            with self._lock:
                current = self._canary
                if current is not None and current.canary_id == loaded.canary_id and seq > current.candidate.overlay.seq:
                    self._canary = replace(current, candidate=self._replay(current.candidate))

    def _load_canary_in_background(self, mark: tuple) -> None:
        if self._canary_loader is not None and self._canary_loader.is_alive():
            return
        if self._canary_failed is not None and self._canary_failed[0] == mark[0]:
            if time.monotonic() < self._canary_failed[1] + FAILED_VERSION_RETRY_S:
                return

        def load() -> None:
            try:
                self.load_canary(mark)
            except Exception as exc:  # searches carry on uninterleaved
                self._canary_failed = (mark[0], time.monotonic())
                log.error("cannot load canary %d's candidate %s (%s); searches are not interleaved", mark[0], mark[1], exc)

        self._canary_loader = threading.Thread(target=load, name="prism-canary-loader", daemon=True)
        self._canary_loader.start()

    def load_canary(self, mark: tuple) -> None:
        """Load canary `mark`'s candidate index version and model, then interleave with it."""
        canary_id, index_version, fraction, serving_index_version = mark
        with self._loading:
            record = self.store.get_index_version(index_version)
            if record is None:
                raise NotReadyError(f"index version {index_version!r} is not recorded")
            version = self._load_version_files(record)
            embedder = self.embedder_for(version.model_version, self._index_precision(version))
            candidate = self._start_serving(version, embedder)
            with self._lock:
                self._canary = _Canary(canary_id, fraction, serving_index_version, candidate)
        self._canary_failed = None
        log.info("canary %d: interleaving %.1f%% of searches with %s (model %s)", canary_id, fraction * 100,
                 index_version, version.model_version)

    def wait_for_canary(self, canary_id: int, timeout_s: float = 120.0) -> bool:
        """Sync until canary `canary_id`'s candidate is loaded (True) or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sync()
            canary = self._canary
            if canary is not None and canary.canary_id == canary_id:
                return True
            time.sleep(0.05)
        return False

    def _canary_draw(self, serving: _Serving, query: SearchQuery, query_id: str,
                     session: str | None) -> tuple[_Canary, int] | None:
        """The canary this search is interleaved for and its coin flips' seed, or None
        (`search.interleave.search_draw`: by the session when the page gives one, else by search)."""
        canary = self._canary
        if canary is None or canary.serving_index_version != serving.version.index_version:
            return None
        # An in-memory image (no hash) is asked once: its own search is all there is to draw by.
        image = query_id if query.kind == "image" and query.image_hash is None else query.image_hash
        asked = repr((query.kind, query.text, image, query.similar_to, query.target.value, query.filters))
        draw, seed = search_draw(canary.canary_id, query_id=query_id, session=session, query=asked)
        return (canary, seed) if draw < canary.fraction else None

    def _warm(self, serving: _Serving, current: _Serving) -> tuple[float | None, bool]:
        """One text query through the new version's model and indexes before it is swapped in, on
        the model thread where queries will run: first calls allocate (torch's kernels and
        buffers for the shapes, FAISS's pages of a memory-mapped index), and that cost belongs to
        the load, not to the first shopper. Other queries wait for it once.

        A new index of the model already serving (`current`'s embedder: warm from its queries)
        is warmed with ANN searches alone. The encode would buy nothing, and it held every
        queued batch for one forward pass per activation (measured: the largest cost a swap
        put on the searches in flight). Returns (milliseconds on the model thread, encoded)."""
        encode = current.embedder is not serving.embedder

        def warm() -> float:
            started = time.perf_counter()
            if encode:
                vector = serving.embedder.encode_texts(["warm-up query"])
            else:
                # Any unit vector of the space: the ANN's first searches fault in its pages.
                vector = np.full((1, serving.embedder.dim), serving.embedder.dim ** -0.5, dtype=np.float32)
            for ann in serving.version.indexes.values():
                ann.search(vector, 10)
            return _ms(started)

        try:
            return self._batcher.run(warm), encode
        except Exception as exc:  # a version that cannot answer a query fails on its first real one instead
            log.warning("warming index version %s failed: %s", serving.version.index_version, exc)
            return None, encode

    def _index_precision(self, version: LoadedIndexVersion) -> str:
        """The precision queries to `version` are encoded at: the one its vectors were made at
        (versions built before precisions were recorded: fp32). Settings asking for another are
        logged, not followed."""
        built = str(version.manifest.get("precision", "fp32"))
        if built != self.precision:
            log.warning(
                "index version %s was built at %s precision; queries are encoded at %s too, not at the %s "
                "PRISM_ENCODER_PRECISION asks for (rebuild with `prism index --precision %s` to serve that)",
                version.index_version, built, built, self.precision, self.precision,
            )
        return built

    def _prune_local_copies(self, *in_use: LoadedIndexVersion | None) -> None:
        """A replica's copies of versions no longer recorded (retention dropped them) go: they can
        never be activated again. The versions in use (the one about to serve, the one serving
        until the swap) stay whatever the store says."""
        if self.local_copies is None:
            return
        using = [v for v in in_use if v is not None]
        recorded = {
            "indexes": {v.index_version for v in self.store.list_index_versions()} | {v.index_version for v in using},
            "models": {m.model_version for m in self.store.list_model_versions()} | {v.model_version for v in using},
        }
        for kind, keep in recorded.items():
            folder = self.local_copies / kind
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.is_dir() and not path.name.startswith(".") and path.name not in keep:
                    shutil.rmtree(path, ignore_errors=True)

    def _load_version_files(self, active) -> LoadedIndexVersion:
        path = index_version_path(self.indexes_dir, active.path)
        if self.local_copies is None:
            return load_index_version(path, verify=self.verify_files)
        local = self.local_copies / "indexes" / active.index_version
        copy_version(path, local)
        try:
            return load_index_version(local, verify=True)  # a copy is always checked
        except IndexVersionError:
            # A damaged copy (a full disk, a crash mid-copy on a filesystem without atomic
            # renames) is dropped, so the retry copies it again instead of failing forever.
            shutil.rmtree(local, ignore_errors=True)
            raise

    def _load_in_background(self) -> None:
        """Start loading the active version on a thread of its own, unless one is loading already."""
        if self._loader is not None and self._loader.is_alive():
            return

        def load() -> None:
            try:
                self.refresh()
            except Exception:
                pass  # logged by _load_active; the serving version carries on

        self._loader = threading.Thread(target=load, name="prism-version-loader", daemon=True)
        self._loader.start()

    def wait_until_serving(self, index_version: str, timeout_s: float = 120.0) -> bool:
        """Sync until `index_version` serves (True) or `timeout_s` passes (False): for callers that
        activated a version and must not answer before it serves (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sync()
            serving = self._serving
            if serving is not None and serving.version.index_version == index_version:
                return True
            time.sleep(0.05)
        return False

    def sync(self) -> None:
        """Catch up with the store: a newly activated version, and catalog changes since the last query.

        One small SQL round trip. Journal changes are applied before this returns (a PUT is
        searchable on the next query, in every worker). A newly activated version is loaded in
        the background (copied first on a replica) and swapped in when it is ready; queries carry
        on with the version serving until then. Only a process serving nothing loads it here.
        """
        active, seq, canary = self.store.serving_marks_and_canary()
        serving = self._serving
        if active is None:
            return
        if serving is None:
            self.refresh()
            return
        if active != serving.version.index_version:
            self._load_in_background()
        if seq > self.serving.overlay.seq:
            with self._lock:
                current = self._serving
                if seq > current.overlay.seq:
                    self._serving = self._replay(current)
        self._sync_canary(canary, seq)

    def catch_up(self, seq: int, metadata_written: ProductRecord | None = None) -> None:
        """Apply the journal up to at least `seq`, a change this process has just written, without
        polling the serving marks as `sync` does: an activation or a canary is noticed by the next
        query's `sync`, which runs before anything is served.

        `metadata_written`: the row as the write returned it, when that change is a "meta" entry.
        If it is the very next entry after this worker's overlay, it is applied from that row,
        reading nothing: journal entries commit in seq order (store `_serialise_journal`), so no
        other entry can lie between. Otherwise (a gap, another worker's entries first) the journal
        is replayed as `sync` replays it."""
        serving = self._serving
        if serving is None or seq <= serving.overlay.seq:
            return
        with self._lock:
            current = self._serving
            if seq <= current.overlay.seq:
                return
            if metadata_written is not None and seq == current.overlay.seq + 1:
                self._serving = self._applied_own_metadata(current, seq, metadata_written)
            else:
                self._serving = self._replay(current)

    def _applied_own_metadata(self, serving: _Serving, seq: int, product: ProductRecord) -> _Serving:
        """`serving` with one "meta" entry applied as `_replay` applies it (vectors and further
        images stay, the filters take the row as it is now, hits read it afresh), from `product`."""
        change = CatalogChangeRecord(seq=seq, row_id=product.row_id, product_id=product.product_id, op="meta",
                                     model_version=None, text_hash=None, text_vector=None, image_action=None,
                                     image_hash=None, image_vector=None, ts=product.updated_at)
        self.metadata.invalidate({product.row_id})
        overlay = serving.overlay.applied([change], lambda _: None)  # a meta entry carries no vectors
        return replace(serving, overlay=overlay, filters=serving.filters.patched(product_facts([product])))

    def _replay(self, serving: _Serving) -> _Serving:
        """`serving` with the journal entries after its overlay's seq applied (search/journal.py)."""
        changes = self.store.catalog_changes(serving.overlay.seq)
        if not changes:
            return serving
        # Hits read these rows afresh from now on, in this worker too (search/metadata.py).
        self.metadata.invalidate({c.row_id for c in changes})
        overlay, filters = replay_changes(
            self.store, changes, serving.embedder, serving.overlay, serving.filters,
            embeddings_dir=self.indexes_dir.parent / "embeddings",
        )
        extra_overlay = serving.extra_overlay
        if extra_overlay is not None:
            extra_overlay = extra_overlay.applied(changes, self.store, serving.embedder.vector_space,
                                                  self.indexes_dir.parent / "embeddings" / serving.embedder.vector_space)
        return replace(serving, overlay=overlay, filters=filters, extra_overlay=extra_overlay)

    # ---------------------------------------------------------------- search

    def search(
        self,
        *,
        text: str | None = None,
        image: ImageSource | None = None,
        similar_to: str | None = None,
        target: Target | str = Target.IMAGE,
        k: int = 10,
        offset: int = 0,
        filters: ProductFilter | None = None,
        facets: Sequence[str] = (),
        session: str | None = None,
    ) -> SearchResult:
        """One query: exactly one of `text`, `image` or `similar_to` (a product id: "more like this").
        `facets`: names to count values of over every product the filters match (see
        `FilterIndex.facets`), at most MAX_FACETS names and MAX_FACET_VALUES values each.

        Every query takes the same path, each stage timed here into `timings_ms` (the API adds
        `log`; /metrics has them as prism_search_stage_seconds):

        1. sync      catch up with the store: journal entries since the last query, a newly
                     activated version (loaded in the background, swapped by reference)
        2. filter    the rows the filters allow (FilterIndex); `facets` when asked for
        3. prepare   what the query is and where its vector comes from (`_prepare`): the query
                     cache, a product's own vector, or the encoder; image bytes are decoded here,
                     on the request's thread; a text query's exact-identifier and lexical SQL
        4. queue, encode, ann
                     on the model thread, through the batcher (search/batcher.py): a vector to
                     encode joins a micro-batch of concurrent queries of its kind; a known vector
                     goes straight to the ANN search (`_ranked`)
        5. canary    a search a running canary draws (`session`: the client's id of a shopper's
                     visit) is ranked by the candidate too, alone, and the two rankings are
                     interleaved (team draft); each hit's arm is logged with the search
        6. metadata  the page's product records, from the journal-current MetadataCache
        """
        started = time.perf_counter()
        target = _parse_target(target)
        _validate(text, image, similar_to, k, offset)
        _validate_facets(facets)
        filters = filters or ProductFilter()
        timer = _StageTimer()
        query_id = uuid.uuid4().hex
        # Announced from the start, so that forming batches wait for this query's encode; a query
        # whose vector is known already (a cached text, "similar") holds none up.
        with self._batcher.expecting(self._may_join_batch(text, image)) as submit:
            with timer("sync"):
                self.sync()
                serving = self.serving
            with timer("filter"):
                allowed = None if filters.is_empty() else serving.filters.allowed(filters)
            counted = None
            if facets:
                with timer("facets"):
                    counted = serving.filters.facets(filters, list(dict.fromkeys(facets)), limit=MAX_FACET_VALUES)
            # A repeated text query over an unchanged catalog (search/results.py): the page ranked
            # before, with no SQL, no model-thread hop and no ANN search.
            slot = self._result_slot(serving, text, target, k, offset, filters)
            ranked = None if slot is None else self.results.get(*slot)
            if ranked is not None:
                plan = _Plan(SearchQuery("text", target, k, offset, filters, text=text.strip()))
                drawn, arms = None, None
            else:
                with timer("prepare"):
                    plan = self._prepare(serving, text, image, similar_to, SearchQuery(
                        "text" if text is not None else "image" if image is not None else "product",
                        target, k, offset, filters,
                    ), allowed)

                drawn = self._canary_draw(serving, plan.query, query_id, session)
                candidate_search = None if drawn is None else self._candidate_search(
                    drawn[0].candidate, plan, target, offset + k, filters)
                if candidate_search is None:
                    drawn = None

                def rank(vector: np.ndarray) -> list[tuple[int, float, dict]]:
                    with timer("ann"):
                        return self._ranked(serving, target, vector, offset + k, allowed, plan.exclude, plan.lexical, plan.pinned)

                if plan.vector is not None:
                    ranked = self._batcher.run(lambda: rank(plan.vector))
                else:
                    # An interleaved search encodes twice, once per arm's model: neither joins a batch.
                    ranked, batch = submit(serving.embedder, plan.payload, lambda vector: rank(plan.remember(vector)),
                                           kind=plan.query.kind, alone=drawn is not None)
                    timer.record("queue", batch.queued_ms)
                    timer.record("encode", batch.encode_ms)  # a batch's encode is shared by its queries
                arms = None
                if drawn is not None:
                    with timer("canary"):
                        ranked, arms = _interleaved(ranked, self._batcher.run(candidate_search), offset + k, drawn[1])
                if slot is not None and drawn is None:
                    self.results.put(*slot, ranked)
        with timer("metadata"):
            hits, hit_arms = self._hits(ranked[offset : offset + k], offset, None if arms is None else arms[offset : offset + k])

        return SearchResult(
            query_id=query_id,
            model_version=serving.version.model_version,
            index_version=serving.version.index_version,
            took_ms=_ms(started),
            hits=hits,
            timings_ms=timer.timings,
            query=plan.query,
            facets=counted,
            canary_id=drawn[0].canary_id if drawn is not None else None,
            arms=hit_arms,
        )

    def _candidate_search(self, candidate: _Serving, plan: _Plan, target: Target, want: int, filters: ProductFilter):
        """A function that ranks the query with the canary's candidate (on the model thread), or
        None when the candidate cannot (a product missing from its index: served uninterleaved).
        The lexical leg and pinned identifiers are the database's, the same for both arms."""
        embedder, query = candidate.embedder, plan.query
        if query.kind == "text":
            cached, remember = self._cached_query(embedder, "text", embedder.query_text_key(query.text))
            encode = lambda: cached if cached is not None else remember(embedder.encode_texts([query.text]))  # noqa: E731
        elif query.kind == "image":
            cached, remember = (None, lambda vector: vector) if query.image_hash is None else \
                self._cached_query(embedder, "image", query.image_hash)
            image = plan.image if isinstance(plan.image, Image.Image) else None

            def encode():
                if cached is not None:
                    return cached
                decoded = image if image is not None else decode_image(plan.image, self.image_limits)
                return remember(embedder.encode_images([decoded]))
        else:
            try:
                _, vector, _ = self._product_vector(candidate, query.similar_to)
            except QueryError:
                return None
            encode = lambda: vector  # noqa: E731
        allowed = None if filters.is_empty() else candidate.filters.allowed(filters)
        return lambda: self._ranked(candidate, target, encode(), want, allowed, plan.exclude, plan.lexical, plan.pinned)

    def _prepare(self, serving: _Serving, text, image, similar_to, query: SearchQuery, allowed) -> "_Plan":
        """The query as logged, and its vector (known) or what to encode; the lexical legs."""
        if text is not None:
            text = text.strip()
            pinned, lexical = self._lexical(text, query.target, allowed)
            cached, remember = self._cached_query(serving.embedder, "text", serving.embedder.query_text_key(text))
            return _Plan(replace(query, text=text), vector=cached, payload=text, remember=remember,
                         pinned=pinned, lexical=lexical)
        if image is not None:
            data = image if isinstance(image, Image.Image) else read_image_bytes(image, self.image_limits)
            image_hash = content_hash(data) if isinstance(data, bytes) else None
            query = replace(query, image_hash=image_hash)
            if image_hash is None:
                cached, remember = None, lambda vector: vector
            else:
                cached, remember = self._cached_query(serving.embedder, "image", image_hash)
            # Decoded here, on the request's thread (many at once); the model thread preprocesses and encodes.
            decoded = decode_image(data, self.image_limits) if cached is None else None
            return _Plan(query, vector=cached, payload=decoded, remember=remember, image=data)
        product, vector, modality = self._product_vector(serving, similar_to)
        query = replace(query, image_hash=product.image_hash if modality == "image" else None, similar_to=similar_to)
        return _Plan(query, vector=vector, exclude=np.asarray([product.row_id], dtype=np.int64))

    def _hits(self, page: list[tuple[int, float, dict]], offset: int,
              arms: list[str] | None = None) -> tuple[list[SearchHit], list[str] | None]:
        """The page's hits, and each one's canary arm when the ranking was interleaved."""
        products = self.metadata.products(row for row, _, _ in page)
        matched = self._matched_images(page, products)
        hits, hit_arms = [], []
        for position, (row, score, parts) in enumerate(page):
            product = products.get(row)
            if product is None or product.deleted_at is not None:
                continue  # deleted between the ANN step and the fetch
            scores = {name: value for name, value in parts.items() if name != _MATCHED}
            hits.append(SearchHit(product, float(score), offset + len(hits) + 1, scores, matched.get(row)))
            if arms is not None:
                hit_arms.append(arms[position])
        return hits, (hit_arms if arms is not None else None)

    def _result_slot(self, serving: _Serving, text, target: Target, k: int, offset: int,
                     filters: ProductFilter) -> tuple[tuple, tuple] | None:
        """(catalog state, key) of a text query's page in the result cache, or None where the cache
        does not apply: not a text query, the cache off, or a canary loaded (its searches may be
        interleaved, and an interleaved page is drawn per search)."""
        if text is None or not self.results.enabled or self._canary is not None:
            return None
        state = (serving.version.index_version, serving.overlay.seq)
        return state, (text.strip(), target.value, k, offset, filters)

    def _may_join_batch(self, text, image) -> bool:
        """Whether a query will (probably) be encoded in a batch: a text whose vector is not cached,
        or an image (whose cache key is known only once its bytes are read)."""
        if not self._batcher.enabled:
            return False
        return image is not None or (text is not None and not self._text_cached(text))

    def _text_cached(self, text: str) -> bool:
        """Whether the serving model's vector of `text` is cached: such a query is not announced to
        the batcher, so forming batches do not wait for a query that will never join them."""
        serving = self._serving
        if serving is None or not self.query_cache.enabled:
            return False
        embedder = serving.embedder
        return self.query_cache.holds(embedder.vector_space, "text", embedder.query_text_key(text.strip()))

    def _cached_query(self, embedder: Embedder, kind: str, key: str):
        """(the cached vector or None, a function that caches a freshly encoded vector and returns it)."""
        space = embedder.vector_space
        found = self.query_cache.get(space, kind, key)

        def remember(vector: np.ndarray) -> np.ndarray:
            self.query_cache.put(space, kind, key, vector)
            return vector

        return found, remember

    def _product_vector(self, serving: _Serving, product_id: str) -> tuple[ProductRecord, np.ndarray, str]:
        """A product's own vector as a query: its image if it has one, else its text."""
        product = self.store.get_product(product_id)
        if product is None:
            raise ProductNotFoundError(f"no product {product_id!r}")
        row = product.row_id
        for modality in MODALITIES:
            vector = serving.overlay.vector(modality, row)
            if vector is None and not serving.overlay.is_masked(modality, row):
                ann = serving.version.indexes[modality]
                ids = ann.ids()
                pos = int(np.searchsorted(ids, row))
                if pos < len(ids) and ids[pos] == row:
                    vector = ann.reconstruct(np.asarray([row]))[0]
            if vector is not None:
                return product, np.asarray(vector, dtype=np.float32).reshape(1, -1), modality
        raise QueryError(f"product {product_id!r} is not in the serving index yet")

    def _lexical(self, text: str, target: Target, allowed) -> tuple[list[int], list[tuple[int, float]] | None]:
        """(rows whose exact identifier the query is, the lexical leg's (row, score) for a hybrid
        query or None), both within the filter."""
        # The filter's IdSet answers membership from the bitmap its ANN search uses too.
        pinned = self.store.identifier_rows(text)
        if allowed is not None and pinned:
            pinned = [r for r, inside in zip(pinned, allowed.contains(np.asarray(pinned, dtype=np.int64))) if inside]
        if target is not Target.HYBRID or len(text) > MAX_LEXICAL_QUERY_CHARS:
            return pinned, None
        depth = LEXICAL_DEPTH
        while True:
            found = self.store.lexical_search(text, limit=depth)
            if allowed is None or not found:
                return pinned, found
            rows = np.asarray([row for row, _ in found], dtype=np.int64)
            lexical = [pair for pair, inside in zip(found, allowed.contains(rows)) if inside]
            if len(lexical) >= LEXICAL_DEPTH or len(found) < depth or depth >= LEXICAL_FILTERED_DEPTH:
                return pinned, lexical[:LEXICAL_DEPTH]
            depth = min(depth * 8, LEXICAL_FILTERED_DEPTH)

    def _ranked(self, serving, target, query, want, allowed, exclude, lexical=None, pinned=()) -> list[tuple[int, float, dict]]:
        """The first `want` entries of the query's one ranking, from which every page is cut.

        An approximate search at a greater depth can find a candidate that a shallower one
        missed and rank it above results a previous page already showed; page 2 would then repeat
        an item of page 1. So the ranking is built depth by depth (RANKING_DEPTHS): positions up
        to each depth are fixed by the search at that depth, and a deeper search only appends
        what it adds after them. Every page of a query (same version, same catalog state) is
        then a slice of the same list, and ties are broken by row id at every step.
        """
        ranked: list[tuple[int, float, dict]] = []
        seen: set[int] = set()
        if pinned:
            # Exact identifier matches come first, scored above anything the target can score.
            top = 1.0 if target is not Target.HYBRID else self._hybrid_ceiling()
            for row in pinned:
                if row not in seen and row not in exclude:
                    seen.add(row)
                    ranked.append((row, top, {"exact": 1.0}))
        for depth in RANKING_DEPTHS:
            if target is Target.HYBRID:
                found = self._hybrid(serving, query, depth, allowed, exclude, lexical)
            else:
                found = self._single(serving, target.value, query, depth, allowed, exclude)
            for entry in found:
                if len(ranked) >= depth + len(pinned):
                    break
                if entry[0] not in seen:
                    seen.add(entry[0])
                    ranked.append(entry)
            if depth >= want or len(found) < depth:  # deep enough, or nothing more qualifies
                break
        return ranked[:want]

    def _candidates(self, serving, modality, query, want, allowed, exclude) -> list[tuple[int, float]]:
        """Top `want` (row, cosine) from the base index and the overlay, merged."""
        overlay = serving.overlay
        ann = serving.version.indexes[modality]
        # `exclude` (the product a "similar" query starts from) is a few ids: fetched past and
        # dropped here, so the base search keeps the overlay's cached mask as its only exclusion.
        scores, ids = ann.search(
            query, want + len(exclude), allowed=allowed, excluded=overlay.masked(modality),
            exact_subset_max=self.exact_subset_max,
        )
        found = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0 and i not in exclude]
        found += overlay.search(modality, query, want, allowed=allowed, excluded=exclude)
        found.sort(key=lambda pair: (-pair[1], pair[0]))
        return found[:want]

    def _image_candidates(self, serving, query, want, allowed, exclude) -> list[tuple[int, float, int]]:
        """Top `want` (row, cosine, image id) of the image leg: each product by its best image, its
        first (image id 0: the `image` index and the overlay) or another (`image_extra`)."""
        first = [(i, s, 0) for i, s in self._candidates(serving, "image", query, want, allowed, exclude)]
        others = []
        if serving.extra is not None:
            others += serving.extra.search(query, want, allowed=allowed, masked_rows=serving.overlay.masked("image"),
                                           exclude_rows=exclude, exact_subset_max=self.exact_subset_max)
        if serving.extra_overlay is not None:
            others += serving.extra_overlay.search(query, want, allowed=allowed, exclude_rows=exclude)
        if not others:
            return first
        best: dict[int, tuple[int, float, int]] = {}
        for entry in first + others:
            if entry[0] not in best or entry[1] > best[entry[0]][1]:
                best[entry[0]] = entry
        return sorted(best.values(), key=lambda e: (-e[1], e[0]))[:want]

    def _leg(self, serving, modality, query, want, allowed, exclude) -> list[tuple[int, float, dict]]:
        """A vector leg's ranking as (row, cosine, parts); the image leg's parts name the image."""
        if modality == "image":
            return [(i, s, {"image": s, _MATCHED: m}) for i, s, m in
                    self._image_candidates(serving, query, want, allowed, exclude)]
        return [(i, s, {modality: s}) for i, s in self._candidates(serving, modality, query, want, allowed, exclude)]

    def _matched_images(self, page, products: dict[int, ProductRecord]) -> dict[int, ProductImageRecord]:
        """row -> the image its image-leg score is of, for the rows of a page the image leg ranked."""
        wanted = {row: parts[_MATCHED] for row, _, parts in page if _MATCHED in parts}
        others = self.store.images_by_ids({i for i in wanted.values() if i}) if any(wanted.values()) else {}
        out: dict[int, ProductImageRecord] = {}
        for row, image_id in wanted.items():
            product = products.get(row)
            if product is None:
                continue
            if image_id:
                if image_id in others:
                    out[row] = others[image_id]
            elif product.image_uri or product.image_hash:
                out[row] = ProductImageRecord(0, row, 0, product.image_ref, product.image_uri, product.image_hash,
                                              product.image_status, product.image_error)
        return out

    def _single(self, serving, modality, query, want, allowed, exclude) -> list[tuple[int, float, dict]]:
        return self._leg(serving, modality, query, want, allowed, exclude)

    def _hybrid(self, serving, query, want, allowed, exclude, lexical=None) -> list[tuple[int, float, dict]]:
        depth = max(want, 50)
        fused: dict[int, float] = {}
        parts: dict[int, dict[str, float]] = {}
        for modality in MODALITIES:
            for rank, (i, s, leg) in enumerate(self._leg(serving, modality, query, depth, allowed, exclude), start=1):
                fused[i] = fused.get(i, 0.0) + 1.0 / (self.rrf_k + rank)
                parts.setdefault(i, {}).update(leg)
        for rank, (i, s) in enumerate(lexical or (), start=1):
            if i in exclude:
                continue
            fused[i] = fused.get(i, 0.0) + self.lexical_weight / (self.rrf_k + rank)
            parts.setdefault(i, {})["lexical"] = s
            if s >= LEXICAL_NAME:
                fused[i] += self.title_boost / (self.rrf_k + 1)
        order = sorted(fused, key=lambda i: (-fused[i], i))[:want]
        return [(i, fused[i], parts[i]) for i in order]

    def _hybrid_ceiling(self) -> float:
        """The highest fused score a hybrid ranking can give: what an exact identifier match scores."""
        return (len(MODALITIES) + self.lexical_weight + self.title_boost) / (self.rrf_k + 1)

    # ---------------------------------------------------------------- introspection

    def stats(self) -> dict:
        """Sizes of what is serving, for metrics and /readyz."""
        serving = self._serving
        if serving is None:
            return {}
        return {
            "index_version": serving.version.index_version,
            "model_version": serving.version.model_version,
            "loading_index_version": self._loading_version,
            "catalog_seq": serving.overlay.seq,
            "vectors": {m: serving.version.indexes[m].ntotal for m in MODALITIES},
            "overlay_vectors": {m: serving.overlay.count(m) for m in MODALITIES},
            "masked": {m: int(len(serving.overlay.masked(m))) for m in MODALITIES},
            "filter_changed_rows": serving.filters.changed_rows,
            "encoder_precision": serving.embedder.precision,
            "index_precision": str(serving.version.manifest.get("precision", "fp32")),
            "canary": None if self._canary is None else {
                "id": self._canary.canary_id, "candidate_index_version": self._canary.candidate.version.index_version,
                "fraction": self._canary.fraction,
            },
        }

    def query_cache_stats(self) -> dict:
        """The query-vector cache's bounds, size and hit and miss counts (metrics, GET /v1/models)."""
        return self.query_cache.stats()


def _interleaved(ours, theirs, depth: int, seed: int) -> tuple[list, list[str]]:
    """The team-draft interleaving of two (row, score, parts) rankings, and each entry's arm."""
    by_arm = ({entry[0]: entry for entry in ours}, {entry[0]: entry for entry in theirs})
    merged = team_draft([e[0] for e in ours], [e[0] for e in theirs], depth, seed)
    return [by_arm[arm][row] for row, arm in merged], [ARM_NAMES[arm] for _, arm in merged]


def _parse_target(target: Target | str) -> Target:
    if isinstance(target, Target):
        return target
    try:
        return Target(target)
    except ValueError:
        raise QueryError(f"unknown target {target!r}: use image, text or hybrid") from None


def _validate(text, image, similar_to, k, offset) -> None:
    if sum(x is not None for x in (text, image, similar_to)) != 1:
        raise QueryError("give exactly one of a text query, an image query or a product to find similar ones to")
    if text is not None:
        if not text.strip():
            raise QueryError("the text query is empty")
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(f"the text query is {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
    if not 1 <= k <= MAX_K:
        raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
    if not 0 <= offset <= MAX_OFFSET:
        raise QueryError(f"offset must be between 0 and {MAX_OFFSET}, got {offset}")
    if offset + k > MAX_RESULT_WINDOW:
        raise QueryError(
            f"offset + k is {offset + k}; results are served to a depth of {MAX_RESULT_WINDOW}: "
            "narrow the query or its filters instead of paging further"
        )


def _validate_facets(facets: Sequence[str]) -> None:
    if len(facets) > MAX_FACETS:
        raise QueryError(f"{len(facets)} facets asked for; the limit is {MAX_FACETS}")
    for name in facets:
        if name not in FACET_NAMES and not (name.startswith("attributes.") and len(name) > len("attributes.")):
            raise QueryError(f"unknown facet {name!r}: use {', '.join(FACET_NAMES)} or attributes.NAME")


FACET_NAMES = ("category", "brand", "in_stock")


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 3)
