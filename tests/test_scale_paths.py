"""What lets `prism index` scale: bring-your-own vectors, stages that stream, the vector cache's
shards, and index formats of earlier releases."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ann_scale import clip_like
from prism_cli import run_prism

DIM = 512


def _catalog(path, n, *, category=lambda i: "shoes" if i % 10 == 0 else "other"):
    pq.write_table(pa.table({
        "product_id": [f"S{i:05d}" for i in range(n)],
        "title": [f"product number {i}" for i in range(n)],
        "category": [category(i) for i in range(n)],
        "price": [float(i % 100) for i in range(n)],
    }), path)
    return path


def _vectors(path, ids, matrix, *, kind="fixed"):
    if kind == "fixed":
        column = pa.FixedSizeListArray.from_arrays(pa.array(matrix.astype(np.float16).reshape(-1)), matrix.shape[1])
    else:
        column = pa.array([list(map(float, v)) if v is not None else None for v in matrix], pa.list_(pa.float32()))
    pq.write_table(pa.table({"product_id": ids, "image_vector": column}), path)
    return path


def test_index_with_supplied_vectors_reports_bad_rows_searches_and_reembeds_nothing_on_rerun(tmp_path, databases):
    """`prism index CATALOG --vectors V --model ViT-B-32:random`, as a team with its own GPU fleet runs it."""
    home = tmp_path / "home"
    env = databases.env(home, PRISM_MODEL="ViT-B-32:random")
    n = 300
    catalog = _catalog(tmp_path / "catalog.parquet", n)
    x = clip_like(n, DIM, seed=1)
    ids = [f"S{i:05d}" for i in range(n)]
    good = _vectors(tmp_path / "good.parquet", ids, x, kind="list")
    out = run_prism(["index", str(catalog), "--vectors", str(good), "--json"], env, timeout=600)
    summary = json.loads(out.stdout)
    assert summary["products_indexed"] == n and summary["images_supplied"] == n and summary["images_embedded"] == 0
    assert summary["texts_embedded"] == 0 and summary["indexes"]["image"]["count"] == n
    assert summary["indexes"]["text"]["count"] == 0  # no text vectors supplied: nothing embedded here
    assert set(summary["stage_seconds"]) == {"catalog", "vectors", "build"}  # where the time went, per stage
    assert all(0 < seconds <= summary["seconds"] for seconds in summary["stage_seconds"].values())

    # Bad rows: each reported with its line and reason, the rest indexed. 1% of vectors changed.
    rows = [list(map(float, v)) for v in x]
    rows[0] = [float("nan")] * DIM
    rows[1] = [0.0] * DIM
    rows[2] = rows[2][:100]
    changed = x[3:6] + 0.05 * clip_like(3, DIM, seed=9)
    for i, v in zip(range(3, 6), changed):
        rows[i] = list(map(float, v))
    bad_ids = ids + ["NOT-IN-CATALOG", "S00010"]
    rows += [rows[7], rows[10]]
    table = pa.table({"product_id": bad_ids, "image_vector": pa.array(rows, pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "bad.parquet")
    out = run_prism(["index", str(catalog), "--vectors", str(tmp_path / "bad.parquet"), "--json"], env, timeout=600)
    summary = json.loads(out.stdout)
    reasons = {e["line"]: (e["product_id"], e["reason"]) for e in summary["row_errors"]}
    assert "NaN" in reasons[1][1] and "zeros" in reasons[2][1] and "100 values" in reasons[3][1]
    assert reasons[n + 1] == ("NOT-IN-CATALOG", "vectors file: no live product with this id in the catalog")
    assert reasons[n + 2][0] == "S00010" and "second row" in reasons[n + 2][1]
    assert len(reasons) == 5
    assert summary["images_supplied"] == 3 and summary["images_cached"] == n - 6  # only the changed ones are new

    res = json.loads(run_prism(["search", "product", "--target", "image", "-k", "5", "--json"], env).stdout)
    assert len(res["results"]) == 5

    # A file-level problem is a message and exit 2, before the model loads.
    wrong = _vectors(tmp_path / "wrong.parquet", ids[:5], clip_like(5, 256, seed=3))
    proc = run_prism(["index", str(catalog), "--vectors", str(wrong)], env, check=False)
    assert proc.returncode == 2 and "256 values" in proc.stderr and "Traceback" not in proc.stderr


def test_supplied_vectors_are_what_the_index_serves(tmp_path, store, tiny_embedder):
    from indexer import CatalogIndexer, IndexOptions, load_index_version

    n = 40
    catalog = _catalog(tmp_path / "c.parquet", n)
    x = np.random.default_rng(0).standard_normal((n, tiny_embedder.dim)).astype(np.float32)
    ids = [f"S{i:05d}" for i in range(n)]
    vectors = _vectors(tmp_path / "v.parquet", ids, x, kind="list")
    summary = CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder).run(catalog, vectors=vectors)
    version = load_index_version(tmp_path / "home" / "indexes" / summary.index_version)
    rows = store.live_row_ids(ids)
    stored = version.indexes["image"].reconstruct(np.asarray([rows[i] for i in ids]))
    expected = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.allclose(stored, expected, atol=1e-5)
    before = store.get_product("S00003")
    assert before.image_status == "supplied"

    # An API edit of the text re-embeds the text and keeps the supplied image vector.
    from indexer import CatalogUpdater
    from store import ProductInput

    outcome = CatalogUpdater(home=tmp_path / "home", store=store).upsert(ProductInput("S00003", "renamed"), tiny_embedder)
    assert outcome.image_action == "keep"
    after = store.get_product("S00003")
    assert (after.image_status, after.image_hash) == ("supplied", before.image_hash) and after.title == "renamed"


def test_vectors_of_another_models_width_fail_before_the_catalog_is_written(tmp_path, store, tiny_embedder):
    """A fixed-size vector column of the wrong width rejects the whole file. That must happen before
    the catalog loads (10M rows take a while), and leave the products and index versions as they were."""
    from indexer import CatalogIndexer, VectorsFileError

    n = 20
    ids = [f"S{i:05d}" for i in range(n)]
    x = np.random.default_rng(0).standard_normal((n, tiny_embedder.dim)).astype(np.float32)
    CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder).run(
        _catalog(tmp_path / "c.parquet", n), vectors=_vectors(tmp_path / "v.parquet", ids, x))
    versions = len(store.list_index_versions())

    changed = _catalog(tmp_path / "changed.parquet", n + 5, category=lambda i: "changed")
    wrong = _vectors(tmp_path / "wrong.parquet", ids, np.ones((n, tiny_embedder.dim + 1), np.float32))
    with pytest.raises(VectorsFileError, match="were they made by a different model"):
        CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder).run(changed, vectors=wrong)
    assert store.count_products() == n and store.get_product("S00003").category == "other"
    assert len(store.list_index_versions()) == versions


def test_no_stage_holds_the_whole_catalog(tmp_path, store, tiny_embedder, small_catalog, monkeypatch):
    """Every stage works a bounded chunk at a time: counted where rows and vectors are handed over."""
    from embedder import VectorCache
    from indexer import AnnConfig, CatalogIndexer, IndexOptions
    from store import Store

    held = {"rows": 0, "vectors": 0}

    def counting(name, what, measure):
        original = getattr(cls_of[name], name)

        def wrapper(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if hasattr(result, "__next__"):
                return (held.__setitem__(what, max(held[what], measure(chunk))) or chunk for chunk in result)
            held[what] = max(held[what], measure(args[0] if what == "rows" else result))
            return result

        monkeypatch.setattr(cls_of[name], name, wrapper)

    cls_of = {"upsert_products": Store, "iter_live_products": Store, "iter_indexable": Store, "read": VectorCache}
    counting("upsert_products", "rows", len)
    counting("iter_live_products", "rows", len)
    counting("iter_indexable", "rows", lambda chunk: len(chunk[0]))
    counting("read", "vectors", len)
    monkeypatch.setattr(Store, "live_products", lambda self: pytest.fail("a stage listed every live product"))

    options = IndexOptions(batch_size=16, chunk_rows=25, build_chunk_rows=25,
                           ann=AnnConfig(flat_threshold=0, add_chunk=32, max_train_points=30, tuning_queries=20))
    summary = CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder, options=options).run(small_catalog)
    assert summary.products_indexed == 120 and summary.indexes["image"]["count"] == 120
    assert 0 < held["rows"] <= 25, held
    assert 0 < held["vectors"] <= 32, held  # training sample (bounded by the config), tuning queries, add chunks


def test_vector_cache_finds_vectors_without_loading_them_and_compacts_small_shards(tmp_path):
    from embedder import VectorCache

    rng = np.random.default_rng(0)
    cache = VectorCache(tmp_path / "c", 8, flush_every=10)
    vectors = rng.standard_normal((95, 8)).astype(np.float32)
    for i, v in enumerate(vectors):
        cache.put(f"image:{i}", v, modality="image", ref=f"P{i}")
    cache.flush()
    assert len(list((tmp_path / "c").glob("part-*.arrow"))) == 10
    # A shard of an earlier release (Parquet) is still read.
    legacy = pa.table({"key": ["text:old"], "modality": ["text"], "product_id": ["P0"],
                       "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, np.float32)), 8)})
    pq.write_table(legacy, tmp_path / "c" / "part-legacy.parquet")
    reopened = VectorCache(tmp_path / "c", 8)
    assert len(reopened) == 96
    got, found = reopened.get_many(["image:7", "text:old", "image:nope", "image:94"])
    assert found.tolist() == [True, True, False, True]
    assert np.allclose(got[[0, 3]], vectors[[7, 94]]) and np.allclose(got[1], 1.0)
    assert reopened.put_many(["image:7", "image:new", "image:new"], np.ones((3, 8), np.float32),
                             modality="image", refs=["a", "b", "c"]) == 1  # known and repeated keys skipped

    assert VectorCache.compact(tmp_path / "c") == 12  # 10 small shards, the put_many one, the legacy one
    assert [p.suffix for p in (tmp_path / "c").glob("part-*")] == [".arrow"]
    compacted = VectorCache(tmp_path / "c", 8)
    assert len(compacted) == 97
    got, found = compacted.get_many([f"image:{i}" for i in range(95)] + ["text:old", "image:new"])
    assert found.all() and np.allclose(got[:95], vectors)


def test_index_of_the_previous_format_still_loads_and_searches(tmp_path):
    """Format 2 (8-bit IVF-PQ on inner product + residual codes) was written by the last release."""
    import faiss

    from indexer import AnnIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(3000, dtype=np.int64) * 7
    ivf = faiss.index_factory(32, "IVF16,PQ8", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    index = faiss.IndexIDMap(ivf)
    index.add_with_ids(x, ids)
    ivf.make_direct_map(True)
    refine = faiss.index_factory(32, "SQ8")
    residual = x - ivf.reconstruct_batch(np.arange(3000))
    refine.train(residual)
    refine.add(residual)
    faiss.write_index(index, str(tmp_path / "image.faiss"))
    faiss.write_index(refine, str(tmp_path / "image.rerank.faiss"))
    info = {"kind": "ivfpq", "factory": "IDMap,IVF16,PQ8", "count": 3000, "dim": 32, "nlist": 16, "nprobe": 16,
            "rerank_store": "residual-SQ8", "rerank_factor": 8, "format": 2}
    loaded = AnnIndex.load(tmp_path, "image", info)
    _, found = loaded.search(x[:20], 1)
    assert (found[:, 0] == ids[:20]).all()


def test_rerank_codes_stream_to_the_version_file_and_no_build_holds_them(tmp_path, store, tiny_embedder,
                                                                        small_catalog, monkeypatch):
    """The re-rank codes (6/7 of an IVF-PQ index's bytes) are written as each chunk is encoded,
    never gathered in memory: counted at every chunk, bytes held in the quantizer and on disk."""
    from indexer import AnnConfig, AnnIndex, CatalogIndexer, IndexOptions
    from indexer.ann import RerankCodeFile

    seen = []
    original = RerankCodeFile.add

    def counting(self, x):
        original(self, x)
        self._file.flush()
        seen.append((len(x), int(self.refine.ntotal), self.path.stat().st_size - len(self._header) - 8,
                     self.ntotal * self.refine.code_size))

    monkeypatch.setattr(RerankCodeFile, "add", counting)
    options = IndexOptions(batch_size=16, chunk_rows=25, build_chunk_rows=25,
                           ann=AnnConfig(flat_threshold=0, add_chunk=32, max_train_points=30, tuning_queries=20))
    home = tmp_path / "home"
    summary = CatalogIndexer(home=home, store=store, embedder=tiny_embedder, options=options).run(small_catalog)
    assert summary.indexes["image"]["kind"] == "ivfpq"
    assert len(seen) >= 2 * (120 // 32)  # image and text, chunk by chunk
    for chunk, held_in_memory, on_disk, written in seen:
        assert chunk <= 32 and held_in_memory == 0 and on_disk == written > 0
    # What was published is the streamed file, whole and loadable; the build's scratch is gone.
    indexes = home / "indexes"
    assert not list(indexes.glob(".tmp-*"))
    version = store.active_index_version()
    ann = AnnIndex.load(indexes / version.path, "image", version.manifest["indexes"]["image"])
    assert ann.refine.ntotal == ann.ntotal == 120
    some = ann.ids()[:5]
    stored = ann.reconstruct(some)
    scores, found = ann.search(stored, 1)
    # Each stored vector is a candidate for itself: nothing ranks below it (random tiny-model
    # vectors have near-duplicates, so the top id itself may differ).
    assert (found[:, 0] >= 0).all() and (scores[:, 0] >= np.einsum("qd,qd->q", stored, stored) - 0.05).all()


def test_streamed_rerank_file_is_what_faiss_writes_and_a_failed_build_leaves_none(tmp_path):
    import faiss

    from indexer.ann import AnnConfig, AnnIndex, ArraySource, RerankCodeFile

    x = clip_like(6000, 64, seed=3)
    ids = np.arange(6000, dtype=np.int64) * 3 + 1
    config = AnnConfig(flat_threshold=1000, tuning_queries=50, add_chunk=1000)
    in_memory = AnnIndex.build(x, ids, config)
    streamed = AnnIndex.build_from(ArraySource(x, ids), config, rerank_file=tmp_path / "scratch" / "image.rerank.faiss")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    in_memory.save(tmp_path / "a", "image")
    streamed.save(tmp_path / "b", "image")
    assert (tmp_path / "a" / "image.rerank.faiss").read_bytes() == (tmp_path / "b" / "image.rerank.faiss").read_bytes()
    assert (tmp_path / "b" / "image.rerank.faiss").stat().st_ino == (tmp_path / "scratch" / "image.rerank.faiss").stat().st_ino
    assert np.array_equal(in_memory.search(x[:30], 10)[1], streamed.search(x[:30], 10)[1])

    refine = faiss.index_factory(64, "SQ8", faiss.METRIC_INNER_PRODUCT)
    refine.train(x)
    path = tmp_path / "failed.rerank.faiss"
    with pytest.raises(RuntimeError):
        with RerankCodeFile(refine, path) as codes:
            codes.add(x[:100])
            raise RuntimeError("killed mid-build")
    assert not path.exists()
