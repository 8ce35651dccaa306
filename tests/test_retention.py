"""Index-version retention and journal pruning (PRISM_KEEP_VERSIONS), on a real home."""

import pytest

from api.settings import PrismSettings
from indexer import CatalogIndexer, CatalogUpdater, IndexOptions, apply_retention, index_version_path
from indexer.versions import build_lock, mark_pending
from sample_catalog import draw_product_image
from search import SearchEngine
from store import ProductInput, Store, UnknownVersionError

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")


def _png(i: int) -> bytes:
    import io

    buf = io.BytesIO()
    draw_product_image(i).save(buf, format="PNG")
    return buf.getvalue()


def test_keep_versions_defaults_to_three():
    assert PrismSettings.model_fields["keep_versions"].default == 3
    assert "journal" in PrismSettings.model_fields["keep_versions"].description


def test_retention_drops_old_versions_and_the_journal_they_needed(build_serving_home, tiny_embedder):
    settings = build_serving_home("retention-home")
    indexes = settings.indexes_dir
    store = Store.open(settings.db_url)
    updater = CatalogUpdater(home=settings.home, store=store)

    def change(i: int) -> int:
        return updater.upsert(ProductInput(product_id=f"R-{i}", title=f"retained thing {i}"), tiny_embedder,
                              image=_png(7000 + i)).seq

    def build(activate: bool = True, keep_versions: int = 10) -> str:
        options = IndexOptions(activate=activate, keep_versions=keep_versions)
        return CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder, options=options).run(None).index_version

    try:
        v1 = store.active_index_version().index_version
        change(1), change(2)
        v2 = build()
        change(3), change(4)
        v3 = build()
        seq_v3 = store.get_index_version(v3).manifest["catalog_seq"]
        late = [change(5), change(6)]
        v4 = build()

        outcome = apply_retention(store, settings.home, keep_versions=2)
        assert sorted(outcome.dropped) == sorted([v1, v2])
        assert [v.index_version for v in store.list_index_versions()] == [v3, v4]
        assert not (indexes / v1).exists() and not (indexes / v2).exists()
        assert (indexes / v3 / "manifest.json").is_file() and (indexes / v4 / "manifest.json").is_file()
        assert [c.seq for c in store.catalog_changes(0)] == late  # entries both kept versions hold are gone
        assert outcome.journal_entries_deleted == seq_v3
        assert not list(indexes.glob(".pending-*"))
        with pytest.raises(UnknownVersionError):
            store.activate_index_version(v1)

        # Rolling back to a kept version replays what it lacks from the journal that was kept.
        store.activate_index_version(v3)
        engine = SearchEngine(store, indexes_dir=indexes, device="cpu")
        engine._embedders[tiny_embedder.name] = tiny_embedder
        assert engine.refresh() and engine.serving.version.index_version == v3
        for i in (3, 5, 6):
            assert engine.search(image=draw_product_image(7000 + i), k=1).hits[0].product.product_id == f"R-{i}"

        # The active version is kept however old; builds not activated count among the newest.
        v5, v6 = build(activate=False), build(activate=False)
        outcome = apply_retention(store, settings.home, keep_versions=1)
        assert sorted(outcome.dropped) == sorted([v4, v5])
        assert {v.index_version for v in store.list_index_versions()} == {v3, v6}
        assert [c.seq for c in store.catalog_changes(0)] == late  # v3 still needs them
        assert engine.search(image=draw_product_image(7005), k=1).hits[0].product.product_id == "R-5"
        assert apply_retention(store, settings.home, keep_versions=5).dropped == []

        # A build applies PRISM_KEEP_VERSIONS itself once it has published.
        v7 = build(keep_versions=1)
        assert {v.index_version for v in store.list_index_versions()} == {v7}
        assert not (indexes / v3).exists() and not (indexes / v6).exists()
    finally:
        store.close()


def test_a_retention_killed_between_row_and_files_is_finished_by_the_next_build(build_serving_home, tiny_embedder):
    settings = build_serving_home("retention-crash-home")
    indexes = settings.indexes_dir
    store = Store.open(settings.db_url)
    try:
        old = store.active_index_version()
        CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder, options=IndexOptions()).run(None)
        # What apply_retention does up to the kill: marker made, row deleted, files still there.
        mark_pending(indexes, old.index_version)
        assert store.prune_index_versions([old.index_version])[0] == [old.index_version]
        directory = index_version_path(indexes, old.path)
        assert directory.is_dir()
        recorded = lambda version: store.get_index_version(version) is not None  # noqa: E731
        with build_lock(indexes, is_recorded=recorded):
            pass
        assert not directory.exists() and not list(indexes.glob(".pending-*"))
    finally:
        store.close()


