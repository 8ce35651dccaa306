"""FAISS indexes for one modality: chosen by size, tuned at build time, searched with filters.

- fewer than `flat_threshold` vectors: exact inner-product search (IndexIDMap2 over IndexFlatIP);
- more: a 4-bit fast-scan IVF-PQ for candidates (`IVF{nlist}[_HNSW32],PQ{d/4}x4fsr`, an HNSW
  graph over the centroids from 4,096 lists), re-ranked with a compact code of what the PQ code
  misses (IVFADC+R, Jegou et al. 2011): per vector, the residual x - reconstruction(IVF-PQ code)
  is scalar-quantised (8 bits a dimension, 6 from `compact_threshold` vectors, with ranges from
  the 0.1% quantiles). Because the residual is much smaller than x, 6 bits of it re-rank better
  than 6 bits of x: on 1M CLIP-shaped vectors recall@10 0.961, at 0.23 x the bytes of the float
  vectors (64 B of PQ codes, 384 B of residual codes and 8 B of id a vector, against 2,048).
  A candidate's score q.(b + r) takes q.b from the scan's distance and a stored |b|^2 (4 B a
  vector), so only the residual codes are decoded (`AnnIndex._rerank`).
  `nprobe` and the re-rank depth are the cheapest (by a cost model, see `AnnIndex._tune`) whose
  end-to-end recall@10 against exact search on held-out queries reaches `recall_target`.
- builds read their vectors from a `VectorSource` a chunk at a time (`build_from`): memory grows
  with the codes, not with the float vectors.
  The same steps (`train_ivfpq`, `add_positions`, `AnnIndex.from_training`) run the adds as
  parallel tasks on a Ray cluster in `indexer.ray_build`.

FAISS ids are the products' stable row ids (an IndexIDMap over the IVF); inside, the IVF and the
re-rank codes share one position per vector, kept in the same index version.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from indexer.faiss_import import gpu_count, import_faiss
from indexer.memory import release_freed_memory

log = logging.getLogger(__name__)

# Searches of fewer queries than this run on one thread (see AnnIndex.search).
SINGLE_THREAD_BELOW = 4
# While a filter and the deletion mask leave at least this share of an IVF index, candidates are
# fetched past the rest and dropped after the scan (a selector costs the fast-scan more; see
# `AnnIndex._search_post_filtered`); narrower filters use a selector, the narrowest exact search.
POST_FILTER_MIN_KEPT_SHARE = 0.02
# 4: the base codes' squared norms stored (`<name>.norms.npy`); 3 (4-bit fast-scan IVF-PQ, norms
# decoded on load) and 2 (8-bit IVF-PQ on inner product, needs none) load; 1 (exact re-rank store)
# must be rebuilt.
INDEX_FORMAT = 4
READABLE_FORMATS = (2, 3, 4)


@dataclass(frozen=True)
class AnnConfig:
    flat_threshold: int = 20_000
    # From this many vectors, re-rank codes get 6 bits a dimension instead of 8 (PRISM_RERANK_COMPACT_FROM).
    compact_threshold: int = 500_000
    recall_target: float = 0.95
    rerank_factors: tuple[int, ...] = (4, 8, 16, 32)  # candidates per result before re-rank (tuned)
    tuning_queries: int = 500
    kmeans_iterations: int = 20
    train_points_per_list: int = 64
    max_train_points: int = 200_000
    max_nlist: int = 16_384
    hnsw_quantizer_from: int = 4_096  # lists; below, the exact (flat) coarse quantizer is cheap
    # How widely an add walks the HNSW coarse quantizer for each vector's list: most of a large
    # add's time. benchmarks/ann_add_search.py, 2.2M vectors in 4,096 lists: 64 -> 32 took the add
    # from 111 to 77 s for recall@10 0.9456 -> 0.9442 at a fixed nprobe; 16 saved 6 s more for
    # another -0.0014 (a misplaced vector is missed unless queries probe more lists).
    add_ef_search: int = 32
    add_chunk: int = 65_536  # vectors read, encoded and added at a time
    # A filter this selective is searched exactly over its members instead of through the ANN index.
    exact_subset_max: int = 4096
    use_gpu: bool | None = None  # None: use a GPU when faiss sees one
    seed: int = 0


@dataclass
class AnnInfo:
    kind: str  # flat | ivfpq
    factory: str
    count: int
    dim: int
    nlist: int = 0
    nprobe: int = 0
    rerank_store: str | None = None  # the residual codec, e.g. "residual-SQ6"
    rerank_factor: int = 0
    recall_at_10: float = 1.0
    tuning: dict = field(default_factory=dict)
    build_seconds: float = 0.0
    trained_on_gpu: bool = False
    format: int = INDEX_FORMAT

    def to_dict(self) -> dict:
        return asdict(self)


def _normalised_copy(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class AnnPlan:
    kind: str  # flat | ivfpq
    factory: str = "Flat"
    nlist: int = 0
    refine_codec: str = ""


def plan_factory(n: int, d: int, config: AnnConfig) -> AnnPlan:
    """The index for n vectors of dimension d."""
    if n < config.flat_threshold:
        return AnnPlan("flat")
    # ~2 sqrt(n) lists (a power of two): fewer codes scanned per probe than sqrt(n), while the
    # k-means on a sample stays minutes, not hours, on a small host.
    nlist = 2 ** round(math.log2(2 * math.sqrt(n)))
    nlist = int(max(16, min(nlist, n // 39, config.max_nlist)))
    # From a few thousand lists, finding the nearest ones exactly costs more than scanning them:
    # an HNSW graph over the centroids answers in a few hundred distance computations.
    quantizer = "_HNSW32" if nlist >= config.hnsw_quantizer_from else ""
    # 4-bit PQ codes scanned with SIMD lookup tables ("fast-scan"), 4 dims per sub-quantizer (2
    # for small vectors). Measured on 1M CLIP-shaped vectors: d/8 sub-quantizers leave a residual
    # of norm 0.46 that 6-bit re-rank codes cannot rank above recall@10 0.94; d/4 leave 0.38, 0.96.
    per = 4 if d > 128 else 2
    m = next(c for c in (d // per, d // 2, d) if c > 0 and d % c == 0 and c % 2 == 0)
    return AnnPlan("ivfpq", f"IVF{nlist}{quantizer},PQ{m}x4fsr", nlist, refine_codec(n, config))


def refine_codec(n: int, config: AnnConfig) -> str:
    return "SQ6" if n >= config.compact_threshold else "SQ8"


class VectorSource(Protocol):
    """Vectors to index, read by position (0..len(ids)-1) a chunk at a time."""

    @property
    def ids(self) -> np.ndarray: ...

    @property
    def dim(self) -> int: ...

    def read(self, positions: np.ndarray) -> np.ndarray: ...


class IdSet:
    """Sorted unique ids, with a bitmap for FAISS selectors made once per set.

    Filters and deletion masks are immutable snapshots that many queries reuse: a selector over a
    cached bitmap costs nothing per query, where an `IDSelectorBatch` hashed every id of a
    10%-of-the-catalog filter (or of 100k deleted products) on each one."""

    __slots__ = ("ids", "_bitmap")

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids, dtype=np.int64)
        self._bitmap: np.ndarray | None = None

    @classmethod
    def of(cls, ids: "IdSet | np.ndarray") -> "IdSet":
        return ids if isinstance(ids, IdSet) else cls(np.unique(np.asarray(ids, dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.ids)

    def without(self, other: "IdSet | None") -> np.ndarray:
        if other is None or not len(other):
            return self.ids
        return self.ids[~np.isin(self.ids, other.ids, assume_unique=True)]

    def bitmap(self) -> np.ndarray:
        bitmap = self._bitmap  # one read: threads sharing this set may build it at once
        if bitmap is None:
            bits = np.zeros(int(self.ids[-1]) + 1 if len(self.ids) else 1, dtype=bool)
            bits[self.ids[self.ids >= 0]] = True
            bitmap = self._bitmap = np.packbits(bits, bitorder="little")
        return bitmap

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id is in the set (-1 and unknown ids: False), from the bitmap."""
        bitmap = self.bitmap()
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & ((ids >> 3) < len(bitmap))
        out = np.zeros(ids.shape, dtype=bool)
        picked = ids[inside]
        out[inside] = ((bitmap[picked >> 3] >> (picked & 7)) & 1).astype(bool)
        return out

    def selector(self):
        faiss = import_faiss()
        bitmap = self.bitmap()
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # n: bytes
        selector.referenced = bitmap  # the selector reads this memory: keep it alive with it
        return selector


