"""FAISS indexes for one modality: chosen by size, tuned at build time, searched with filters.

- fewer than `flat_threshold` vectors: exact inner-product search (IndexIDMap2 over IndexFlatIP);
- more: IVF-PQ (OPQ-rotated above `opq_threshold`), whose candidates are re-ranked exactly against a
  companion store of the original vectors. `nprobe` is the smallest power of two whose end-to-end
  recall@10 against exact search on held-out queries reaches `recall_target`.

FAISS ids are the products' stable row ids, so no file relies on positional alignment.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from indexer.faiss_import import gpu_count, import_faiss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnConfig:
    flat_threshold: int = 20_000
    opq_threshold: int = 1_000_000
    recall_target: float = 0.95
    rerank_factors: tuple[int, ...] = (4, 8, 16, 32)  # candidates per result before exact re-rank (tuned)
    rerank_store: str = "Flat"  # "Flat" (exact) or a faiss SQ codec such as "SQ8" to save memory
    tuning_queries: int = 500
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
    rerank_store: str | None = None
    rerank_factor: int = 0
    recall_at_10: float = 1.0
    tuning: dict = field(default_factory=dict)
    build_seconds: float = 0.0
    trained_on_gpu: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _normalised_copy(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def plan_factory(n: int, d: int, config: AnnConfig) -> tuple[str, int, int]:
    """(factory string, nlist, PQ sub-quantizers) for n vectors of dimension d."""
    if n < config.flat_threshold:
        return "Flat", 0, 0
    # ~4*sqrt(n) lists (a power of two), with >= 39 training points per centroid.
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = int(max(16, min(nlist, n // 39)))
    # 8 dims per sub-quantizer for CLIP-sized vectors; finer for small ones, where PQ is coarse.
    per = 8 if d > 128 else 4
    m = next(c for c in (d // per, d // 2, d) if c > 0 and d % c == 0)
    factory = f"IVF{nlist},PQ{m}"
    if n >= config.opq_threshold:
        factory = f"OPQ{m},{factory}"
    return factory, nlist, m


class AnnIndex:
    """One modality's searchable vectors."""

    def __init__(self, index, exact, info: AnnInfo):
        self.index = index  # the ANN index (or the exact one, for Flat)
        self.exact = exact  # exact vectors by id: the same object as `index` for Flat
        self.info = info
        self._gpu_index = None
        self._ids: np.ndarray | None = None

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
        faiss = import_faiss()
        started = time.perf_counter()
        vectors = _normalised_copy(vectors) if len(vectors) else np.zeros((0, dim or 1), np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique")
        n, d = vectors.shape
        factory, nlist, _m = plan_factory(n, d, config)
        if factory == "Flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
            if n:
                index.add_with_ids(vectors, ids)
            info = AnnInfo(kind="flat", factory="IDMap2,Flat", count=n, dim=d)
            info.build_seconds = round(time.perf_counter() - started, 3)
            return cls(index, index, info)

        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        # Polysemous training (Hamming-ordered codes) costs ~100x the k-means and Prism never
        # searches in polysemous mode.
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        rng = np.random.default_rng(config.seed)
        sample_size = min(n, max(64 * nlist, 30_000), 200_000)
        sample = vectors[rng.choice(n, size=sample_size, replace=False)] if sample_size < n else vectors
        index, on_gpu = _train_and_add(index, sample, vectors, ids, config)

        exact = faiss.IndexIDMap2(
            faiss.IndexFlatIP(d)
            if config.rerank_store == "Flat"
            else faiss.index_factory(d, config.rerank_store, faiss.METRIC_INNER_PRODUCT)
        )
        if not exact.is_trained:
            exact.train(sample)
        exact.add_with_ids(vectors, ids)

        info = AnnInfo(
            kind="ivfpq",
            factory=factory,
            count=n,
            dim=d,
            nlist=nlist,
            rerank_store=config.rerank_store,
            trained_on_gpu=on_gpu,
        )
        ann = cls(index, exact, info)
        ann._tune_nprobe(vectors, config, tuning_queries, rng)
        info.build_seconds = round(time.perf_counter() - started, 3)
        return ann

    def _tune_nprobe(self, vectors: np.ndarray, config: AnnConfig, queries: np.ndarray | None, rng) -> None:
        source = "provided"
        if queries is None or len(queries) == 0:
            # Held-out stand-ins: catalog vectors moved off themselves by noise, so a query is
            # not trivially its own nearest neighbour.
            source = "perturbed-catalog"
            picks = vectors[rng.choice(len(vectors), size=min(config.tuning_queries, len(vectors)), replace=False)]
            queries = picks + rng.normal(scale=0.5 / math.sqrt(vectors.shape[1]), size=picks.shape)
        elif len(queries) > config.tuning_queries:
            queries = queries[rng.choice(len(queries), size=config.tuning_queries, replace=False)]
        queries = _normalised_copy(queries)
        k = 10
        _, truth = self.exact.search(queries, k)
        # Smallest nprobe that reaches the target, trying deeper re-rank only when probing more
        # lists stops helping (PQ error, not the coarse quantizer, is then what loses neighbours).
        best, curve = None, []
        for factor in config.rerank_factors:
            self.info.rerank_factor = factor
            nprobe, previous = 1, -1.0
            while True:
                _, found = self.search(queries, k, nprobe=nprobe)
                recall = _recall(found, truth)
                curve.append({"rerank_factor": factor, "nprobe": nprobe, "recall_at_10": round(recall, 4)})
                if best is None or recall > best[2]:
                    best = (factor, nprobe, recall)
                if recall >= config.recall_target or nprobe >= self.info.nlist or recall - previous < 0.002:
                    break
                previous, nprobe = recall, min(nprobe * 2, self.info.nlist)
            if recall >= config.recall_target:
                best = (factor, nprobe, recall)
                break
        self.info.rerank_factor, self.info.nprobe, recall = best
        self.info.recall_at_10 = round(recall, 4)
        self.info.tuning = {"queries": int(len(queries)), "source": source, "target": config.recall_target, "curve": curve}
        if recall < config.recall_target:
            log.warning("index reaches recall@10 %.3f, below the %.2f target", recall, config.recall_target)

    # ---------------------------------------------------------------- search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        excluded: np.ndarray | None = None,
        nprobe: int | None = None,
        exact_subset_max: int = AnnConfig.exact_subset_max,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; ids are -1 where fewer than k vectors qualify.

        `allowed`: only these ids may be returned (a resolved metadata filter);
        `excluded`: these ids may not (products deleted since the build).
        """
        faiss = import_faiss()
        queries = _normalised_copy(np.atleast_2d(queries))
        nq = len(queries)
        if k <= 0 or self.ntotal == 0:
            return np.zeros((nq, max(k, 0)), np.float32), np.full((nq, max(k, 0)), -1, np.int64)
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            if excluded is not None and len(excluded):
                allowed = np.setdiff1d(allowed, excluded, assume_unique=False)
            if len(allowed) <= max(exact_subset_max, k):
                return self._search_subset(queries, k, allowed)
            selector = faiss.IDSelectorBatch(allowed)
        elif excluded is not None and len(excluded):
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(excluded, dtype=np.int64)))
        else:
            selector = None

        if self._gpu_index is not None:
            scores, ids = self._search_gpu(queries, k, allowed, excluded)
        elif self.info.kind == "flat":
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            scores, ids = self.index.search(queries, k, params=params)
        else:
            fetch = min(max(k * self.info.rerank_factor, 40), self.ntotal)
            params = faiss.SearchParametersIVF(nprobe=nprobe or self.info.nprobe or 1, sel=selector)
            _, candidates = self.index.search(queries, fetch, params=params)
            scores, ids = self._rerank(queries, candidates, k)

        if allowed is not None:
            # An IVF probe can miss members of a broad filter; never return fewer than exist.
            short = (ids < 0).any(axis=1)
            if short.any():
                scores[short], ids[short] = self._search_subset(queries[short], k, allowed)
        return scores, ids

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores for ANN candidates (one batched reconstruct), best k kept."""
        nq, fetch = candidates.shape
        valid = candidates >= 0
        flat_ids = np.where(valid, candidates, candidates[valid][0] if valid.any() else 0).reshape(-1)
        if not valid.any():
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        vectors = self.exact.reconstruct_batch(flat_ids).reshape(nq, fetch, -1)
        exact = np.einsum("qfd,qd->qf", vectors, queries)
        exact[~valid] = -np.inf
        take = min(k, fetch)
        top = np.argsort(-exact, axis=1, kind="stable")[:, :take]
        scores = np.full((nq, k), -np.inf, np.float32)
        ids = np.full((nq, k), -1, np.int64)
        scores[:, :take] = np.take_along_axis(exact, top, axis=1)
        ids[:, :take] = np.where(np.isfinite(scores[:, :take]), np.take_along_axis(candidates, top, axis=1), -1)
        return scores, ids

    def _search_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, np.float32)
        ids = np.full((nq, k), -1, np.int64)
        if len(allowed) == 0:
            return scores, ids
        members = allowed[np.isin(allowed, self.ids(), assume_unique=True)]
        if len(members) == 0:
            return scores, ids
        vecs = self.exact.reconstruct_batch(members)
        sims = queries @ vecs.T
        take = min(k, len(members))
        top = np.argsort(-sims, axis=1, kind="stable")[:, :take]
        scores[:, :take] = np.take_along_axis(sims, top, axis=1)
        ids[:, :take] = members[top]
        return scores, ids

    def ids(self) -> np.ndarray:
        """Every id in the index, sorted."""
        if self._ids is None:
            faiss = import_faiss()
            raw = faiss.vector_to_array(self.exact.id_map) if self.ntotal else np.zeros(0, np.int64)
            self._ids = np.sort(raw.astype(np.int64))
        return self._ids

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return self.exact.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    # ---------------------------------------------------------------- GPU

    def to_gpu(self) -> bool:
        """Serve ANN searches from the GPU when faiss has one (filters become over-fetch + post-filter)."""
        if gpu_count() == 0 or self.info.kind != "ivfpq":
            return False
        faiss = import_faiss()
        self._gpu_resources = faiss.StandardGpuResources()
        self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
        self._gpu_index.nprobe = self.info.nprobe
        return True

    def _search_gpu(self, queries, k, allowed, excluded):
        over = 4 if (allowed is not None or (excluded is not None and len(excluded))) else 1
        fetch = min(max(k * self.info.rerank_factor, 40) * over, self.ntotal, 2048)
        _, candidates = self._gpu_index.search(queries, fetch)
        if allowed is not None:
            candidates = np.where(np.isin(candidates, allowed), candidates, -1)
        if excluded is not None and len(excluded):
            candidates = np.where(np.isin(candidates, excluded), -1, candidates)
        return self._rerank(queries, candidates, k)

    # ---------------------------------------------------------------- files

    def save(self, directory: Path, name: str) -> list[str]:
        faiss = import_faiss()
        files = [f"{name}.faiss"]
        faiss.write_index(self.index, str(directory / files[0]))
        if self.info.kind != "flat":
            files.append(f"{name}.rerank.faiss")
            faiss.write_index(self.exact, str(directory / files[1]))
        return files

    @classmethod
    def load(cls, directory: Path, name: str, info: dict) -> "AnnIndex":
        faiss = import_faiss()
        parsed = AnnInfo(**info)
        index = faiss.read_index(str(directory / f"{name}.faiss"))
        exact = index if parsed.kind == "flat" else faiss.read_index(str(directory / f"{name}.rerank.faiss"))
        return cls(index, exact, parsed)


def _train_and_add(index, sample: np.ndarray, vectors: np.ndarray, ids: np.ndarray, config: AnnConfig):
    """Train and fill `index`, on the GPU when asked and available; returns (CPU index, used GPU)."""
    faiss = import_faiss()
    want_gpu = gpu_count() > 0 if config.use_gpu is None else config.use_gpu
    if want_gpu and gpu_count() > 0:
        try:
            res = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
            gpu_index.train(sample)
            gpu_index.add_with_ids(vectors, ids)
            return faiss.index_gpu_to_cpu(gpu_index), True
        except Exception as exc:  # e.g. an index type faiss-gpu cannot clone: the CPU path still works
            log.warning("GPU training failed (%s); training on the CPU", exc)
    index.train(sample)
    index.add_with_ids(vectors, ids)
    return index, False


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = 0
    for f, t in zip(found, truth):
        hits += len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist()))
    denom = sum(int((t >= 0).sum()) for t in truth)
    return hits / max(denom, 1)
