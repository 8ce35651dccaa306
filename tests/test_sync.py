"""`prism index FEED --sync` (issue 19, item 6): after indexing FEED, the live products it does not
list are deleted through the journal, exactly those; more than --max-delete-fraction of the
catalog is refused and reported; rows rejected for a bad field keep their product; the catalog is
walked a page at a time."""

from __future__ import annotations

import json

import pytest

from indexer import AnnConfig, CatalogIndexer, CatalogUpdater, FeedSync, IndexOptions
from prism_cli import run_prism
from sample_catalog import product_row, write_rows
from search import SearchEngine
from store import ProductInput, Store

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

N = 120


def _feed(root, keep: range | list[int], *, name: str, bad: dict[int, dict] | None = None, fmt: str = "csv"):
    rows = []
    for i in keep:
        row = product_row(i, f"{root}/images/{i:05d}.png")
        row.update((bad or {}).get(i, {}))
        rows.append(row)
    for i, fields in (bad or {}).items():
        if i not in keep:
            rows.append({**product_row(i, f"{root}/images/{i:05d}.png"), **fields})
    return write_rows(root, rows, fmt=fmt, name=name)


def _live_ids(store: Store) -> set[str]:
    return {p.product_id for chunk in store.iter_live_products() for p in chunk}


def test_sync_deletes_exactly_the_absent_products_through_the_journal(build_serving_home, databases, small_catalog, tiny_embedder):
    settings = build_serving_home("sync-home")
    env = databases.env(settings.home)
    store = Store.open(settings.db_url)
    engine = SearchEngine(store, indexes_dir=settings.indexes_dir, device="cpu")
    engine._embedders[tiny_embedder.name] = tiny_embedder
    assert engine.refresh()
    try:
        root = small_catalog.parent
        missing = {3, 17, 40, 41, 42, 77, 90, 118}
        # Row 5 is rejected for its price and row 6 for its currency, while absent otherwise: kept.
        feed = _feed(root, [i for i in range(N) if i not in missing | {5, 6}], name="feed-sync",
                     bad={5: {"price": "cheap"}, 6: {"currency": "euros"}})
        seq = store.catalog_seq()
        done = run_prism(["index", str(feed), "--sync", "--json"], env, check=False)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["rows_rejected"] == 2
        expected = {f"P{i:05d}" for i in missing}
        assert summary["sync"] == {"live_before": N, "absent": len(missing), "deleted": len(missing),
                                   "fraction": round(len(missing) / N, 6), "max_delete_fraction": 0.2,
                                   "refused": False, "reason": None, "unnamed_rejected_rows": 0}
        assert _live_ids(store) == {f"P{i:05d}" for i in range(N)} - expected
        # Journaled as `prism products delete` journals: a serving worker drops them on its next query.
        deletes = {c.product_id for c in store.catalog_changes(seq) if c.op == "delete"}
        assert deletes == expected
        hits = engine.search(text="item", target="text", k=N).hits
        assert len(hits) == N - len(missing) and not {h.product.product_id for h in hits} & expected
        # The summary table says it too.
        again = run_prism(["index", str(feed), "--sync"], env, check=False)
        assert again.returncode == 0 and "deleted 0: 0 of 112 live products (0.0%) absent" in again.stdout, again.stdout
    finally:
        store.close()


def test_sync_refuses_to_delete_more_than_the_allowed_fraction(build_serving_home, databases, small_catalog, tmp_path):
    settings = build_serving_home("sync-refuse-home")
    env = databases.env(settings.home)
    root = small_catalog.parent
    feed = _feed(root, range(0, 70), name="feed-half")  # 50 of 120 absent: 41.7%
    report = tmp_path / "report.json"
    refused = run_prism(["index", str(feed), "--sync", "--report", str(report)], env, check=False)
    assert refused.returncode == 1
    assert "--sync deleted nothing" in refused.stderr and "50 of 120" in refused.stderr, refused.stderr
    assert "--max-delete-fraction 0.42" in refused.stderr
    assert "refused: 50 of 120 live products (41.7%) absent from the feed; deleted 0" in refused.stdout, refused.stdout
    written = json.loads(report.read_text())["sync"]
    assert (written["absent"], written["deleted"], written["refused"]) == (50, 0, True)
    store = Store.open(settings.db_url)
    try:
        assert len(_live_ids(store)) == N
        allowed = run_prism(["index", str(feed), "--sync", "--max-delete-fraction", "0.5", "--json"], env, check=False)
        assert allowed.returncode == 0, allowed.stderr
        assert json.loads(allowed.stdout)["sync"]["deleted"] == 50
        assert _live_ids(store) == {f"P{i:05d}" for i in range(70)}
    finally:
        store.close()
    wrong = run_prism(["index", str(feed), "--max-delete-fraction", "0.5"], env, check=False)
    assert wrong.returncode == 2 and "goes with --sync" in wrong.stderr
    out_of_range = run_prism(["index", str(feed), "--sync", "--max-delete-fraction", "1.5"], env, check=False)
    assert out_of_range.returncode == 2


