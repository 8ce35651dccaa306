"""One modality's IVF-PQ index built on a Ray cluster: trained once, vectors added in parallel.

The driver plans, samples and trains exactly as `AnnIndex.build_from` does (the same
`train_ivfpq`, so the same sample, codebooks and tuning queries). The trained, empty IVF and
re-rank indexes go into the object store once, serialized; each Ray task takes one contiguous
range of positions, reads its vectors from the source, encodes them (IVF-PQ codes, residual
codes, the tuning queries' exact top-10 over the range: `add_positions`, the local build's own
loop) and returns them serialized. The driver merges the partial indexes in position order
(`IndexIVF.merge_from` shifts each partial's local positions by its range's start; the residual
codes are appended), so the merged index holds the same codes, in the same list order, as a local
build's, and `AnnIndex.from_training` attaches the row ids and tunes as the local build does.
The result saves, loads and serves through `AnnIndex` unchanged.

A task that dies with its worker is rerun (`max_retries`); results are kept per range, one per
range and checked against its length, so a rerun can neither lose nor duplicate vectors.

How the pipeline calls it (`CatalogIndexer.build` with `--ray`), per modality:

    from indexer.ray_build import CachedShardSource, build_ann_on_ray

    ray.init(address=...)  # else build_ann_on_ray calls ray.init(): RAY_ADDRESS, a cluster
                           # already started on this host, or a new local one
    indexes[modality] = build_ann_on_ray(
        CachedShardSource.of(sources[modality]),  # a pipeline CachedVectors
        self.options.ann,
        tuning_queries=sources[other].sample(self.options.ann.tuning_queries),
    )

then publishes through `write_index_version` as now. The vector cache directory must be at the
same path on every node (shared storage), and its shards must stay put during the build: the
pipeline's `embedding_writer` hold already keeps compaction (which folds shards away) out.
Every node needs Prism and faiss installed (tasks import this module). Indexes below
`flat_threshold` vectors are exact and built here, locally: no cluster needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.ann import (
    AnnConfig,
    AnnIndex,
    BuildLaps,
    ExactTopK,
    _restore_fine_quantizer,
    add_positions,
    plan_factory,
    source_ids,
    train_ivfpq,
)
from indexer.faiss_import import import_faiss

TRUTH_K = 10  # the tuner measures recall@10


@dataclass(frozen=True, eq=False)  # arrays: identity, not element-wise ==
class CachedShardSource:
    """A pipeline `CachedVectors`, picklable for Ray tasks: row ids, cache locations, and the
    cache's shard list as the driver numbered it.

    A location is (shard number << 32 | row), numbered in the order the driver's cache opened
    and then wrote its shards; reopening the directory elsewhere would number them by name
    instead (and see shards written since), so the list travels with the locations. Parquet
    shards of earlier releases live in memory in the driver's cache: they travel as matrices."""

    dim: int
    ids: np.ndarray
    locations: np.ndarray
    shards: tuple  # per shard number: the Arrow file's path (str), or a legacy shard's matrix

    @classmethod
    def of(cls, cached) -> "CachedShardSource":
        """From `indexer.pipeline.CachedVectors` (its `cache` is an open `VectorCache`)."""
        shards = tuple(str(s) if isinstance(s, Path) else s for s in cached.cache._shards)
        return cls(int(cached.dim), np.asarray(cached.ids, np.int64), np.asarray(cached.locations, np.int64), shards)

    def read(self, positions: np.ndarray) -> np.ndarray:
        from embedder.cache import _read_arrow_rows

        locations = self.locations[positions]
        out = np.empty((len(locations), self.dim), dtype=np.float32)
        numbers, rows = locations >> 32, locations & 0xFFFFFFFF
        for number in np.unique(numbers):
            where = np.flatnonzero(numbers == number)
            shard = self.shards[int(number)]
            if isinstance(shard, np.ndarray):
                out[where] = shard[rows[where]]
            else:
                out[where] = _read_arrow_rows(Path(shard), rows[where], self.dim)
        return out


