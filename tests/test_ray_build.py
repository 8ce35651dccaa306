"""The IVF-PQ build on Ray (indexer/ray_build.py) against the local build, on a real two-node
local Ray cluster: same vectors in, same index out, through save/load and a worker's death."""

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from embedder import VectorCache  # noqa: E402
from indexer.ann import AnnConfig, AnnIndex, ArraySource, _recall  # noqa: E402
from indexer.pipeline import CachedVectors  # noqa: E402
from indexer.ray_build import CachedShardSource, build_ann_on_ray, partition_bounds  # noqa: E402
from indexer.versions import load_index_version, write_index_version  # noqa: E402
from ray_cluster import isolated_cluster  # noqa: E402

# Touches no database: the suite's SQLite run covers it, its PostgreSQL run skips it.
pytestmark = pytest.mark.no_database

N, DIM = 60_000, 64


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, one CPU each (`ray_cluster.isolated_cluster`), this process its driver."""
    with isolated_cluster(num_cpus=1) as nodes:
        # The dying source below lives in this test module, which workers cannot import.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.init(address=nodes.address)
        try:
            yield nodes
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def data():
    """Unit vectors around 300 centres, ids that are not positions, and cross-cluster queries."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(300, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, len(centres), N)] + rng.normal(scale=1.0 / np.sqrt(DIM), size=(N, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = rng.permutation(N).astype(np.int64) * 7 + 11
    q = (centres[rng.integers(0, len(centres), 300)] + rng.normal(scale=1.0 / 8, size=(300, DIM))).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]
    return x, ids, q, truth


@pytest.fixture(scope="module")
def local(data):
    x, ids, q, _ = data
    return AnnIndex.build_from(ArraySource(x, ids), AnnConfig(), tuning_queries=q)


@pytest.fixture(scope="module")
def cached_source(tmp_path_factory, data):
    """The vectors in a vector cache as the pipeline leaves it: Arrow shards opened in name order,
    shards this process wrote after opening it (numbered after them, whatever their names), and
    a legacy Parquet shard (held in memory)."""
    x, ids, _, _ = data
    root = tmp_path_factory.mktemp("cache") / "model"
    keys = [f"image:{i}" for i in range(N)]
    legacy = slice(0, 5_000)
    root.mkdir(parents=True)
    pq.write_table(pa.table({
        "key": keys[legacy],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(x[legacy].reshape(-1)), DIM),
    }), root / "part-legacy.parquet")
    early = VectorCache(root, DIM)
    for start in range(5_000, 30_000, 12_500):
        part = slice(start, start + 12_500)
        early.put_many(keys[part], x[part], modality="image", refs=keys[part])
    cache = VectorCache(root, DIM)  # numbers the shards by name
    for start in range(30_000, N, 10_000):
        part = slice(start, start + 10_000)
        cache.put_many(keys[part], x[part], modality="image", refs=keys[part])
    return CachedVectors(cache, ids, cache.locate(keys))


def test_cached_shard_source_reads_in_a_task_what_the_drivers_cache_located(cluster, data, cached_source):
    x, ids, _, _ = data
    source = CachedShardSource.of(cached_source)
    assert any(isinstance(s, np.ndarray) for s in source.shards) and len(source.shards) == 6
    positions = np.random.default_rng(0).permutation(N)[:2_000]
    assert np.array_equal(pickle.loads(pickle.dumps(source)).read(positions), x[positions])
    in_task = ray.get(ray.remote(lambda s, p: s.read(p)).remote(source, positions))
    assert np.array_equal(in_task, x[positions])
    np.testing.assert_array_equal(source.ids, ids)


def test_partitions_cover_every_position_once():
    assert partition_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert partition_bounds(2, 5) == [(0, 1), (1, 2)]
    assert partition_bounds(7, 1) == [(0, 7)]


def test_ray_build_from_the_cache_is_the_local_build(cluster, data, local, cached_source):
    x, ids, q, truth = data
    built = build_ann_on_ray(CachedShardSource.of(cached_source), AnnConfig(), tuning_queries=q, partitions=3)
    assert built.info.kind == "ivfpq" and built.info.tuning["ray_partitions"] == 3
    assert built.ntotal == local.ntotal == N
    np.testing.assert_array_equal(built.ids(), np.sort(ids))
    # Same sample, codebooks, codes and list order as the local build: the same answers.
    for field in ("factory", "nlist", "nprobe", "rerank_factor", "rerank_store", "recall_at_10"):
        assert getattr(built.info, field) == getattr(local.info, field), field
    ray_scores, ray_found = built.search(q, 10)
    local_scores, local_found = local.search(q, 10)
    np.testing.assert_array_equal(ray_found, local_found)
    np.testing.assert_allclose(ray_scores, local_scores, rtol=1e-6)
    assert _recall(ray_found, truth) >= 0.9