def test_a_build_still_running_keeps_the_journal_it_will_replay(build_serving_home, tiny_embedder):
    """Retention by one build must not prune what a slower build, started earlier, replays."""
    from indexer import build_hold

    settings = build_serving_home("retention-hold-home")
    indexes = settings.indexes_dir
    store = Store.open(settings.db_url)
    updater = CatalogUpdater(home=settings.home, store=store)
    try:
        started_at = store.catalog_seq()
        seqs = [updater.upsert(ProductInput(product_id=f"H-{i}", title=f"held {i}"), tiny_embedder,
                               image=_png(8000 + i)).seq for i in range(3)]
        with build_hold(indexes, started_at, tiny_embedder.name):  # the slow build, embedding since `started_at`
            CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder,
                           options=IndexOptions(keep_versions=1)).run(None)
            assert [c.seq for c in store.catalog_changes(0)] == seqs  # all newer than the slow build's start
        # Finished (or dead: its hold is released either way), the next retention prunes them.
        CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder,
                       options=IndexOptions(keep_versions=1)).run(None)
        assert store.catalog_changes(0) == [] and not list(indexes.glob(".build-hold-*"))
    finally:
        store.close()


def test_retention_drops_model_versions_nothing_needs_with_their_weights_and_vector_cache(build_serving_home, tiny_embedder):
    """Nightly candidates that were replaced are ~600 MB of weights each, plus a vector cache as big
    as the catalog's vectors: retention drops them once no kept index, running retrain or live
    build needs them, and never a pretrained model's row (its weights are not Prism's files)."""
    from embedder import create_base_model, load_embedder, prism_config_path
    from feedback import write_model_version
    from indexer import build_hold

    settings = build_serving_home("retention-models-home")
    home, models = settings.home, settings.home / "models"
    store = Store.open(settings.db_url)
    model, _, _ = create_base_model("prism-tiny-vit", seed=0)
    try:
        for name in ("ft-1", "ft-2", "ft-3", "ft-4", "ft-5"):
            write_model_version(models, name, model, arch="prism-tiny-vit",
                                config_file=prism_config_path("prism-tiny-vit"), info={}, store=store)
            (home / "embeddings" / name).mkdir(parents=True)  # what embedding with it leaves
        served = load_embedder("ft-1", device="cpu", models_dir=models)
        CatalogIndexer(home=home, store=store, embedder=served, options=IndexOptions(keep_versions=10)).run(None)
        run = store.start_training_run(serving_model_version="ft-2", data_window={})

        with build_hold(settings.indexes_dir, store.catalog_seq(), "ft-3"):  # a build embedding with ft-3
            outcome = apply_retention(store, home, keep_versions=1)
            # ft-5 is the newest, ft-1 serves, ft-2 a running retrain starts from, ft-3 is being embedded with.
            assert outcome.model_versions_dropped == ["ft-4"]
            assert not (models / "ft-4").exists() and not (home / "embeddings" / "ft-4").exists()
            assert store.get_model_version("ft-4") is None
            assert all((models / n / "model.json").is_file() for n in ("ft-1", "ft-2", "ft-3", "ft-5"))
            assert store.get_model_version(tiny_embedder.name) is not None  # pretrained: kept
            assert (home / "embeddings" / tiny_embedder.name).is_dir()

        store.finish_training_run(run.id, status="succeeded", decision="rejected", metrics={})
        assert sorted(apply_retention(store, home, keep_versions=1).model_versions_dropped) == ["ft-2", "ft-3"]
        assert sorted(p.name for p in models.iterdir()) == ["ft-1", "ft-5"]  # no marker left behind
        assert {m.model_version for m in store.list_model_versions()} == {tiny_embedder.name, "ft-1", "ft-5"}
        # What still serves still loads.
        assert load_embedder("ft-1", device="cpu", models_dir=models).name == "ft-1"
    finally:
        store.close()
