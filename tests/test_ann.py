import numpy as np
import pytest

from indexer import AnnConfig, AnnIndex
from indexer.ann import _recall

# Touches no database: the suite's SQLite run covers it, its PostgreSQL run skips it.
pytestmark = pytest.mark.no_database


def clustered(n, d=64, clusters=200, seed=0):
    """Unit vectors around random centres on the sphere, like catalog embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + rng.normal(scale=1.0 / np.sqrt(d), size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), centres


@pytest.fixture(scope="module")
def data():
    x, centres = clustered(20_000)
    rng = np.random.default_rng(99)
    q = centres[rng.integers(0, len(centres), 300)] + rng.normal(scale=1.0 / 8, size=(300, 64))
    ids = np.arange(len(x), dtype=np.int64) * 3 + 1000  # ids are not positions
    return x, ids, q.astype(np.float32)


@pytest.fixture(scope="module")
def ivf(data):
    x, ids, _ = data
    return AnnIndex.build(x, ids, AnnConfig(flat_threshold=10_000))


@pytest.fixture(scope="module")
def flat(data):
    x, ids, _ = data
    return AnnIndex.build(x, ids, AnnConfig(flat_threshold=10**9))


def test_flat_is_exact(data, flat):
    x, ids, q = data
    scores, found = flat.search(q[:5], 10)
    sims = (q[:5] / np.linalg.norm(q[:5], axis=1, keepdims=True)) @ x.T
    assert (found == ids[np.argsort(-sims, axis=1)[:, :10]]).all()
    assert flat.info.kind == "flat"


def test_ivfpq_reaches_recall_target_on_held_out_queries(data, ivf, flat):
    _, _, q = data
    assert ivf.info.kind == "ivfpq" and ",IVF" in ivf.info.factory and ",PQ" in ivf.info.factory
    assert ivf.info.recall_at_10 >= 0.95 and ivf.info.nprobe >= 1
    _, truth = flat.search(q, 10)
    _, found = ivf.search(q, 10)
    assert _recall(found, truth) >= 0.95  # fresh queries the tuner never saw
    # Of the settings that reached the target, the tuner kept the cheapest (modelled, so that two
    # builds of the same vectors choose alike), and it tried a deeper re-rank at fewer lists.
    curve = ivf.info.tuning["curve"]
    meeting = [p for p in curve if p["recall_at_10"] >= 0.95]
    chosen = next(p for p in meeting if (p["rerank_factor"], p["nprobe"]) == (ivf.info.rerank_factor, ivf.info.nprobe))
    assert chosen["modelled_us"] == min(p["modelled_us"] for p in meeting)
    first = meeting[0]
    if first["nprobe"] > 1:
        assert any(p["rerank_factor"] > first["rerank_factor"] and p["nprobe"] == first["nprobe"] // 2 for p in curve)


def test_rerank_codes_are_compact_and_close_to_the_vectors(data, ivf):
    import faiss

    x, ids, _ = data
    pick = np.arange(0, len(ids), 101)
    approx = ivf.reconstruct(ids[pick])
    assert np.abs(approx - x[pick]).max() < 0.05  # residual codes: far finer than the PQ code alone
    pq_only = ivf.index.index.reconstruct_batch(pick)
    assert np.abs(approx - x[pick]).mean() < 0.2 * np.abs(pq_only - x[pick]).mean()
    stored = faiss.serialize_index(ivf.index).nbytes + faiss.serialize_index(ivf.refine).nbytes
    assert stored < 0.45 * x.nbytes  # SQ8 residuals + PQ codes + ids, against float32 vectors
    with pytest.raises(KeyError):
        ivf.reconstruct(np.array([ids.max() + 1]))


def test_old_format_is_refused_with_a_rebuild_hint(tmp_path, ivf):
    ivf.save(tmp_path, "image")
    with pytest.raises(ValueError, match="rebuild"):
        AnnIndex.load(tmp_path, "image", {**ivf.info.to_dict(), "format": 1})


def test_a_format_2_index_scanned_by_inner_product_loads_and_reranks(tmp_path, data, flat):
    """The release before fast-scan built 8-bit IVF-PQ on inner product (its scan's distances are
    q.b already, no norms) with residual re-rank codes: it still loads, and ranks near exactly."""
    import faiss

    x, ids, q = data
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    ivf = faiss.index_factory(x.shape[1], "IVF64,PQ16", faiss.METRIC_INNER_PRODUCT)
    ivf.train(unit)
    index = faiss.IndexIDMap(ivf)  # made while empty, as the builds of that release did
    ivf.add(unit)
    ivf.make_direct_map(True)
    faiss.copy_array_to_vector(ids.astype(np.int64), index.id_map)
    index.ntotal = ivf.ntotal
    refine = faiss.index_factory(x.shape[1], "SQ8", faiss.METRIC_INNER_PRODUCT)
    residual = unit - ivf.reconstruct_batch(np.arange(len(x), dtype=np.int64))
    refine.train(residual)
    refine.add(residual)
    faiss.write_index(index, str(tmp_path / "image.faiss"))
    faiss.write_index(refine, str(tmp_path / "image.rerank.faiss"))
    info = {"kind": "ivfpq", "factory": "IDMap,IVF64,PQ16", "count": len(x), "dim": x.shape[1], "nlist": 64,
            "nprobe": 16, "rerank_store": "residual-SQ8", "rerank_factor": 8, "format": 2}
    loaded = AnnIndex.load(tmp_path, "image", info)
    assert loaded.base_norms is None
    _, truth = flat.search(q, 10)
    _, found = loaded.search(q, 10)
    assert _recall(found, truth) >= 0.9


def test_selective_and_broad_filters_return_k_members(data, ivf):
    _, ids, q = data
    for allowed in (ids[::997], ids[::40], ids[::3]):  # 21 members, 500 members, ~6.7k members
        scores, found = ivf.search(q[:20], 10, allowed=allowed)
        assert np.isin(found, allowed).all() and (found >= 0).all()
        assert (np.diff(scores, axis=1) <= 1e-6).all()
    few = ids[:4]
    _, found = ivf.search(q[:2], 10, allowed=few)
    assert sorted(found[0][found[0] >= 0]) == sorted(few) and (found[0][4:] == -1).all()


def test_excluded_ids_never_come_back(data, ivf):
    _, _, q = data
    _, first = ivf.search(q[:10], 10)
    _, again = ivf.search(q[:10], 10, excluded=first[:, 0])
    assert not np.isin(again, first[:, 0]).any()


def test_save_and_load_round_trip(tmp_path, data, ivf):
    _, _, q = data
    files = ivf.save(tmp_path, "image")
    assert files == ["image.faiss", "image.rerank.faiss", "image.norms.npy"]
    loaded = AnnIndex.load(tmp_path, "image", ivf.info.to_dict())
    assert (loaded.search(q[:5], 10)[1] == ivf.search(q[:5], 10)[1]).all()


def test_rerank_scores_are_the_query_dot_the_reconstructed_vectors(data, ivf):
    """The re-rank reads q.b from the scan's distance and the stored norm |b|^2: the score must
    still be q.(b + r), as decoding b would give (up to the scan's 8-bit lookup tables)."""
    _, _, q = data
    scores, found = ivf.search(q[:20], 10)
    unit = q[:20] / np.linalg.norm(q[:20], axis=1, keepdims=True)
    decoded = np.einsum("qkd,qd->qk", ivf.reconstruct(found.reshape(-1)).reshape(20, 10, -1), unit)
    assert np.abs(scores - decoded).max() < 0.02


def test_an_index_saved_without_norms_loads_and_computes_them(tmp_path, data, ivf):
    """Format 3 (and 2) stored no norms: they are decoded on load, and search as a rebuild would."""
    _, _, q = data
    ivf.save(tmp_path, "image")
    (tmp_path / "image.norms.npy").unlink()
    loaded = AnnIndex.load(tmp_path, "image", {**ivf.info.to_dict(), "format": 3})
    assert np.allclose(loaded.base_norms, ivf.base_norms, atol=1e-5)
    assert (loaded.search(q[:20], 10)[1] == ivf.search(q[:20], 10)[1]).all()


def test_bad_build_inputs():
    with pytest.raises(ValueError, match="unique"):
        AnnIndex.build(np.ones((2, 4), np.float32), np.array([1, 1]))
    with pytest.raises(ValueError, match="ids"):
        AnnIndex.build(np.ones((2, 4), np.float32), np.array([1]))


def test_hnsw_coarse_quantizer_builds_tunes_saves_and_loads(tmp_path, data, flat):
    """Large catalogs (thousands of lists) find their lists through an HNSW graph over the centroids,
    adds walking it as widely as `add_ef_search` says."""
    import faiss

    x, ids, q = data
    ann = AnnIndex.build(x, ids, AnnConfig(flat_threshold=10_000, hnsw_quantizer_from=16, add_chunk=3000, add_ef_search=24))
    assert "_HNSW32" in ann.info.factory and "x4fsr" in ann.info.factory and ann.info.recall_at_10 >= 0.95
    assert faiss.downcast_index(faiss.extract_index_ivf(ann.index).quantizer).hnsw.efSearch == 24
    ann.save(tmp_path, "image")
    loaded = AnnIndex.load(tmp_path, "image", ann.info.to_dict())
    _, truth = flat.search(q, 10)
    _, found = loaded.search(q, 10)
    assert _recall(found, truth) >= 0.95
    assert np.abs(loaded.reconstruct(ids[:50]) - x[:50]).max() < 0.05  # fast-scan codes + residuals, after a load


def test_masked_rows_are_dropped_after_the_scan_or_selected_and_never_returned(data, ivf):
    """Deleted rows are fetched past and dropped after the scan, whatever their share."""
    from indexer import IdSet

    _, ids, q = data
    _, first = ivf.search(q[:20], 10)
    for masked in (np.unique(first[:, :5]), ids[::3], ids[np.arange(len(ids)) % 50 != 0]):  # ~100 rows, a third, 98%
        scores, again = ivf.search(q[:20], 10, excluded=IdSet(np.sort(masked)))
        assert not np.isin(again, masked).any() and (again >= 0).all()
        assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_broad_filters_dropped_after_the_scan_rank_as_a_selector_does(data, ivf, flat, monkeypatch):
    """A filter leaving a few percent or more is applied after the scan (cheaper than a selector on
    fast-scan codes): the same members come back as through the selector, near the exact ones."""
    import indexer.ann as ann_module

    _, ids, q = data
    for allowed in (ids[::3], ids[::40]):  # a third, 2.5%: both above POST_FILTER_MIN_KEPT_SHARE
        _, after_scan = ivf.search(q[:100], 10, allowed=allowed)
        with monkeypatch.context() as forced:
            forced.setattr(ann_module, "POST_FILTER_MIN_KEPT_SHARE", 2.0)  # never: always a selector
            _, selected = ivf.search(q[:100], 10, allowed=allowed)
        _, exact = flat.search(q[:100], 10, allowed=allowed)
        assert np.isin(after_scan, allowed).all() and (after_scan >= 0).all()
        assert _recall(after_scan, selected) >= 0.97
        assert _recall(after_scan, exact) >= _recall(selected, exact) - 0.01


def test_rerank_compact_from_setting_chooses_the_residual_bits(tmp_path, data, flat):
    """PRISM_RERANK_COMPACT_FROM reaches the build: 6-bit residuals from that many vectors, 8-bit
    below; both reach the recall target on fresh queries."""
    from dataclasses import replace

    from api.settings import PrismSettings

    x, ids, q = data
    _, truth = flat.search(q, 10)
    for compact_from, store in ((len(x), "residual-SQ6"), (len(x) + 1, "residual-SQ8")):
        config = PrismSettings(home=tmp_path, rerank_compact_from=compact_from).index_options().ann
        ann = AnnIndex.build(x, ids, replace(config, flat_threshold=10_000))
        assert ann.info.rerank_store == store
        assert _recall(ann.search(q, 10)[1], truth) >= 0.95
