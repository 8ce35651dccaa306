"""Query micro-batching: concurrent text queries share one encode and get the answers they would alone."""

import threading

import numpy as np
import pytest

from embedder import ModelThread
from search import BatchConfig, SearchEngine
from search.batcher import TextQueryBatcher
from store import ProductFilter, Store

QUERIES = [f"product {i} in colour {c}" for i, c in enumerate(["red", "blue", "green", "black"] * 6)]


@pytest.fixture(scope="module")
def home(build_serving_home):
    return build_serving_home("batching")


def _engine(settings, batching):
    thread = ModelThread()
    store = Store.open(settings.db_url)
    engine = SearchEngine(store, indexes_dir=settings.indexes_dir, device="cpu", model_thread=thread, batching=batching)
    engine.refresh()
    return engine, store, thread


def _concurrently(fn, items):
    results, errors = [None] * len(items), []
    barrier = threading.Barrier(len(items))

    def worker(i):
        barrier.wait()
        try:
            results[i] = fn(items[i])
        except Exception as exc:  # collected, asserted by the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_concurrent_text_queries_are_batched_and_answer_as_alone(home):
    # A long window, so that the test does not depend on thread timing: every query in flight joins.
    batched, store_a, thread_a = _engine(home, BatchConfig(window_s=2.0, max_batch=64))
    alone, store_b, thread_b = _engine(home, BatchConfig(enabled=False))
    try:
        filters = [ProductFilter(), ProductFilter(categories=("shoes",))] * (len(QUERIES) // 2)
        results, errors = _concurrently(
            lambda i: batched.search(text=QUERIES[i], k=5, filters=filters[i]), list(range(len(QUERIES)))
        )
        assert not errors
        stats = batched._batcher.stats()
        assert stats["queries"] == len(QUERIES) and stats["batches"] < len(QUERIES) // 2
        for i, result in enumerate(results):
            expected = alone.search(text=QUERIES[i], k=5, filters=filters[i])
            assert [h.product.product_id for h in result.hits] == [h.product.product_id for h in expected.hits]
            assert np.allclose([h.score for h in result.hits], [h.score for h in expected.hits], atol=1e-4)
            # Both took the one path (batcher, encode, ANN); only the batched one formed batches.
            assert {"queue", "encode", "ann", "metadata"} <= set(result.timings_ms) & set(expected.timings_ms)
        assert alone._batcher.stats() == {"batches": 0, "queries": 0}
        # A lone query is dispatched at once: nothing else is in flight, so no window is waited for.
        before = batched._batcher.stats()["batches"]
        lone = batched.search(text="a lone query", k=3)
        assert batched._batcher.stats()["batches"] == before + 1 and lone.timings_ms["queue"] < 1000
    finally:
        for engine, store, thread in ((batched, store_a, thread_a), (alone, store_b, thread_b)):
            engine.close()
            thread.close()
            store.close()


def _png(seed: int) -> bytes:
    import io

    from sample_catalog import draw_product_image

    buf = io.BytesIO()
    draw_product_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def test_concurrent_image_queries_are_batched_and_answer_as_alone(home):
    batched, store_a, thread_a = _engine(home, BatchConfig(window_s=2.0, max_batch=64))
    alone, store_b, thread_b = _engine(home, BatchConfig(enabled=False))
    try:
        images = [_png(100 + i) for i in range(12)]
        results, errors = _concurrently(lambda i: batched.search(image=images[i], k=5), list(range(len(images))))
        assert not errors
        stats = batched._batcher.stats()
        assert stats["queries"] == len(images) and stats["batches"] < len(images) // 2
        for i, result in enumerate(results):
            expected = alone.search(image=images[i], k=5)
            assert [h.product.product_id for h in result.hits] == [h.product.product_id for h in expected.hits]
            assert np.allclose([h.score for h in result.hits], [h.score for h in expected.hits], atol=1e-4)
            assert result.query.image_hash == expected.query.image_hash
        # Image and text queries in flight together: each kind is encoded by its own tower, in one batch.
        mixed = [("image", images[0]), ("text", "red shoe")] * 3
        before = batched._batcher.stats()["batches"]
        outs, errors = _concurrently(lambda i: batched.search(**{mixed[i][0]: mixed[i][1]}, k=3, target="text"), list(range(6)))
        assert not errors and batched._batcher.stats()["batches"] - before < 6
        assert all(o.hits for o in outs)
    finally:
        for engine, store, thread in ((batched, store_a, thread_a), (alone, store_b, thread_b)):
            engine.close()
            thread.close()
            store.close()


def test_an_image_the_model_cannot_take_fails_only_its_own_query(tiny_embedder):
    from PIL import Image

    batcher = TextQueryBatcher(BatchConfig(window_s=2.0, max_batch=8))
    good = Image.new("RGB", (64, 64), (200, 30, 30))

    def one(payload):
        with batcher.expecting() as submit:
            return submit(tiny_embedder, payload, lambda v: v.shape, kind="image")

    try:
        # Not an image at all once it reaches the encoder: the batch's encode fails, then each alone.
        results, errors = _concurrently(one, [good, "no such file.png", good])
        assert len(errors) == 1 and [r[0] for r in results if r is not None] == [(1, tiny_embedder.dim)] * 2
    finally:
        batcher.close()


def test_one_failing_query_fails_alone(tiny_embedder):
    batcher = TextQueryBatcher(BatchConfig(window_s=2.0, max_batch=8))

    def follow_up(text):
        def then(vector):
            if text == "bad":
                raise ValueError("this query's own follow-up failed")
            return vector.shape

        return then

    def one(text):
        with batcher.expecting() as submit:
            return submit(tiny_embedder, text, follow_up(text))

    try:
        results, errors = _concurrently(one, ["good one", "bad", "good two"])
        assert [str(e) for e in errors] == ["this query's own follow-up failed"]
        shapes = [r[0] for r in results if r is not None]
        assert shapes == [(1, tiny_embedder.dim)] * 2
        assert all(r[1].size >= 1 for r in results if r is not None)
    finally:
        batcher.close()


def test_withdrawn_queries_do_not_hold_batches(tiny_embedder):
    batcher = TextQueryBatcher(BatchConfig(window_s=30.0, max_batch=8))
    try:
        with batcher.expecting():
            pass  # e.g. the query failed validation after announcing itself
        with batcher.expecting() as submit:
            # Were the withdrawn query still expected, this would wait the whole 30 s window.
            (shape, stats) = submit(tiny_embedder, "still answered", lambda v: v.shape)
        assert shape == (1, tiny_embedder.dim) and stats.size == 1 and stats.queued_ms < 10_000
    finally:
        batcher.close()


def test_closed_batcher_refuses_new_queries(tiny_embedder):
    batcher = TextQueryBatcher(BatchConfig())
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        with batcher.expecting() as submit:
            submit(tiny_embedder, "too late", lambda v: v)
