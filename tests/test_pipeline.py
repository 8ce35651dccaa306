import json
import shutil

import pytest

from sample_catalog import make_catalog, product_row, write_rows
from indexer import CatalogIndexer, IndexOptions, IndexVersionError, index_version_path, load_index_version, product_text
from search import QueryError, SearchEngine, Target
from store import ProductFilter


def _indexer(tmp_path, store, embedder, **kw):
    return CatalogIndexer(home=tmp_path / "home", store=store, embedder=embedder, options=IndexOptions(batch_size=16), **kw)


@pytest.fixture
def indexed(tmp_path, store, tiny_embedder, small_catalog):
    summary = _indexer(tmp_path, store, tiny_embedder).run(small_catalog)
    engine = SearchEngine(store, indexes_dir=tmp_path / "home" / "indexes", device="cpu")
    engine._embedders[tiny_embedder.name] = tiny_embedder
    assert engine.refresh()
    return summary, engine, small_catalog.parent


def test_index_then_image_to_image_self_retrieval_at_rank_1(indexed):
    summary, engine, root = indexed
    assert summary.products_indexed == 120 and summary.images_embedded == 120 and not summary.row_errors
    for i in range(0, 120, 7):
        result = engine.search(image=str(root / "images" / f"{i:05d}.png"), target="image", k=1)
        assert result.hits[0].product.product_id == f"P{i:05d}"
        assert result.hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_every_route_and_paging(indexed):
    _, engine, root = indexed
    for kind in ({"text": "red shoe model 0"}, {"image": str(root / "images" / "00003.png")}):
        for target in Target:
            result = engine.search(**kind, target=target, k=10)
            assert len(result.hits) == 10 and [h.rank for h in result.hits] == list(range(1, 11))
            assert result.index_version and result.query_id
    text_self = engine.search(text="red shoe model 0. A red item from the shoes range", target="text", k=1)
    assert text_self.hits[0].product.product_id == "P00000"  # text->text finds its own text
    page1 = engine.search(text="hat", target="image", k=5)
    page2 = engine.search(text="hat", target="image", k=5, offset=5)
    both = engine.search(text="hat", target="image", k=10)
    assert [h.product.product_id for h in page1.hits + page2.hits] == [h.product.product_id for h in both.hits]
    assert [h.rank for h in page2.hits] == [6, 7, 8, 9, 10]


def test_selective_filter_still_returns_k(indexed):
    _, engine, _ = indexed
    flt = ProductFilter(categories=("hats",), brands=("acme",))  # 6 of 120 products
    result = engine.search(text="anything", target="image", k=5, filters=flt)
    assert len(result.hits) == 5
    assert all(h.product.category == "hats" and h.product.brand == "acme" for h in result.hits)
    priced = engine.search(text="anything", target="hybrid", k=10, filters=ProductFilter(price_min=50, price_max=80))
    assert len(priced.hits) == 10 and all(50 <= h.product.price <= 80 for h in priced.hits)


def test_bad_queries_are_query_errors(indexed):
    _, engine, _ = indexed
    for kwargs in ({"text": "  "}, {"text": "x", "k": 0}, {"text": "x", "k": 5000}, {"text": "x", "offset": -1},
                   {"text": "x", "target": "video"}, {}, {"text": "x" * 5000}):
        with pytest.raises(QueryError):
            engine.search(**kwargs)


def test_broken_and_missing_images_keep_the_product_text_only(tmp_path, store, tiny_embedder):
    root = tmp_path / "cat"
    make_catalog(root, 10)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [product_row(i, f"images/{i:05d}.png") for i in range(10)]
    rows.append(product_row(10, "images/broken.png"))
    rows.append(product_row(11, "images/missing.png"))
    rows.append(product_row(12, None))
    rows.append({**product_row(13, None), "price": "free"})  # a bad row
    catalog = write_rows(root, rows)
    summary = _indexer(tmp_path, store, tiny_embedder).run(catalog)
    assert summary.products_indexed == 13 and summary.images_embedded == 10
    assert dict(summary.image_failures) == {"broken": 1, "missing": 1}
    assert [(e.line, e.product_id) for e in summary.row_errors] == [(15, "P00013")]
    assert store.get_product("P00010").image_status == "broken"
    assert store.get_product("P00012").image_status == "none"
    engine = SearchEngine(store, indexes_dir=tmp_path / "home" / "indexes", device="cpu")
    engine._embedders[tiny_embedder.name] = tiny_embedder
    engine.refresh()
    hit = engine.search(text=product_text(store.get_product("P00010")), target="text", k=1).hits[0]
    assert hit.product.product_id == "P00010"  # still searchable by text
    image_ids = {h.product.product_id for h in engine.search(text="x", target="image", k=50).hits}
    assert image_ids == {f"P{i:05d}" for i in range(10)}