class ArraySource:
    def __init__(self, vectors: np.ndarray, ids: np.ndarray):
        self.vectors = vectors
        self.ids = np.asarray(ids, dtype=np.int64)
        self.dim = int(vectors.shape[1])

    def read(self, positions: np.ndarray) -> np.ndarray:
        return self.vectors[positions]


class AnnIndex:
    """One modality's searchable vectors."""

    def __init__(self, index, refine, info: AnnInfo, base_norms: np.ndarray | None = None):
        # Flat: IDMap2(FlatIP), refine None. IVF-PQ: IDMap(IVF-PQ over positions, with a direct
        # map), refine = scalar-quantised residuals at the same positions, and base_norms = the
        # squared norm of each position's IVF-PQ reconstruction (see `_rerank`).
        self.index = index
        self.refine = refine
        self.info = info
        faiss = import_faiss()
        # Format 2 scanned by inner product: its distances are q.b already, no norm needed.
        self._scan_by_l2 = refine is not None and faiss.extract_index_ivf(index).metric_type == faiss.METRIC_L2
        if self._scan_by_l2 and base_norms is None:
            log.info("index of format %d: decoding its %d base-code norms (a rebuild stores them)",
                     info.format, index.ntotal)
            base_norms = base_code_norms(faiss.extract_index_ivf(index))
        self.base_norms = base_norms
        self._gpu_index = None
        self._hnsw_quantizer = "_HNSW" in info.factory
        self._ids: np.ndarray | None = None
        self._order: np.ndarray | None = None
        # The file `refine` is memory-mapped from when a build streamed its codes there: `save`
        # links it instead of writing the codes again.
        self._refine_file: Path | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    # ---------------------------------------------------------------- build

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        config: AnnConfig = AnnConfig(),
        *,
        tuning_queries: np.ndarray | None = None,
        dim: int | None = None,
    ) -> "AnnIndex":
        """Build from vectors in memory (tests, benchmarks): `build_from` over an ArraySource."""
        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        vectors = np.asarray(vectors, dtype=np.float32)
        if not len(vectors):
            vectors = np.zeros((0, dim or 1), np.float32)
        return cls.build_from(ArraySource(vectors, ids), config, tuning_queries=tuning_queries)

    @classmethod
    def build_from(
        cls, source: "VectorSource", config: AnnConfig = AnnConfig(), *, tuning_queries: np.ndarray | None = None,
        rerank_file: Path | None = None,
    ) -> "AnnIndex":
        """Build from a source read a chunk at a time: memory grows with the codes, not the vectors.

        One pass trains on a sample, a second adds the vectors in chunks (codes, re-rank codes and
        the exact top-10 of the tuning queries, all per chunk), then the tuner picks nprobe.
        `indexer.ray_build` runs the same steps with the adds spread over a Ray cluster.

        `rerank_file`: where the re-rank codes go as they are made (`RerankCodeFile`), instead of
        memory: they are 6/7 of an IVF-PQ index's bytes (3.7 GB at 10M). `save` then links that
        file into the version; its directory must be on the same file system as the versions'
        (else it is copied) and is the caller's to remove."""
        faiss = import_faiss()
        laps = BuildLaps()
        ids = source_ids(source)
        n, d = len(ids), source.dim
        plan = plan_factory(n, d, config)
        if plan.kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
            for start, stop in _chunk_bounds(n, config.add_chunk):
                index.add_with_ids(_normalised_copy(source.read(np.arange(start, stop))), ids[start:stop])
            info = AnnInfo(kind="flat", factory="IDMap2,Flat", count=n, dim=d)
            info.build_seconds = laps.total()
            return cls(index, None, info)

        training = train_ivfpq(source, plan, config, tuning_queries, laps)
        release_freed_memory()  # the training sample and k-means buffers, before the codes grow
        truth = ExactTopK(training.queries, 10)
        training.ivf.make_direct_map(True)  # position -> (list, offset), for re-ranking
        if rerank_file is None:
            norms = add_positions(training.ivf, training.refine, truth, source, 0, n, config.add_chunk)
        else:
            with RerankCodeFile(training.refine, rerank_file) as codes:
                norms = add_positions(training.ivf, codes, truth, source, 0, n, config.add_chunk)
            training.refine = codes.open()
        laps("add")
        ann = cls.from_training(training, ids, truth.ids(), norms, config, laps)
        ann._refine_file = rerank_file
        return ann

    @classmethod
    def from_training(
        cls, training: "IvfPqTraining", ids: np.ndarray, truth: np.ndarray, base_norms: np.ndarray,
        config: AnnConfig, laps: "BuildLaps",
    ) -> "AnnIndex":
        """The index once `training.ivf` and `training.refine` hold positions 0..len(ids)-1 (and
        `base_norms` their IVF-PQ reconstructions' squared norms, from `add_positions`): row ids
        attached, direct map made, nprobe and re-rank depth tuned against `truth` (the tuning
        queries' exact top-10 row ids)."""
        faiss = import_faiss()
        ivf, index = training.ivf, training.index
        if ivf.ntotal != len(ids) or training.refine.ntotal != len(ids) or len(base_norms) != len(ids):
            raise ValueError(f"{len(ids)} ids but {ivf.ntotal} IVF codes, {training.refine.ntotal} re-rank codes "
                             f"and {len(base_norms)} norms")
        # The IVF holds positions; the IDMap (made over it while empty) maps them to row ids.
        faiss.copy_array_to_vector(np.ascontiguousarray(ids, dtype=np.int64), index.id_map)
        index.ntotal = ivf.ntotal
        if ivf.direct_map.no():
            ivf.make_direct_map(True)
        plan = training.plan
        info = AnnInfo(
            kind="ivfpq", factory=f"IDMap,{plan.factory}", count=len(ids), dim=int(ivf.d), nlist=plan.nlist,
            rerank_store=f"residual-{plan.refine_codec}", trained_on_gpu=training.trained_on_gpu,
        )
        ann = cls(index, training.refine, info, np.ascontiguousarray(base_norms, dtype=np.float32))
        ann._tune(training.queries, truth, config, training.query_source)
        release_freed_memory()  # the tuner's candidate buffers
        laps("tune")
        info.tuning["stage_seconds"] = laps.seconds
        if laps.rss_mb:
            info.tuning["stage_rss_mb"] = laps.rss_mb
        info.build_seconds = laps.total()
        return ann

    def _tune(self, queries: np.ndarray, truth: np.ndarray, config: AnnConfig, source: str) -> None:
        """The cheapest (re-rank depth, nprobe) whose end-to-end recall@10 reaches the target.

        First the smallest nprobe that reaches it, trying deeper re-rank only when probing more
        lists stops paying (the candidates' PQ error, not the coarse quantizer, then loses them).
        Then each deeper re-rank with half as many lists, and half again while the target holds:
        re-ranking more candidates costs far less than scanning twice the lists where lists are
        long (10M vectors, 8,192 lists: depth 8 reached 0.9498 at nprobe 512 and needed 1,024).
        Of the settings that reach the target, the cheapest by `_query_cost_us` is kept: a model,
        not the tuning searches' own times, so that two builds of the same vectors (local and on
        Ray) choose alike; each point's measured time is recorded beside it."""
        k = 10
        best, curve, meeting = None, [], []

        def measure(factor: int, nprobe: int) -> float:
            self.info.rerank_factor = factor
            # Batches bounded in the memory they take: the re-rank reconstructs every candidate
            # of a batch at once (1,000 queries x 32 x 10 candidates x 512 floats was 1.3 GB at
            # 1M), and fast-scan builds lookup tables per query and probed list (~8 KB each:
            # 100 queries at nprobe 1,024 took ~1 GB; the 10M tune peaked ~4 GB above the add).
            batch = _tuning_batch(nprobe)
            started = time.perf_counter()
            found = np.vstack([self.search(queries[i:i + batch], k, nprobe=nprobe)[1]
                               for i in range(0, len(queries), batch)])
            seconds = time.perf_counter() - started
            recall = _recall(found, truth)
            cost = self._query_cost_us(nprobe, factor, k)
            curve.append({"rerank_factor": factor, "nprobe": nprobe, "recall_at_10": round(recall, 4),
                          "ms_per_query": round(seconds * 1000 / max(len(queries), 1), 3),
                          "modelled_us": round(cost, 1)})
            if recall >= config.recall_target:
                meeting.append((cost, factor, nprobe, recall))
            return recall

        deeper: tuple[int, ...] = ()
        for i, factor in enumerate(config.rerank_factors):
            nprobe, previous = 1, -1.0
            while True:
                recall = measure(factor, nprobe)
                if best is None or recall > best[2]:
                    best = (factor, nprobe, recall)
                # Probe more lists while doubling nprobe still pays; with thousands of lists each
                # doubling adds a little (0.41 -> 0.48 at 1 -> 2 of 8,192), so the test is an
                # absolute gain, not a share of the gap (which stopped a 10M build at nprobe 2).
                if recall >= config.recall_target or nprobe >= self.info.nlist or recall - previous < 0.002:
                    break
                previous, nprobe = recall, min(nprobe * 2, self.info.nlist)
            if recall >= config.recall_target:
                deeper = config.rerank_factors[i + 1:]
                break
        for factor in deeper:
            fewer = meeting[-1][2] // 2
            while fewer >= 1 and measure(factor, fewer) >= config.recall_target:
                fewer //= 2
        if meeting:
            _, factor, nprobe, recall = min(meeting)
            best = (factor, nprobe, recall)
        self.info.rerank_factor, self.info.nprobe, recall = best
        self.info.recall_at_10 = round(recall, 4)
        self.info.tuning = {"queries": int(len(queries)), "source": source, "target": config.recall_target, "curve": curve}
        if recall < config.recall_target:
            log.warning("index reaches recall@10 %.3f, below the %.2f target", recall, config.recall_target)

    def _query_cost_us(self, nprobe: int, factor: int, k: int) -> float:
        """A batch-1 query's time, modelled from `benchmarks/ann_query_cost.py` on this project's
        2-core host: each probed list ~10 us (its lookup tables), each fast-scan code scanned
        ~0.02 us (10M, nprobe 256: 7.4 ms for ~310k codes), each re-ranked candidate ~4 us
        (its residual decoded and scored: 160 in 0.66 ms)."""
        codes_per_list = self.ntotal / max(self.info.nlist, 1)
        return nprobe * (10.0 + 0.02 * codes_per_list) + 4.0 * factor * k

    # ---------------------------------------------------------------- search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        excluded: np.ndarray | None = None,
        nprobe: int | None = None,
        rerank_factor: int | None = None,
        exact_subset_max: int = AnnConfig.exact_subset_max,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; ids are -1 where fewer than k vectors qualify.

        `allowed`: only these ids may be returned (a resolved metadata filter);
        `excluded`: these ids may not (products deleted since the build).
        `nprobe`, `rerank_factor`: override the tuned values (benchmarks sweep them).
        """
        faiss = import_faiss()
        queries = _normalised_copy(np.atleast_2d(queries))
        nq = len(queries)
        if k <= 0 or self.ntotal == 0:
            return np.zeros((nq, max(k, 0)), np.float32), np.full((nq, max(k, 0)), -1, np.int64)
        threads = faiss.omp_get_max_threads()
        if nq >= SINGLE_THREAD_BELOW or threads == 1:
            return self._search(queries, k, allowed, excluded, nprobe, rerank_factor, exact_subset_max)
        # A few queries are one thread's work: an OpenMP team only adds barrier waits, which take
        # whole scheduler slices when another process holds a core (10x slower on a busy 2-core
        # host). The thread count is per calling thread, so other threads keep theirs.
        faiss.omp_set_num_threads(1)
        try:
            return self._search(queries, k, allowed, excluded, nprobe, rerank_factor, exact_subset_max)
        finally:
            faiss.omp_set_num_threads(threads)

    def _search(self, queries, k, allowed, excluded, nprobe, rerank_factor, exact_subset_max, *, post_filter=True):
        faiss = import_faiss()
        allowed = None if allowed is None else IdSet.of(allowed)
        excluded = None if excluded is None or not len(excluded) else IdSet.of(excluded)
        post_filtered = post_filter and self.info.kind != "flat" and self._gpu_index is None
        if allowed is not None:
            if len(allowed) <= max(exact_subset_max, k):
                return self._search_subset(queries, k, allowed.without(excluded))
            if post_filtered and self._kept_share(allowed, excluded) >= POST_FILTER_MIN_KEPT_SHARE:
                return self._search_post_filtered(queries, k, allowed, excluded, nprobe, rerank_factor, exact_subset_max)
            selector = allowed.selector()
            if excluded is not None:
                selector = faiss.IDSelectorAnd(selector, faiss.IDSelectorNot(excluded.selector()))
        elif excluded is not None and post_filtered and self._kept_share(None, excluded) >= POST_FILTER_MIN_KEPT_SHARE:
            # Deleted products: fetched past and dropped after the scan (1M, 10% masked: a selector
            # cost +45% per query).
            return self._search_post_filtered(queries, k, None, excluded, nprobe, rerank_factor, exact_subset_max)
        elif excluded is not None:
            selector = faiss.IDSelectorNot(excluded.selector())
        else:
            selector = None

        factor = rerank_factor or self.info.rerank_factor
        if self._gpu_index is not None:
            scores, ids = self._search_gpu(queries, k, factor, allowed, excluded)
        elif self.info.kind == "flat":
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            scores, ids = self.index.search(queries, k, params=params)
        else:
            fetch = min(max(k * factor, 40), self.ntotal)
            scores, ids = self._rerank(queries, *self._ivf_candidates(queries, fetch, nprobe, selector), k)

        if allowed is not None or excluded is not None:
            # An IVF probe can miss the members of a filter, or the few products a mass deletion
            # left; never return fewer than exist. Probing more lists first: an exact pass reads
            # every member.
            short = (ids < 0).any(axis=1)
            if short.any() and self.info.kind != "flat" and self._gpu_index is None:
                wider = min(self.info.nlist, 8 * (nprobe or self.info.nprobe or 1))
                retry = self._search(queries[short], k, allowed, excluded, wider, rerank_factor, exact_subset_max) \
                    if wider > (nprobe or self.info.nprobe or 1) else None
                if retry is not None:
                    scores[short], ids[short] = retry
                short = (ids < 0).any(axis=1)
            if short.any():
                if allowed is not None:
                    members = allowed.without(excluded)
                elif self.ntotal - len(excluded) <= 16 * exact_subset_max:
                    members = IdSet(self.ids()).without(excluded)
                else:
                    members = None
                if members is not None and len(members) <= 16 * exact_subset_max:
                    scores[short], ids[short] = self._search_subset(queries[short], k, members)
        return scores, ids

    def _search_post_filtered(self, queries, k, allowed, excluded, nprobe, rerank_factor, exact_subset_max):
        """Candidates fetched past the ids a filter or the deletion mask rules out and dropped after
        the scan; the first `k * factor` that remain are re-ranked, as without a filter.

        A selector slows the fast-scan: on benchmarks/scale.py's 1M vectors in 8,192 lists (CPU time
        per query, nprobe 128), scanning with a 10% filter's selector cost 2.7-3.0 ms against 1.6 ms
        unfiltered, while fetching 1,320 candidates unfiltered and testing them against the
        filter's bitmap cost 1.65 ms; with a 2% filter, 3.8 ms against 2.5 ms."""
        factor = rerank_factor or self.info.rerank_factor
        want = min(max(k * factor, 40), self.ntotal)
        share = self._kept_share(allowed, excluded)
        # A filter's members are spread unevenly over the probed lists: half again as many as the
        # average keeps the re-rank depth in most queries; a short query retries with a selector.
        margin = 1.5 if allowed is not None else 1.0
        fetch = min(int(want * margin / share) + 8, self.ntotal)
        distances, positions = self._ivf_candidates(queries, fetch, nprobe, selector=None)
        candidates = self._row_ids_at(positions)
        keep = candidates >= 0
        if allowed is not None:
            keep &= allowed.contains(candidates)
        if excluded is not None:
            keep &= ~excluded.contains(candidates)
        # The kept candidates in scan order (best approximate score first), the first `want` of them.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :want]
        compact = np.take_along_axis(np.where(keep, positions, -1), order, axis=1)
        scores, ids = self._rerank(queries, np.take_along_axis(distances, order, axis=1), compact, k)
        qualifying = len(allowed) if allowed is not None else self.ntotal - len(excluded)
        short = (ids < 0).any(axis=1) & ((compact >= 0).sum(axis=1) < min(k, qualifying))
        if short.any():
            scores[short], ids[short] = self._search(
                queries[short], k, allowed, excluded, nprobe, rerank_factor, exact_subset_max, post_filter=False
            )
        return scores, ids

    def _kept_share(self, allowed: "IdSet | None", excluded: "IdSet | None") -> float:
        """The share of this index's vectors that a filter and the deletion mask leave (an estimate:
        a filter may name products this modality's index does not hold)."""
        kept = min(len(allowed), self.ntotal) if allowed is not None else self.ntotal
        if excluded is not None:
            kept -= len(excluded) if allowed is None else len(excluded) * kept / self.ntotal
        return max(kept, 1) / self.ntotal

    def _ivf_candidates(self, queries, fetch, nprobe, selector) -> tuple[np.ndarray, np.ndarray]:
        """The IVF-PQ scan: per query, `fetch` candidates' squared L2 distances to their IVF-PQ
        reconstructions and their positions (-1 where fewer qualify). `selector` takes row ids."""
        faiss = import_faiss()
        probes = nprobe or self.info.nprobe or 1
        # The IVF holds positions: a selector of row ids is read through the IDMap's id array, as
        # `IndexIDMap.search` does; searching the IVF itself keeps the results as positions.
        translated = None if selector is None else faiss.IDSelectorTranslated(self.index.id_map, selector)
        params = faiss.SearchParametersIVF(nprobe=probes, sel=translated)
        if self._hnsw_quantizer:
            # The graph walk must keep more candidate lists than are probed; twice is plenty.
            params.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(2 * probes, 16))
        return self.index.index.search(queries, fetch, params=params)

    def _rerank(self, queries: np.ndarray, distances: np.ndarray, positions: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates scored as q.x = q.b + q.r, best k kept (scores, row ids).

        b is a candidate's IVF-PQ reconstruction and r its re-rank code (x - b, scalar-quantised).
        q.b comes from the scan's distance, |q - b|^2 = 1 + |b|^2 - 2 q.b for a unit query, with
        |b|^2 stored per position (`base_norms`): decoding b from the fast-scan blocks again cost
        more than the scan itself on small lists (200k vectors, 80 candidates: ~340 us against
        ~250 us a query on a busy host; 10M, 160 candidates: 0.8 ms beside a 7.4 ms scan), where
        reading the scan's distance is free. Its lookup tables are 8-bit, which moved recall@10
        by 0.001 (0.9722 -> 0.9712 on 200k; 0.9556 -> 0.9550 on 10M)."""
        nq, fetch = positions.shape
        valid = positions >= 0
        if not valid.any():
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        at = np.where(valid, positions, 0)
        residuals = self.refine.reconstruct_batch(at.reshape(-1)).reshape(nq, fetch, -1)
        base = (1.0 + self.base_norms[at] - distances) * 0.5 if self._scan_by_l2 else distances
        exact = base + np.einsum("qfd,qd->qf", residuals, queries)
        exact[~valid] = -np.inf
        take = min(k, fetch)
        top = np.argsort(-exact, axis=1, kind="stable")[:, :take]
        scores = np.full((nq, k), -np.inf, np.float32)
        ids = np.full((nq, k), -1, np.int64)
        scores[:, :take] = np.take_along_axis(exact, top, axis=1)
        ids[:, :take] = np.where(np.isfinite(scores[:, :take]),
                                 self._row_ids_at(np.take_along_axis(positions, top, axis=1)), -1)
        return scores, ids

    def _search_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, np.float32)
        ids = np.full((nq, k), -1, np.int64)
        if len(allowed) == 0:
            return scores, ids
        # Binary search in the sorted ids: np.isin would sort all of them (10M ids: ~0.2 s a query).
        ordered = self.ids()
        at = np.minimum(np.searchsorted(ordered, allowed), max(len(ordered) - 1, 0))
        members = allowed[ordered[at] == allowed] if len(ordered) else allowed[:0]
        if len(members) == 0:
            return scores, ids
        vecs = self.reconstruct(members)
        sims = queries @ vecs.T
        take = min(k, len(members))
        top = np.argsort(-sims, axis=1, kind="stable")[:, :take]
        scores[:, :take] = np.take_along_axis(sims, top, axis=1)
        ids[:, :take] = members[top]
        return scores, ids

    # ---------------------------------------------------------------- ids and vectors

    def _row_ids(self) -> np.ndarray:
        """Row id at each position (a view of the IDMap's own array)."""
        faiss = import_faiss()
        if self.ntotal == 0:
            return np.zeros(0, np.int64)
        return faiss.rev_swig_ptr(self.index.id_map.data(), self.ntotal)

    def _row_ids_at(self, positions: np.ndarray) -> np.ndarray:
        """The row id at each position; -1 stays -1."""
        return np.where(positions >= 0, self._row_ids()[np.maximum(positions, 0)], -1)

    def ids(self) -> np.ndarray:
        """Every id in the index, sorted."""
        if self._ids is None:
            raw = self._row_ids()
            self._order = np.argsort(raw, kind="stable")
            self._ids = raw[self._order]
        return self._ids

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        ordered = self.ids()
        at = np.searchsorted(ordered, ids)
        if len(ids) and (at.max(initial=0) >= len(ordered) or (ordered[np.minimum(at, len(ordered) - 1)] != ids).any()):
            raise KeyError("id not in the index")
        return self._order[at]

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these ids (exact for Flat, re-rank precision for IVF-PQ)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.refine is None:
            return self.index.reconstruct_batch(ids)
        positions = self._positions(ids)
        return self.index.index.reconstruct_batch(positions) + self.refine.reconstruct_batch(positions)

    # ---------------------------------------------------------------- GPU

    def to_gpu(self) -> bool:
        """Serve candidate searches from the GPU when faiss has one (filters become over-fetch + post-filter).

        Only 8-bit IVF-PQ indexes (format 2) can move: faiss-gpu has no fast-scan IVF-PQ (formats 3
        and 4), so those stay on the CPU (False, with a log line). Nothing in serving calls this yet."""
        if gpu_count() == 0 or self.info.kind != "ivfpq":
            return False
        faiss = import_faiss()
        if isinstance(faiss.downcast_index(faiss.extract_index_ivf(self.index)), faiss.IndexIVFPQFastScan):
            log.info("%s: faiss-gpu has no fast-scan IVF-PQ; this index is searched on the CPU", self.info.factory)
            return False
        self._gpu_resources = faiss.StandardGpuResources()
        self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, faiss.downcast_index(self.index.index))
        self._gpu_index.nprobe = self.info.nprobe
        return True

    def _search_gpu(self, queries, k, factor, allowed, excluded):
        over = 4 if (allowed is not None or (excluded is not None and len(excluded))) else 1
        fetch = min(max(k * factor, 40) * over, self.ntotal, 2048)
        distances, positions = self._gpu_index.search(queries, fetch)
        candidates = self._row_ids_at(positions)
        if allowed is not None:
            positions = np.where(np.isin(candidates, allowed.ids), positions, -1)
        if excluded is not None and len(excluded):
            positions = np.where(np.isin(candidates, excluded.ids), -1, positions)
        return self._rerank(queries, distances, positions, k)

    # ---------------------------------------------------------------- files

    def save(self, directory: Path, name: str) -> list[str]:
        faiss = import_faiss()
        files = [f"{name}.faiss"]
        faiss.write_index(self.index, str(directory / files[0]))
        if self.refine is not None:
            files.append(f"{name}.rerank.faiss")
            if self._refine_file is not None and self._refine_file.is_file():
                _link_or_copy(self._refine_file, directory / files[1])
            else:
                faiss.write_index(self.refine, str(directory / files[1]))
            if self.base_norms is not None:
                files.append(f"{name}.norms.npy")
                np.save(directory / files[2], self.base_norms)
        return files

    @classmethod
    def load(cls, directory: Path, name: str, info: dict) -> "AnnIndex":
        faiss = import_faiss()
        parsed = AnnInfo(**{"format": 1, **info})
        if parsed.kind != "flat" and parsed.format not in READABLE_FORMATS:
            raise ValueError(
                f"{name} index has format {parsed.format}, this Prism reads formats {', '.join(map(str, READABLE_FORMATS))}: "
                "rebuild it with `prism index` (the vector cache makes that a re-build, not a re-embed)"
            )
        index = faiss.read_index(str(directory / f"{name}.faiss"))
        _restore_fine_quantizer(index)
        # The re-rank codes are most of an index's bytes: memory-mapped, they are shared page cache
        # rather than private memory, so two versions loaded across a swap do not double it.
        refine = None if parsed.kind == "flat" else faiss.read_index(
            str(directory / f"{name}.rerank.faiss"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        )
        norms = None
        if parsed.kind != "flat" and parsed.format >= 4:
            norms = np.load(directory / f"{name}.norms.npy")
            if norms.shape != (index.ntotal,) or norms.dtype != np.float32:
                raise ValueError(f"{name}.norms.npy holds {norms.shape} {norms.dtype}, not {index.ntotal} float32")
        return cls(index, refine, parsed, norms)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same file system: no second copy of gigabytes of codes
    except OSError:
        shutil.copyfile(source, target)


class RerankCodeFile:
    """Re-rank codes written to a file as they are made, in faiss's own IndexScalarQuantizer
    layout, so that a build never holds them: `open()` memory-maps the finished file, as
    `AnnIndex.load` does a published one.

    The layout is what `faiss.write_index` writes for the trained, empty quantizer (header,
    quantizer, then the codes as one length-prefixed byte vector), with the count and the length
    filled in at the end; `add` takes what `refine.add` takes (the codes are `refine.sa_encode`,
    exactly what `add` stores)."""

    def __init__(self, refine, path: Path):
        faiss = import_faiss()
        if refine.ntotal:
            raise ValueError("the re-rank quantizer must be empty")
        empty = bytes(faiss.serialize_index(refine))
        # The serialized codes of an empty index: a zero length and no bytes.
        if empty[-8:] != bytes(8) or empty[:4] != b"IxSQ":
            raise ValueError("not an empty IndexScalarQuantizer")
        self.refine, self.path = refine, Path(path)
        self._header = empty[:-8]
        self.ntotal = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")
        self._file.write(empty)

    def add(self, x: np.ndarray) -> None:
        codes = self.refine.sa_encode(np.ascontiguousarray(x, dtype=np.float32))
        self._file.write(codes.tobytes())
        self.ntotal += len(x)

    def __enter__(self) -> "RerankCodeFile":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self._file.close()
            self.path.unlink(missing_ok=True)
            return
        self._file.seek(8)  # IxSQ, d (int32), then ntotal (int64)
        self._file.write(np.int64(self.ntotal).tobytes())
        self._file.seek(len(self._header))
        self._file.write(np.uint64(self.ntotal * self.refine.code_size).tobytes())
        self._file.close()

    def open(self):
        """The finished codes, memory-mapped read-only."""
        faiss = import_faiss()
        return faiss.read_index(str(self.path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)


class BuildLaps:
    """Seconds per build stage (`info.tuning["stage_seconds"]`) and since the build started, and
    the process's resident memory at the end of each stage (`stage_rss_mb`: where a build's
    memory goes, which tracemalloc cannot see inside faiss)."""

    def __init__(self):
        self.started = self._mark = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.rss_mb: dict[str, float] = {}

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._mark, 3)
        self._mark = now
        rss = resident_mb()
        if rss is not None:
            self.rss_mb[stage] = rss

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 3)


def resident_mb() -> float | None:
    """This process's resident memory now (VmRSS), in MB; None where /proc has none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def source_ids(source: "VectorSource") -> np.ndarray:
    ids = np.ascontiguousarray(source.ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    return ids


@dataclass
class IvfPqTraining:
    """What an IVF-PQ build trains once, before any vector is added: the adds then run here
    (`AnnIndex.build_from`) or in parallel tasks that each get the empty indexes serialized
    (`indexer.ray_build`), and `AnnIndex.from_training` finishes either."""

    plan: AnnPlan
    ivf: object  # the fast-scan IVF-PQ, trained and empty; it will hold positions as ids
    index: object  # IDMap over `ivf`, made while it was empty (an IDMap refuses a filled index)
    refine: object  # the residual scalar quantizer, trained and empty
    queries: np.ndarray  # the tuner's queries, unit length
    query_source: str  # provided | perturbed-catalog
    trained_on_gpu: bool


def train_ivfpq(
    source: "VectorSource", plan: AnnPlan, config: AnnConfig, tuning_queries: np.ndarray | None, laps: BuildLaps
) -> IvfPqTraining:
    """Coarse quantizer, PQ and residual quantizer trained on a sample of `source`, and the
    tuning queries (given, or perturbed sample vectors)."""
    faiss = import_faiss()
    n, d = len(source.ids), source.dim
    rng = np.random.default_rng(config.seed)
    sample_size = min(n, max(config.train_points_per_list * plan.nlist, 30_000), config.max_train_points)
    sample_positions = np.sort(rng.choice(n, size=sample_size, replace=False)) if sample_size < n else np.arange(n)
    sample = _normalised_copy(source.read(sample_positions))
    laps("read_sample")
    # L2 on unit vectors ranks as inner product does (|q - x|^2 = 2 - 2 q.x). Inner-product
    # fast-scan encodes residuals too, with one lookup table per query rather than per probed
    # list, but its lists (spherical k-means, assigned by inner product) held the neighbours less
    # well: on 1M CLIP-shaped vectors the candidates L2 found at nprobe 64 (0.995 of the top-10,
    # 0.90 ms) took it nprobe 128 (0.995, 1.09 ms).
    ivf = faiss.index_factory(d, plan.factory, faiss.METRIC_L2)
    if hasattr(ivf, "do_polysemous_training"):
        # Polysemous training (Hamming-ordered codes) costs ~100x the k-means; Prism never uses it.
        ivf.do_polysemous_training = False
    # k-means costs sample x nlist per iteration: with thousands of lists, 10 iterations (which
    # move the centroids little after the first few) instead of 20 keep a 10M build in minutes.
    ivf.cp.niter = config.kmeans_iterations if plan.nlist < 4096 else min(config.kmeans_iterations, 10)
    ivf, on_gpu = _train(ivf, sample, config)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = config.add_ef_search
    refine = residual_quantizer(d, plan.refine_codec)
    refine.train(sample - ivf.sa_decode(ivf.sa_encode(sample)))
    laps("train")
    queries, query_source = _tuning_queries(tuning_queries, sample, config, rng)
    return IvfPqTraining(plan, ivf, faiss.IndexIDMap(ivf), refine, queries, query_source, on_gpu)


def residual_quantizer(d: int, codec: str):
    """The untrained re-rank quantizer of `codec` ("SQ8", "SQ6", ...) for residuals x - b."""
    faiss = import_faiss()
    refine = faiss.index_factory(d, codec, faiss.METRIC_INNER_PRODUCT)
    if codec != "SQ8":
        # Each dimension's range from its 0.1% quantiles rather than its extremes: a few
        # outliers otherwise spread the 64 levels of 6 bits (recall@10 0.951 -> 0.961 at 1M).
        refine.sq.rangestat = faiss.ScalarQuantizer.RS_quantiles
        refine.sq.rangestat_arg = 0.001
    return refine


def add_positions(ivf, refine, truth: "ExactTopK", source: "VectorSource", start: int, stop: int,
                  chunk: int) -> np.ndarray:
    """Add `source`'s positions [start, stop) a chunk at a time: IVF-PQ codes (at the IVF's next
    positions: it must have an array direct map), residual codes at the same positions, and the
    tuning queries' exact top-k over them (by row id). Returns the squared norms of the IVF-PQ
    reconstructions (`AnnIndex.base_norms`), which the residuals need anyway."""
    norms = np.empty(stop - start, np.float32)
    for lo, hi in _chunk_bounds(stop - start, chunk):
        lo, hi = start + lo, start + hi
        x = _normalised_copy(source.read(np.arange(lo, hi)))
        first = ivf.ntotal
        # Lists are found through the same HNSW graph the queries walk (where it has one): a vector
        # the graph misplaces is then where a query's walk looks for it too. Assigning adds exactly
        # made adds faster but lowered recall at a given nprobe (10M: 0.9472 against 0.9526 at
        # nprobe 512), so the tuner doubled nprobe and batch-1 q/s halved (67 -> 33).
        ivf.add(x)
        base = ivf.reconstruct_batch(np.arange(first, first + hi - lo, dtype=np.int64))
        norms[lo - start:hi - start] = np.einsum("nd,nd->n", base, base)
        # What the IVF code misses, kept compactly for the re-rank (see the module docstring).
        refine.add(x - base)
        truth.add(x, source.ids[lo:hi])
    return norms


def base_code_norms(ivf, chunk: int = 65_536) -> np.ndarray:
    """Squared norms of every position's IVF-PQ reconstruction, decoded a chunk at a time: for an
    index of a format that did not store them (at 10M, about a minute of one core)."""
    if ivf.direct_map.no():
        ivf.make_direct_map(True)
    norms = np.empty(ivf.ntotal, np.float32)
    for lo, hi in _chunk_bounds(ivf.ntotal, chunk):
        base = ivf.reconstruct_batch(np.arange(lo, hi, dtype=np.int64))
        norms[lo:hi] = np.einsum("nd,nd->n", base, base)
    return norms


def _tuning_batch(nprobe: int) -> int:
    """Queries per tuner search: 100, fewer as nprobe grows (at most ~6,400 query-list pairs)."""
    return max(1, min(100, 6_400 // max(1, nprobe)))


def _chunk_bounds(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


class ExactTopK:
    """Exact top-k ids of a few queries over vectors seen a chunk at a time (the tuner's truth)."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self._scores = np.full((len(queries), 0), -np.inf, np.float32)
        self._ids = np.zeros((len(queries), 0), np.int64)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        scores = self.queries @ x.T
        ids = np.asarray(ids)
        if scores.shape[1] > self.k:
            # Each query's k best of the chunk first: merging all of it copied queries x chunk ids
            # (500 x 65,536 x 8 B: 262 MB, 2-6 s a chunk, ~300 s of a 10M add).
            top = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k]
            self.add_scored(np.take_along_axis(scores, top, axis=1), ids[top])
        else:
            self.add_scored(scores, np.broadcast_to(ids, (len(self.queries), len(ids))))

    def add_scored(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Candidates already scored, per query: another ExactTopK's `top()` merges in here."""
        scores = np.concatenate([self._scores, scores], axis=1)
        both = np.concatenate([self._ids, ids], axis=1)
        keep = min(self.k, scores.shape[1])
        if keep == 0:
            return
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        self._scores = np.take_along_axis(scores, top, axis=1)
        self._ids = np.take_along_axis(both, top, axis=1)

    def top(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) per query, best first."""
        order = np.argsort(-self._scores, axis=1, kind="stable")
        return np.take_along_axis(self._scores, order, axis=1), np.take_along_axis(self._ids, order, axis=1)

    def ids(self) -> np.ndarray:
        return self.top()[1]


def _tuning_queries(provided: np.ndarray | None, sample: np.ndarray, config: AnnConfig, rng) -> tuple[np.ndarray, str]:
    if provided is None or len(provided) == 0:
        # Held-out stand-ins: catalog vectors moved off themselves by noise, so a query is not
        # trivially its own nearest neighbour.
        picks = sample[rng.choice(len(sample), size=min(config.tuning_queries, len(sample)), replace=False)]
        noisy = picks + rng.normal(scale=0.5 / math.sqrt(sample.shape[1]), size=picks.shape)
        return _normalised_copy(noisy), "perturbed-catalog"
    if len(provided) > config.tuning_queries:
        provided = provided[rng.choice(len(provided), size=config.tuning_queries, replace=False)]
    return _normalised_copy(provided), "provided"


def _restore_fine_quantizer(index) -> None:
    """faiss (1.15) reads an IVF-PQ fast-scan index without pointing `fine_quantizer` at its PQ,
    and reconstructing from it then dereferences null: point it back."""
    faiss = import_faiss()
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index (Flat)
        return
    if isinstance(ivf, faiss.IndexIVFPQFastScan) and ivf.fine_quantizer is None:
        ivf.fine_quantizer = ivf.pq


def _train(index, sample: np.ndarray, config: AnnConfig):
    """Train `index` (its coarse k-means is most of a build), the k-means on the GPU when asked and
    available; returns (trained CPU index, k-means ran on a GPU).

    Only the k-means's assignment index goes to the GPU: faiss-gpu has no fast-scan IVF-PQ, so
    cloning the whole index there fails ("not implemented on GPU"), while the assignments, big
    matrix products, are what a GPU speeds up."""
    faiss = import_faiss()
    # Assignments during k-means are exact (a flat index); an HNSW quantizer then gets the final
    # centroids once, instead of being rebuilt every iteration.
    assign = faiss.IndexFlat(index.d, index.quantizer.metric_type)
    on_gpu = False
    want_gpu = gpu_count() > 0 if config.use_gpu is None else config.use_gpu
    if want_gpu and gpu_count() > 0:
        try:
            resources = faiss.StandardGpuResources()
            assign = faiss.index_cpu_to_gpu(resources, 0, assign)
            on_gpu = True
        except Exception as exc:  # a faiss-gpu that cannot take it: the CPU k-means still works
            log.warning("GPU k-means unavailable (%s); training on the CPU", exc)
    # The coarse k-means is a few big matrix products: all cores help. The PQ training after it is
    # 64 tiny k-means, thousands of OpenMP barriers that a busy host turns from ~3 s into ~30 s,
    # so it runs on one thread (the IVF skips retraining a quantizer that already has nlist centroids).
    clustering = faiss.Clustering(index.d, index.nlist, index.cp)
    clustering.train(sample, assign)
    index.quantizer.add(faiss.vector_to_array(clustering.centroids).reshape(index.nlist, index.d))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.train(sample)
    finally:
        faiss.omp_set_num_threads(threads)
    return index, on_gpu


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = 0
    for f, t in zip(found, truth):
        hits += len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist()))
    denom = sum(int((t >= 0).sum()) for t in truth)
    return hits / max(denom, 1)
