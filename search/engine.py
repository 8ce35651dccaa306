"""The query engine: one active index version, any query modality, filters, hybrid fusion.

Routing:
    text  query, target=image   text->image   (cross-modal, the main use)
    text  query, target=text    text->text
    image query, target=image   image->image
    image query, target=text    image->text
    either,      target=hybrid  both indexes, fused by reciprocal rank fusion

Hybrid fusion: each index returns its ranked candidates; a product's fused score is
sum over indexes of 1 / (rrf_k + rank), with rank starting at 1 and rrf_k = 60 (Cormack et al.).
RRF needs no calibration between the very different cosine ranges of same-modal and cross-modal
matches; the per-index cosines are returned alongside in `scores`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from embedder import Embedder, ImageSource, load_embedder
from indexer import LoadedIndexVersion, load_index_version
from store import ProductFilter, ProductRecord, Store

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_OFFSET = 10_000
MAX_QUERY_CHARS = 2000


class Target(str, Enum):
    IMAGE = "image"
    TEXT = "text"
    HYBRID = "hybrid"


class QueryError(ValueError):
    """The query itself is wrong (maps to HTTP 4xx / CLI exit 2)."""


class NotReadyError(RuntimeError):
    """No index version is active yet."""


@dataclass
class SearchHit:
    product: ProductRecord
    score: float
    rank: int
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchResult:
    query_id: str
    model_version: str
    index_version: str
    took_ms: float
    hits: list[SearchHit]
    timings_ms: dict[str, float]
    query_kind: str  # "text" | "image"
    target: Target


@dataclass
class _Serving:
    version: LoadedIndexVersion
    embedder: Embedder


class SearchEngine:
    def __init__(
        self,
        store: Store,
        *,
        models_dir: Path | None = None,
        device: str = "auto",
        rrf_k: int = 60,
        exact_subset_max: int = 4096,
        verify_files: bool = True,
    ):
        self.store = store
        self.models_dir = models_dir
        self.device = device
        self.rrf_k = rrf_k
        self.exact_subset_max = exact_subset_max
        self.verify_files = verify_files
        self._serving: _Serving | None = None
        self._embedders: dict[str, Embedder] = {}
        self._swap_lock = threading.Lock()

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

    def embedder_for(self, model_version: str) -> Embedder:
        embedder = self._embedders.get(model_version)
        if embedder is None:
            record = self.store.get_model_version(model_version)
            if record is None:
                raise NotReadyError(f"model version {model_version!r} is not registered")
            embedder = load_embedder(record.spec, device=self.device, models_dir=self.models_dir)
            if embedder.name != model_version:
                raise NotReadyError(
                    f"model spec {record.spec!r} now loads as {embedder.name!r}, not {model_version!r}: "
                    "its weights changed since the index was built"
                )
            self._embedders[model_version] = embedder
        return embedder

    def refresh(self) -> bool:
        """Load the active index version if it differs from the one serving; True when swapped.

        The new version is fully loaded (and its model ready) before one reference assignment
        swaps it in, so a search in flight finishes on the version it started with.
        """
        with self._swap_lock:
            active = self.store.active_index_version()
            if active is None:
                return False
            current = self._serving
            if current is not None and current.version.index_version == active.index_version:
                return False
            version = load_index_version(active.path, verify=self.verify_files)
            embedder = self.embedder_for(version.model_version)
            self._serving = _Serving(version, embedder)
            log.info("serving index version %s (model %s)", version.index_version, version.model_version)
            return True

    # ---------------------------------------------------------------- search

    def search(
        self,
        *,
        text: str | None = None,
        image: ImageSource | None = None,
        target: Target | str = Target.IMAGE,
        k: int = 10,
        offset: int = 0,
        filters: ProductFilter | None = None,
    ) -> SearchResult:
        started = time.perf_counter()
        target = _parse_target(target)
        _validate(text, image, k, offset)
        serving = self.serving
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        if text is not None:
            query = serving.embedder.encode_texts([text.strip()])
        else:
            query = serving.embedder.encode_images([image])
        timings["encode"] = _ms(t0)

        t0 = time.perf_counter()
        filters = filters or ProductFilter()
        allowed = None if filters.is_empty() else self.store.filter_row_ids(filters)
        excluded = self.store.deleted_row_ids()
        timings["filter"] = _ms(t0)

        t0 = time.perf_counter()
        want = offset + k
        if target is Target.HYBRID:
            ranked = self._hybrid(serving, query, want, allowed, excluded)
        else:
            ranked = self._single(serving, target.value, query, want, allowed, excluded)
        timings["ann"] = _ms(t0)

        t0 = time.perf_counter()
        page = ranked[offset : offset + k]
        products = self.store.products_by_row_ids([row for row, _, _ in page])
        hits = []
        for row, score, parts in page:
            product = products.get(row)
            if product is None or product.deleted_at is not None:
                continue  # deleted between the ANN step and the fetch
            hits.append(SearchHit(product, float(score), offset + len(hits) + 1, parts))
        timings["metadata"] = _ms(t0)

        return SearchResult(
            query_id=uuid.uuid4().hex,
            model_version=serving.version.model_version,
            index_version=serving.version.index_version,
            took_ms=_ms(started),
            hits=hits,
            timings_ms=timings,
            query_kind="text" if text is not None else "image",
            target=target,
        )

    def _single(self, serving, modality, query, want, allowed, excluded) -> list[tuple[int, float, dict]]:
        ann = serving.version.indexes[modality]
        scores, ids = ann.search(query, want, allowed=allowed, excluded=excluded, exact_subset_max=self.exact_subset_max)
        return [(int(i), float(s), {modality: float(s)}) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def _hybrid(self, serving, query, want, allowed, excluded) -> list[tuple[int, float, dict]]:
        depth = max(want, 50)
        fused: dict[int, float] = {}
        parts: dict[int, dict[str, float]] = {}
        for modality, ann in serving.version.indexes.items():
            scores, ids = ann.search(query, depth, allowed=allowed, excluded=excluded, exact_subset_max=self.exact_subset_max)
            for rank, (s, i) in enumerate(((s, i) for s, i in zip(scores[0], ids[0]) if i >= 0), start=1):
                fused[int(i)] = fused.get(int(i), 0.0) + 1.0 / (self.rrf_k + rank)
                parts.setdefault(int(i), {})[modality] = float(s)
        order = sorted(fused, key=lambda i: (-fused[i], i))[:want]
        return [(i, fused[i], parts[i]) for i in order]


def _parse_target(target: Target | str) -> Target:
    if isinstance(target, Target):
        return target
    try:
        return Target(target)
    except ValueError:
        raise QueryError(f"unknown target {target!r}: use image, text or hybrid") from None


def _validate(text, image, k, offset) -> None:
    if (text is None) == (image is None):
        raise QueryError("give exactly one of a text query or an image query")
    if text is not None:
        if not text.strip():
            raise QueryError("the text query is empty")
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(f"the text query is {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
    if not 1 <= k <= MAX_K:
        raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
    if not 0 <= offset <= MAX_OFFSET:
        raise QueryError(f"offset must be between 0 and {MAX_OFFSET}, got {offset}")


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 3)
