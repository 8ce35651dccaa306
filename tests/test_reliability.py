"""Faults under load, small: SIGKILL mid event stream, version swaps mid query stream.

The same scenarios run at full size in `make reliability` (benchmarks/reliability.py). Here the
real `prism serve` runs in its own process group against a home with two index versions built by
two model versions, so a swap also changes the model that encodes queries.
"""

import io

import pytest

from load_faults import durability, hot_swap
from sample_catalog import draw_product_image

TINY_CHECKPOINT = "prism-tiny-vit:{path}"


@pytest.fixture(scope="module")
def two_version_home(build_serving_home, small_catalog, tmp_path_factory, databases):
    """A home serving the small catalog, with a second index version from another model version."""
    import warnings

    from embedder import load_embedder
    from indexer import CatalogIndexer, IndexOptions
    from embed_throughput import save_random_checkpoint
    from store import Store

    settings = build_serving_home("two-versions")
    checkpoint = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_random_checkpoint("prism-tiny-vit", checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = load_embedder(TINY_CHECKPOINT.format(path=checkpoint), device="cpu")
    store = Store.open(databases.url(settings.home))
    try:
        first = store.active_index_version().index_version
        CatalogIndexer(home=settings.home, store=store, embedder=other, options=IndexOptions(batch_size=32)).run(small_catalog)
        versions = [v.index_version for v in store.list_index_versions()]
    finally:
        store.close()
    assert len(versions) == 2 and first in versions
    return settings, versions


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    draw_product_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def test_sigkill_mid_stream_loses_no_acknowledged_event_and_retries_add_nothing(two_version_home, databases, tmp_path):
    settings, _ = two_version_home
    result = durability(
        databases.env(settings.home, PRISM_DEVICE="cpu", PRISM_THREADS="1"), databases.url(settings.home),
        events=2_000, clients=16, batch_size=20, retry_fraction=0.2, kill_at_fraction=0.4, log=tmp_path / "serve.log",
    )
    # The kill really landed mid-stream: clients saw the server gone and had batches to retry.
    assert len(result["kills"]) == 1 and result["kills"][0]["acked_at_kill"] < 2_000 and result["failed_posts"] > 0
    assert result["acknowledged"] == 2_000 and result["never_acknowledged"] == 0
    assert result["lost"] == 0 and result["lost_acknowledged_before_kill"] == 0
    assert result["rows_added"] == 2_000  # exactly one row per event, acknowledged twice or not at all meanwhile
    assert result["retries_after_ack"] > 0 and result["retries_answered_all_duplicates"] == result["retries_after_ack"]
    # "stored" answers fall short of 2,000 only by batches committed just before the kill, whose
    # answer was lost: their retry was answered "duplicate".
    assert result["stored_answers"] + result["duplicate_answers"] == 2_000


def test_swapping_versions_under_query_load_fails_no_query(two_version_home, databases, tmp_path):
    settings, versions = two_version_home
    result = hot_swap(
        databases.env(settings.home, PRISM_DEVICE="cpu", PRISM_THREADS="1"), versions,
        swaps=6, interval_s=1.0, clients=8, workers=2, image=_png(4242), log=tmp_path / "serve.log",
    )
    assert result["activations_ok"] == 6
    assert result["failed"] == 0, result["failures"]
    assert set(result["versions_served"]) == set(versions)  # both versions really served
    assert result["queries"] > 50


def test_two_replicas_swap_versions_under_query_load_and_fail_no_query(two_version_home, databases, tmp_path):
    """Two `prism serve` replicas, each its own home, sharing the database and the versions'
    directory (PRISM_SHARED_DIR): activations sent to either reach both, with no failed query."""
    settings, versions = two_version_home
    result = hot_swap(
        databases.env(settings.home, PRISM_DEVICE="cpu", PRISM_THREADS="1"), versions,
        swaps=4, interval_s=1.5, clients=8, workers=1, image=_png(4242), log=tmp_path / "serve.log",
        replica_homes=[tmp_path / "replica-0", tmp_path / "replica-1"],
    )
    assert result["replicas"] == 2 and result["activations_ok"] == 4
    assert result["failed"] == 0, result["failures"]
    assert set(result["versions_served"]) == set(versions)
    for replica in ("replica-0", "replica-1"):  # each served from its own verified copies
        assert {p.name for p in (tmp_path / replica / "replica" / "indexes").iterdir()} == set(versions)