def test_rows_without_a_product_id_refuse_the_sync(tmp_path, store, tiny_embedder, small_catalog):
    root = small_catalog.parent
    options = IndexOptions(batch_size=32, ann=AnnConfig(flat_threshold=10_000))
    CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder, options=options).run(small_catalog)
    feed = _feed(root, range(0, 110), name="feed-unnamed", fmt="jsonl")
    with open(feed, "a") as fh:
        fh.write("{not json\n")
    sync = IndexOptions(batch_size=32, ann=AnnConfig(flat_threshold=10_000), sync=True)
    summary = CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder, options=sync).run(feed)
    assert summary.sync["refused"] and summary.sync["absent"] == 10 and summary.sync["deleted"] == 0
    assert "name no product_id" in summary.sync["reason"]
    assert store.count_products() == N


def test_sync_walks_the_catalog_a_page_at_a_time(tmp_path, store, tiny_embedder, small_catalog, monkeypatch):
    options = IndexOptions(batch_size=32, chunk_rows=25, build_chunk_rows=25, ann=AnnConfig(flat_threshold=10_000))
    CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder, options=options).run(small_catalog)
    held = {"pages": 0, "deleted": 0, "calls": 0}
    pages, deletes = Store.iter_live_ids, Store.soft_delete_products

    def counting_pages(self, chunk_size=10_000):
        for page in pages(self, chunk_size):
            held["pages"] = max(held["pages"], len(page))
            yield page

    def counting_deletes(self, ids):
        held["deleted"] = max(held["deleted"], len(ids))
        held["calls"] += 1
        return deletes(self, ids)

    monkeypatch.setattr(Store, "iter_live_ids", counting_pages)
    monkeypatch.setattr(Store, "soft_delete_products", counting_deletes)
    monkeypatch.setattr(Store, "live_products", lambda self: pytest.fail("the sync listed every live product"))
    feed = _feed(small_catalog.parent, [i for i in range(N) if i % 10], name="feed-pages")
    sync = IndexOptions(batch_size=32, chunk_rows=25, build_chunk_rows=25, ann=AnnConfig(flat_threshold=10_000),
                        sync=True)
    summary = CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder, options=sync).run(feed)
    assert summary.sync["deleted"] == 12 and store.count_products() == N - 12
    assert 0 < held["pages"] <= 25 and 0 < held["deleted"] <= 25 and held["calls"] >= 2, held


def test_a_product_changed_after_the_sync_started_is_kept(tmp_path, store, tiny_embedder, small_catalog):
    options = IndexOptions(batch_size=32, ann=AnnConfig(flat_threshold=10_000))
    CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder, options=options).run(small_catalog)
    feed = FeedSync(1.0, chunk_rows=50)
    feed.listed(store.live_row_ids([f"P{i:05d}" for i in range(100)]).values())
    # An API change after the sync started: newer than the feed.
    current = store.get_product("P00110")
    store.update_product_metadata(ProductInput("P00110", current.title, price=1.0), expect_updated_at=current.updated_at)
    report = feed.apply(store)
    assert (report["absent"], report["deleted"]) == (19, 19)
    assert store.get_product("P00110") is not None and store.get_product("P00111") is None


@pytest.mark.parametrize("prefer, kept", [("newer", True), ("file", False)])
def test_a_product_created_over_the_api_after_the_feed_was_written_is_kept(tmp_path, store, tiny_embedder, small_catalog,
                                                                         prefer, kept):
    """A feed exported before a product was created (or edited) over the API does not list it: it
    stays, as the file load keeps newer API edits, unless the file is preferred."""
    import os
    import time

    from store import SourcePreference

    options = IndexOptions(batch_size=32, ann=AnnConfig(flat_threshold=10_000))
    CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder, options=options).run(small_catalog)
    feed = _feed(small_catalog.parent, range(N), name=f"feed-exported-{prefer}")
    exported = time.time() - 60
    os.utime(feed, (exported, exported))  # written a minute ago; the product below is newer
    CatalogUpdater(home=tmp_path / "home", store=store).upsert(ProductInput("API-NEW", "made over the API"), tiny_embedder)
    sync = IndexOptions(batch_size=32, ann=AnnConfig(flat_threshold=10_000), sync=True, prefer=SourcePreference(prefer))
    summary = CatalogIndexer(home=tmp_path / "home", store=store, embedder=tiny_embedder, options=sync).run(feed)
    assert summary.sync["deleted"] == (0 if kept else 1)
    assert (store.get_product("API-NEW") is not None) is kept