def test_ray_build_with_hnsw_lists_and_compact_codes_recalls_as_the_local_build(cluster, data):
    """The HNSW coarse quantizer and 6-bit quantile-range residual codes (a 10M build's shape)."""
    x, ids, q, truth = data
    config = AnnConfig(hnsw_quantizer_from=256, compact_threshold=50_000, add_chunk=8_192)
    local = AnnIndex.build_from(ArraySource(x, ids), config, tuning_queries=q)
    built = build_ann_on_ray(ArraySource(x, ids), config, tuning_queries=q, partitions=2)
    assert built.info.factory == local.info.factory == "IDMap,IVF512_HNSW32,PQ32x4fsr"
    assert built.info.rerank_store == "residual-SQ6"
    ray_recall, local_recall = _recall(built.search(q, 10)[1], truth), _recall(local.search(q, 10)[1], truth)
    # faiss builds the HNSW graph with several threads, so the two builds may route a few borderline
    # vectors to different lists: the same recall within 1% (30 of the 3,000 neighbours), not bit-equal.
    # (A fixed 0.005 failed in CI at 0.963 against 0.958: 15 neighbours, half a point.)
    assert ray_recall >= 0.9 and abs(ray_recall - local_recall) <= 0.01, (ray_recall, local_recall)


def test_ray_built_index_publishes_loads_and_serves(tmp_path, cluster, data):
    x, ids, q, truth = data
    built = build_ann_on_ray(ArraySource(x, ids), AnnConfig(), tuning_queries=q, partitions=2)
    _, path, manifest = write_index_version(tmp_path, model_version="m", indexes={"image": built})
    assert manifest["indexes"]["image"]["tuning"]["ray_partitions"] == 2
    loaded = load_index_version(path).indexes["image"]
    np.testing.assert_array_equal(loaded.search(q, 10)[1], built.search(q, 10)[1])
    assert _recall(loaded.search(q, 10)[1], truth) >= 0.9
    # The re-rank path: stored vectors reconstructed by row id, close to the originals.
    some = ids[::997]
    at = {int(i): p for p, i in enumerate(ids)}
    original = x[[at[int(i)] for i in some]]
    reconstructed = loaded.reconstruct(some)
    assert np.min(np.sum(reconstructed * original, axis=1)) > 0.99
    # A filter broad enough for the IVF (not the exact subset path) returns only its members.
    allowed = np.sort(ids[::5])
    _, found = loaded.search(q[:20], 10, allowed=allowed)
    assert np.isin(found, allowed).all()


class DyingSource(ArraySource):
    """Kills the worker process reading position `die_at`, the first time only (a marker file)."""

    def __init__(self, vectors, ids, *, die_at: int, marker: Path):
        super().__init__(vectors, ids)
        self.die_at, self.marker, self.driver = die_at, str(marker), os.getpid()

    def read(self, positions):
        if os.getpid() != self.driver and self.die_at in positions:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return super().read(positions)


def test_a_task_whose_worker_dies_is_rerun_and_adds_its_range_once(tmp_path, cluster, data, local):
    x, ids, q, _ = data
    marker = tmp_path / "died"
    source = DyingSource(x, ids, die_at=N // 2 + 10, marker=marker)
    built = build_ann_on_ray(source, AnnConfig(), tuning_queries=q, partitions=2, max_retries=2)
    assert marker.exists()  # the worker did die mid-range
    assert built.ntotal == N
    np.testing.assert_array_equal(built.ids(), np.sort(ids))
    np.testing.assert_array_equal(built.search(q, 10)[1], local.search(q, 10)[1])


def test_a_task_whose_worker_dies_past_its_retries_fails_the_build(tmp_path, cluster, data):
    x, ids, q, _ = data
    source = DyingSource(x, ids, die_at=100, marker=tmp_path / "died")
    with pytest.raises(ray.exceptions.RayError):
        build_ann_on_ray(source, AnnConfig(), tuning_queries=q, partitions=2, max_retries=0)
