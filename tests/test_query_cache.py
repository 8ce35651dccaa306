"""The query-vector cache: a repeated query is answered without the encoder, a model switch never
serves a vector of the old model, both bounds hold, and the counts reach /metrics and
GET /v1/models. Real indexes and the tiny model; encoder calls are counted by forward hooks on
the model's own modules, so nothing in Prism is replaced."""

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from embedder import QueryCache, QueryCacheConfig, load_embedder
from embedder.base import tokenizer_lowercases
from indexer import CatalogIndexer, IndexOptions
from search import SearchEngine
from store import Store

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")
TINY = "prism-tiny-vit:random"


class ForwardCounter:
    """How often a model's text and image towers ran (hooks on their first module)."""

    def __init__(self, model):
        self.text = self.image = 0
        self._hooks = [
            model.token_embedding.register_forward_hook(lambda *_: self._add("text")),
            model.visual.register_forward_hook(lambda *_: self._add("image")),
        ]

    def _add(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


@pytest.fixture(scope="module")
def home(build_serving_home):
    # Without the result cache (tests/test_result_cache.py), which answers a repeated text query
    # before its vector is looked up: these tests count the vector cache's own hits.
    return build_serving_home("query-cache-home", result_cache_entries=0)


def _engine(settings, embedder, **kwargs) -> tuple[Store, SearchEngine]:
    store = Store.open(settings.db_url)
    engine = SearchEngine(store, indexes_dir=settings.indexes_dir, device="cpu", **kwargs)
    engine._embedders[embedder.name] = embedder
    assert engine.refresh()
    return store, engine


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_repeated_query_is_served_from_the_cache_without_the_encoder(home):
    embedder = load_embedder(TINY, device="cpu")
    store, engine = _engine(home, embedder)
    counter = ForwardCounter(embedder.model)
    try:
        first = engine.search(text="red running shoes", k=5)
        assert counter.text == 1
        # Spacing and case the tokenizer does not see are one key; the encoder does not run again.
        again = engine.search(text="  Red   running\tSHOES ", k=5)
        assert counter.text == 1
        assert [h.product.product_id for h in again.hits] == [h.product.product_id for h in first.hits]
        assert [h.score for h in again.hits] == [h.score for h in first.hits]
        cached = engine.query_cache.get(embedder.vector_space, "text", "red running shoes")
        np.testing.assert_array_equal(cached, embedder.encode_texts(["red running shoes"]))
        assert counter.text == 2  # that reference encoding ran the model: the hooks count real passes

        image = _png(1)
        engine.search(image=image, k=5)
        engine.search(image=image, k=5)
        assert counter.image == 1
        stats = engine.query_cache_stats()
        assert stats["hits"] == {"text": 2, "image": 1} and stats["misses"] == {"text": 1, "image": 1}
        assert stats["entries"] == 2
    finally:
        counter.close()
        engine.close()
        store.close()


def test_only_what_the_tokenizer_folds_is_folded():
    from open_clip.tokenizer import SimpleTokenizer

    embedder = load_embedder(TINY, device="cpu")
    assert embedder.query_text_key("  Red\u00a0 Shoes\n") == "red shoes"
    # Accents and Unicode forms are the model's to distinguish: kept as typed.
    assert embedder.query_text_key("Café ﬁt") == "café ﬁt"
    assert tokenizer_lowercases(SimpleTokenizer(clean="lower"))
    assert not tokenizer_lowercases(SimpleTokenizer(clean="whitespace"))


def test_a_disabled_cache_encodes_every_query(home):
    embedder = load_embedder(TINY, device="cpu")
    store, engine = _engine(home, embedder, query_cache=QueryCacheConfig(max_entries=0))
    counter = ForwardCounter(embedder.model)
    try:
        engine.search(text="blue mug", k=3)
        engine.search(text="blue mug", k=3)
        assert counter.text == 2
        assert engine.query_cache_stats()["entries"] == 0
    finally:
        counter.close()
        engine.close()
        store.close()


def test_bounds_evict_the_least_recently_used():
    cache = QueryCache(QueryCacheConfig(max_entries=3, max_bytes=1 << 20))
    vec = np.ones((1, 64), np.float32)
    for i in range(3):
        cache.put("m", "text", f"q{i}", vec * i)
    assert cache.get("m", "text", "q0") is not None  # q0 is now the most recent
    cache.put("m", "text", "q3", vec)
    assert cache.get("m", "text", "q1") is None and cache.get("m", "text", "q0") is not None
    assert cache.stats()["entries"] == 3 and cache.stats()["evictions"] == 1

    per_entry = QueryCache(QueryCacheConfig(max_entries=100, max_bytes=1 << 20))
    per_entry.put("m", "text", "x", vec)
    one = per_entry.stats()["bytes"]
    small = QueryCache(QueryCacheConfig(max_entries=100, max_bytes=3 * one + one // 2))
    for i in range(10):
        small.put("m", "text", "x", vec)  # the same key again: replaced, not added
        small.put("m", "text", f"y{i}", vec)
    stats = small.stats()
    assert stats["entries"] == 3 and stats["bytes"] <= small.config.max_bytes

    hit = small.get("m", "text", "y9")
    with pytest.raises(ValueError):  # a served vector cannot be changed by its caller
        hit[0, 0] = 5.0


def test_no_stale_vector_after_a_model_switch(build_serving_home):
    """Activate a version built by another model: the old model's entries go, and the query is
    encoded by the new model."""
    settings = build_serving_home("query-cache-switch")
    first = load_embedder(TINY, device="cpu")
    store, engine = _engine(settings, first)
    other = load_embedder(TINY, device="cpu")
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    other.name = other.spec = "tiny-perturbed"
    try:
        engine.search(text="wooden chair", k=5)
        assert engine.query_cache_stats()["entries"] == 1
        CatalogIndexer(home=settings.home, store=store, embedder=other, options=IndexOptions(batch_size=32)).run(None)
        engine._embedders[other.name] = other
        counter = ForwardCounter(other.model)
        try:
            assert engine.refresh()
            assert engine.query_cache_stats()["entries"] == 0  # dropped with the old model
            result = engine.search(text="wooden chair", k=5)
            assert counter.text == 1 and result.model_version == "tiny-perturbed"
        finally:
            counter.close()
        served = engine.query_cache.get(other.vector_space, "text", "wooden chair")
        np.testing.assert_array_equal(served, other.encode_texts(["wooden chair"]))
        assert float((served @ first.encode_texts(["wooden chair"]).T)[0, 0]) < 0.999
    finally:
        engine.close()
        store.close()


def test_counts_reach_metrics_and_the_models_route(home):
    with TestClient(create_app(home)) as client:
        for q in ("green lamp", "green lamp", "Green  Lamp", "desk"):
            assert client.get("/v1/search", params={"q": q, "k": 3}).status_code == 200
        # The server micro-batches text queries: only the two misses went through the batcher.
        assert client.app.state.services.engine._batcher.stats()["queries"] == 2
        text = client.get("/metrics").text
        assert 'prism_query_cache_hits_total{kind="text"} 2.0' in text
        assert 'prism_query_cache_misses_total{kind="text"} 2.0' in text
        assert "prism_query_cache_entries 2.0" in text
        assert 'prism_encoder_precision_info{encoder="fp32",index="fp32"} 1.0' in text
        body = client.get("/v1/models").json()
        cache = body["query_cache"]
        assert cache["enabled"] and cache["entries"] == 2 and cache["hits"]["text"] == 2
        assert cache["max_entries"] == home.query_cache_entries and cache["max_bytes"] == home.query_cache_bytes
        assert body["encoder_precision"] == "fp32"
        assert {i["precision"] for i in body["indexes"]} == {"fp32"}


def test_cache_settings_are_typed():
    from pydantic import ValidationError

    from api.settings import PrismSettings

    assert PrismSettings(query_cache_entries=5, query_cache_bytes=0).query_cache_config().enabled is False
    with pytest.raises(ValidationError):
        PrismSettings(query_cache_entries=-1)