class _InterruptAfter:
    def __init__(self, stage, n):
        self.stage, self.n, self.seen = stage, n, 0

    def start(self, stage, total):
        pass

    def advance(self, stage, n=1):
        if stage == self.stage:
            self.seen += n
            if self.seen >= self.n:
                raise KeyboardInterrupt

    def finish(self, stage):
        pass


def test_interrupted_ingestion_resumes_without_re_embedding(tmp_path, store, tiny_embedder):
    catalog = make_catalog(tmp_path / "cat", 80)
    with pytest.raises(KeyboardInterrupt):
        _indexer(tmp_path, store, tiny_embedder, progress=_InterruptAfter("embed images", 48)).run(catalog)
    assert store.active_index_version() is None  # nothing half-built was published
    summary = _indexer(tmp_path, store, tiny_embedder).run(catalog)
    assert summary.images_cached == 48 and summary.images_embedded == 32
    assert summary.texts_embedded == 0 and summary.texts_cached == 80
    again = _indexer(tmp_path, store, tiny_embedder).run(catalog)  # nothing changed: nothing embedded
    assert again.images_embedded == 0 and again.texts_embedded == 0
    assert again.index_version != summary.index_version
    assert store.active_index_version().index_version == again.index_version


def test_version_directory_is_complete_verified_and_immutable(tmp_path, store, tiny_embedder, small_catalog):
    summary = _indexer(tmp_path, store, tiny_embedder).run(small_catalog)
    record = store.active_index_version()
    manifest = json.loads((tmp_path / "home" / "indexes" / summary.index_version / "manifest.json").read_text())
    assert set(manifest["files"]) == {"image.faiss", "text.faiss"}
    assert manifest["model_version"] == tiny_embedder.name == record.model_version
    assert manifest["counts"] == {"products": 120, "image": 120, "text": 120}
    assert not list((tmp_path / "home" / "indexes").glob(".tmp-*"))
    shards = list((tmp_path / "home" / "embeddings" / tiny_embedder.name).glob("part-*.arrow"))
    assert shards
    import pyarrow as pa

    with pa.memory_map(str(shards[0])) as source:
        table = pa.ipc.open_file(source).read_all()
    assert {"key", "digest", "product_id", "modality", "vector"} <= set(table.column_names)
    copy = tmp_path / "tampered"
    assert record.path == summary.index_version  # relative to the home's indexes/, see below
    shutil.copytree(index_version_path(tmp_path / "home" / "indexes", record.path), copy)
    with open(copy / "image.faiss", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(IndexVersionError, match="sha256"):
        load_index_version(copy)


def test_a_moved_home_serves_its_own_index_files(tmp_path, store, tiny_embedder, small_catalog):
    summary = _indexer(tmp_path, store, tiny_embedder).run(small_catalog)
    moved = tmp_path / "restored" / "home"
    moved.parent.mkdir()
    shutil.move(tmp_path / "home", moved)  # the old location is gone: nothing may still point there
    engine = SearchEngine(store, indexes_dir=moved / "indexes", device="cpu")
    engine._embedders[tiny_embedder.name] = tiny_embedder
    assert engine.refresh() and engine.serving.version.index_version == summary.index_version
    query = str(small_catalog.parent / "images" / "00042.png")
    assert engine.search(image=query, target="image", k=1).hits[0].product.product_id == "P00042"


def test_deleted_products_leave_results_at_once(indexed, store):
    _, engine, root = indexed
    query = str(root / "images" / "00007.png")
    assert engine.search(image=query, target="image", k=1).hits[0].product.product_id == "P00007"
    store.soft_delete_product("P00007")
    ids = [h.product.product_id for h in engine.search(image=query, target="image", k=10).hits]
    assert "P00007" not in ids and len(ids) == 10