def build_ann_on_ray(
    source,
    config: AnnConfig = AnnConfig(),
    *,
    tuning_queries: np.ndarray | None = None,
    partitions: int | None = None,
    cpus_per_task: float = 1,
    max_retries: int = 3,
) -> AnnIndex:
    """`AnnIndex.build_from(source, config, tuning_queries=...)` with the adds run as Ray tasks.

    `source`: a picklable `VectorSource` (an `ArraySource`, a `CachedShardSource`), put in the
    object store once and read by every task. `partitions`: how many position ranges (tasks);
    default, one per CPU of the cluster. `cpus_per_task`: CPUs each task reserves (Ray sets its
    OpenMP threads to match). `max_retries`: reruns of a task whose worker or node died."""
    import ray

    laps = BuildLaps()
    ids = source_ids(source)
    n = len(ids)
    plan = plan_factory(n, source.dim, config)
    if plan.kind == "flat":
        return AnnIndex.build_from(source, config, tuning_queries=tuning_queries)
    if not ray.is_initialized():
        ray.init()
    faiss = import_faiss()
    training = train_ivfpq(source, plan, config, tuning_queries, laps)
    count = partitions or int(ray.cluster_resources().get("CPU", 1))
    bounds = partition_bounds(n, count)

    # Reruns are for lost workers and nodes; an exception (a bad shard, a bug) would only repeat.
    encode = ray.remote(_encode_range).options(num_cpus=cpus_per_task, max_retries=max_retries, retry_exceptions=False)
    ivf_blob = ray.put(faiss.serialize_index(training.ivf))
    refine_blob = ray.put(faiss.serialize_index(training.refine))
    queries, source_ref = ray.put(training.queries), ray.put(source)
    pending = [
        encode.remote(ivf_blob, refine_blob, queries, source_ref, start, stop, config.add_chunk)
        for start, stop in bounds
    ]
    truth = ExactTopK(training.queries, TRUTH_K)
    norms = np.empty(n, np.float32)
    try:
        for i, (start, stop) in enumerate(bounds):
            ivf_part, refine_part, part_norms, scores, top = ray.get(pending[i])
            pending[i] = None  # its result leaves the object store once merged
            part = faiss.deserialize_index(ivf_part)
            part_refine = faiss.deserialize_index(refine_part)
            if part.ntotal != stop - start or part_refine.ntotal != stop - start:
                raise RuntimeError(
                    f"positions {start}..{stop}: a task returned {part.ntotal} codes and "
                    f"{part_refine.ntotal} re-rank codes"
                )
            training.ivf.merge_from(part, start)  # the partial's positions 0.. become start..
            training.refine.merge_from(part_refine, 0)
            norms[start:stop] = part_norms
            truth.add_scored(scores, top)
    except BaseException:
        for ref in pending:
            if ref is not None:
                ray.cancel(ref)
        raise
    laps("add")
    ann = AnnIndex.from_training(training, ids, truth.ids(), norms, config, laps)
    ann.info.tuning["ray_partitions"] = len(bounds)
    return ann


def partition_bounds(n: int, partitions: int) -> list[tuple[int, int]]:
    """`partitions` contiguous ranges covering 0..n-1, sizes within one of each other."""
    edges = np.linspace(0, n, max(1, min(partitions, n)) + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges, edges[1:])]


def _encode_range(ivf_blob, refine_blob, queries, source, start: int, stop: int, chunk: int):
    """One Ray task: positions [start, stop) encoded into copies of the trained empty indexes
    (at local positions 0..stop-start-1), with the tuning queries' exact top-k over them."""
    faiss = import_faiss()
    ivf = faiss.deserialize_index(ivf_blob)
    _restore_fine_quantizer(ivf)  # deserialized without it, and add_positions reconstructs through it
    refine = faiss.deserialize_index(refine_blob)
    truth = ExactTopK(queries, TRUTH_K)
    ivf.make_direct_map(True)
    norms = add_positions(ivf, refine, truth, source, start, stop, chunk)
    ivf.make_direct_map(False)  # merge_from takes IVFs without one; the merged index makes its own
    scores, top = truth.top()
    return faiss.serialize_index(ivf), faiss.serialize_index(refine), norms, scores, top
