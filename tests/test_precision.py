"""Encoder precision: int8 loading quantises the Linear layers and stays close to fp32, bf16 runs
only where the CPU has native kernels, an index records the precision it was built at, and
queries follow the index's precision whatever the settings ask (with a warning)."""

import json
import logging

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import PrismSettings
from embedder import Precision, bf16_support, load_embedder, resolve_precision, vector_space
from embedder.precision import int8_linear_type
from indexer import CatalogIndexer, IndexOptions
from sample_catalog import draw_product_image
from search import SearchEngine
from store import Store

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")
TINY = "prism-tiny-vit:random"
TEXTS = ["red running shoes", "a blue umbrella", "wooden chair for kids", "pizza", "dog toy", "green desk lamp"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)  # both L2-normalised


def _images(n: int = 6):
    return [draw_product_image(i, size=64) for i in range(n)]


@pytest.fixture(scope="module")
def fp32():
    return load_embedder(TINY, device="cpu")


def test_int8_quantises_the_linear_layers_and_stays_close(fp32):
    int8 = load_embedder(TINY, device="cpu", precision="int8")
    assert int8.precision == "int8" and int8.vector_space == f"{int8.name}@int8-token" and int8.name == fp32.name
    kinds = [type(m) for m in int8.model.modules()]
    quantised = [k for k in kinds if k is int8_linear_type()]
    linear = sum(isinstance(m, torch.nn.Linear) for m in fp32.model.modules())
    attention = sum(isinstance(m, torch.nn.MultiheadAttention) for m in fp32.model.modules())
    # Every Linear, and each attention's input projection (a bare parameter of nn.MultiheadAttention,
    # rebuilt as a Linear): nothing of the tiny ViT's Linear work stays fp32.
    assert attention > 0 and len(quantised) == linear + attention
    assert not any(issubclass(k, (torch.nn.Linear, torch.nn.MultiheadAttention)) for k in kinds)

    # Measured on the tiny model: text >= 0.9995, images >= 0.999; 0.99 leaves room across CPUs.
    text = _cosines(fp32.encode_texts(TEXTS), int8.encode_texts(TEXTS))
    images = _images()
    image = _cosines(fp32.encode_images(images), int8.encode_images(images))
    assert text.min() >= 0.99 and image.min() >= 0.99, (text, image)
    assert text.min() < 1.0  # it did change the weights


def test_bf16_where_the_cpu_has_native_kernels(fp32):
    usable, why = bf16_support()
    if not usable:
        used, reason = resolve_precision("bf16", "cpu")
        assert used is Precision.FP32 and why in reason
        pytest.skip(f"bf16: {why}")
    bf16 = load_embedder(TINY, device="cpu", precision="bf16")
    assert bf16.precision == "bf16"
    text = _cosines(fp32.encode_texts(TEXTS), bf16.encode_texts(TEXTS))
    assert text.min() >= 0.99 and text.min() < 1.0, text


def test_a_precision_that_cannot_run_falls_back_to_fp32_with_the_reason():
    used, why = resolve_precision("int8", "cuda")
    assert used is Precision.FP32 and "CPU only" in why
    with pytest.raises(ValueError, match="fp32, bf16 or int8"):
        resolve_precision("fp16")


@pytest.fixture(scope="module")
def int8_home(tmp_path_factory, small_catalog, databases):
    home = tmp_path_factory.mktemp("int8-home")
    store = Store.open(databases.url(home))
    try:
        embedder = load_embedder(TINY, device="cpu", precision="int8")
        CatalogIndexer(home=home, store=store, embedder=embedder, options=IndexOptions(batch_size=32)).run(small_catalog)
    finally:
        store.close()
    return PrismSettings(home=home, device="cpu", model=TINY, database_url=databases.url(home))


def test_the_index_records_its_precision_and_keeps_its_own_vector_cache(int8_home, fp32):
    store = Store.open(int8_home.db_url)
    try:
        active = store.active_index_version()
        assert active.manifest["precision"] == "int8"
    finally:
        store.close()
    manifest = json.loads((int8_home.indexes_dir / active.index_version / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    caches = {p.name for p in (int8_home.home / "embeddings").iterdir() if p.is_dir()}
    assert vector_space(fp32.name, "int8") in caches and fp32.name not in caches


def test_queries_follow_the_index_precision_and_say_so(int8_home, fp32, caplog):
    store = Store.open(int8_home.db_url)
    engine = SearchEngine(store, indexes_dir=int8_home.indexes_dir, device="cpu", precision="fp32")
    try:
        with caplog.at_level(logging.WARNING, logger="search.engine"):
            assert engine.refresh()
        assert any("built at int8 precision" in r.getMessage() and "fp32" in r.getMessage() for r in caplog.records)
        assert engine.serving.embedder.precision == "int8"
        engine.search(text="red running shoes", k=3)
        served = engine.query_cache.get(vector_space(fp32.name, "int8"), "text", "red running shoes")
        reference = load_embedder(TINY, device="cpu", precision="int8").encode_texts(["red running shoes"])
        np.testing.assert_allclose(served, reference, atol=1e-6)
        assert not np.allclose(served, fp32.encode_texts(["red running shoes"]), atol=1e-6)
    finally:
        engine.close()
        store.close()

    with TestClient(create_app(int8_home)) as client:
        body = client.get("/v1/models").json()
        assert body["encoder_precision"] == "int8" and [i["precision"] for i in body["indexes"]] == ["int8"]
        assert 'prism_encoder_precision_info{encoder="int8",index="int8"} 1.0' in client.get("/metrics").text


def test_prism_index_precision_option(tmp_path, small_catalog, databases):
    from prism_cli import run_prism

    env = databases.env(tmp_path / "home")
    bad = run_prism(["index", str(small_catalog), "--model", TINY, "--precision", "fp16"], env, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    supplied = run_prism(["index", str(small_catalog), "--vectors", str(tmp_path / "v.parquet"), "--precision", "int8"],
                         env, check=False)
    assert supplied.returncode == 2 and "give one of them" in supplied.stderr
    done = run_prism(["index", str(small_catalog), "--model", TINY, "--precision", "int8", "--json"], env)
    version = json.loads(done.stdout)["index_version"]
    store = Store.open(databases.url(tmp_path / "home"))
    try:
        assert store.get_index_version(version).manifest["precision"] == "int8"
    finally:
        store.close()


def test_int8_demo_architecture_encodes_both_towers():
    """The demo's towers: MiniLM (HF BERT, plain Linear attention) and a ModifiedResNet whose
    attention pool reads its Linear weights itself (kept fp32, so its images are unchanged)."""
    from embedder import wrap_open_clip
    from embedder.factory import create_base_model

    fp32 = wrap_open_clip(*create_base_model("prism-demo-minilm"), name="demo-arch")
    int8 = wrap_open_clip(*create_base_model("prism-demo-minilm"), name="demo-arch", precision="int8")
    assert int8.precision == "int8"
    assert any(type(m) is int8_linear_type() for m in int8.model.text.modules())
    images = _images(4)
    np.testing.assert_allclose(int8.encode_images(images), fp32.encode_images(images), atol=1e-5)
    # Pretrained MiniLM over 100 emoji names: worst cosine 0.998 (per-batch activation scales, the
    # scheme before: worst 0.953, mean 0.976; docs/architecture.md).
    text = _cosines(fp32.encode_texts(TEXTS), int8.encode_texts(TEXTS))
    assert text.min() >= 0.99 and text.min() < 1.0, text
    smoothed = [m for m in int8.model.text.modules() if type(m) is int8_linear_type() and m.input_divisor is not None]
    assert smoothed, "calibration texts reached no Linear layer of the text tower"


def test_an_int8_vector_does_not_depend_on_the_other_texts_of_its_batch():
    """Activations are quantised per token, so one loud text cannot coarsen another's levels: a
    text's int8 vector in a batch is its vector alone (what lets int8 queries join batches).

    Not bit-equal: the float parts (attention over a padded batch) differ in the last bits, which
    can move a value across an int8 rounding step. Measured: cosine >= 0.9995; with one activation
    scale per batch (the scheme before) 0.94-0.98."""
    from embedder import wrap_open_clip
    from embedder.factory import create_base_model

    int8 = wrap_open_clip(*create_base_model("prism-demo-minilm"), name="demo-arch", precision="int8")
    texts = TEXTS + ["!!!!!!!! MEGA SALE 100000000 %%%% " * 4]
    together = int8.encode_texts(texts)
    alone = np.vstack([int8.encode_texts([t]) for t in texts])
    assert _cosines(together, alone).min() >= 0.999, _cosines(together, alone)


def test_int8_text_queries_join_batches_and_answer_as_alone(int8_home):
    """int8 quantises each token's activations on their own, so a query's vector depends on the
    other queries of its batch only by rounding: int8 queries are micro-batched, and each is the
    query encoded alone to within cosine 0.999."""
    import threading

    from embedder import ModelThread
    from search import BatchConfig

    thread = ModelThread()
    store = Store.open(int8_home.db_url)
    engine = SearchEngine(store, indexes_dir=int8_home.indexes_dir, device="cpu", model_thread=thread,
                          batching=BatchConfig(window_s=2.0, max_batch=64), precision="int8")
    queries = ["red running shoes", "a blue bag", "green kettle", "warm wool socks with a long name " * 3]
    try:
        assert engine.refresh()
        barrier = threading.Barrier(len(queries))

        def one(q):
            barrier.wait()
            engine.search(text=q, k=3)

        workers = [threading.Thread(target=one, args=(q,)) for q in queries]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stats = engine._batcher.stats()
        assert stats["queries"] == len(queries) and stats["batches"] < len(queries), stats
        alone = load_embedder(TINY, device="cpu", precision="int8")
        for q in queries:
            served = engine.query_cache.get(engine.serving.embedder.vector_space, "text", engine.serving.embedder.query_text_key(q.strip()))
            # As close as in test_an_int8_vector_does_not_depend_on_the_other_texts_of_its_batch.
            assert float(np.dot(np.asarray(served).reshape(-1), alone.encode_texts([q.strip()])[0])) >= 0.999
    finally:
        engine.close()
        store.close()
        thread.close()


def test_journaled_vectors_name_their_precision_and_only_that_precision_takes_them(int8_home, fp32):
    """An API change embedded at int8 is journaled under the int8 vector space: an fp32 server
    replays it by re-embedding, never by taking int8 vectors as its own (and the reverse)."""
    from indexer import CatalogUpdater
    from store import ProductInput

    store = Store.open(int8_home.db_url)
    try:
        int8 = load_embedder(TINY, device="cpu", precision="int8")
        seq = store.catalog_seq()
        CatalogUpdater(home=int8_home.home, store=store).upsert(ProductInput("PREC-1", "a precise kettle"), int8)
        (change,) = store.catalog_changes(seq)
        assert change.model_version == int8.vector_space == vector_space(fp32.name, "int8") != fp32.vector_space
        np.testing.assert_allclose(change.text_vector, int8.encode_texts(["a precise kettle"])[0], atol=1e-6)
    finally:
        store.close()


@pytest.mark.no_database
@pytest.mark.parametrize("batch_first", [True, False])
def test_split_self_attention_answers_as_multihead_attention(batch_first):
    """int8 rebuilds nn.MultiheadAttention from two Linear layers it can quantise; at fp32 the
    rebuilt module must answer every call as the original does: masks (float, bool, 3-D), key
    padding, cross-attention, attention weights, unbatched input."""
    from embedder.precision import _split_self_attention

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.attn = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    original = holder.attn
    assert _split_self_attention(holder, set()) == 1 and holder.attn is not original
    x = torch.randn(3, 5, 32) if batch_first else torch.randn(5, 3, 32)
    memory = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    calls = [
        dict(query=x, key=x, value=x, need_weights=False),
        dict(query=x, key=x, value=x, need_weights=False, attn_mask=causal),
        dict(query=x, key=x, value=x, need_weights=False, attn_mask=causal.isinf()),
        dict(query=x, key=x, value=x, need_weights=False, attn_mask=causal.expand(12, 5, 5)),
        dict(query=x, key=x, value=x, need_weights=False, key_padding_mask=padding),
        dict(query=x, key=x, value=x, need_weights=True, attn_mask=causal),
        dict(query=x, key=x, value=x, need_weights=True, average_attn_weights=False),
        dict(query=x, key=memory, value=memory, need_weights=False),
        dict(query=x[0] if batch_first else x[:, 0], key=memory[0] if batch_first else memory[:, 0],
             value=memory[0] if batch_first else memory[:, 0], need_weights=True),
    ]
    with torch.inference_mode():
        for call in calls:
            want_out, want_weights = original(**call)
            got_out, got_weights = holder.attn(**call)
            torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-4)
            assert (got_weights is None) == (want_weights is None)
            if want_weights is not None:
                torch.testing.assert_close(got_weights, want_weights, atol=1e-5, rtol=1e-4)


def test_int8_keeps_a_text_projection_that_open_clip_type_checks():
    """open_clip calls its text projection only when it is an nn.Linear (SigLIP-style configs,
    proj_bias) and otherwise multiplies it as a tensor: int8 leaves that one layer as it is, and
    such a model (no causal mask: every text goes through open_clip's own encode_text) encodes."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from embedder import wrap_open_clip

    def model():
        torch.manual_seed(0)
        return open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=1, head_width=32),
                              text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2,
                                            proj_bias=True, no_causal_mask=True, pool_type="last"))

    preprocess = open_clip.image_transform(32, is_train=False)
    fp32 = wrap_open_clip(model(), preprocess, SimpleTokenizer(context_length=16), name="siglip-like")
    int8 = wrap_open_clip(model(), preprocess, SimpleTokenizer(context_length=16), name="siglip-like", precision="int8")
    assert type(int8.model.text_projection) is torch.nn.Linear
    assert any(type(m) is int8_linear_type() for m in int8.model.transformer.modules())
    assert _cosines(fp32.encode_texts(TEXTS), int8.encode_texts(TEXTS)).min() >= 0.99
    images = _images(3)
    assert _cosines(fp32.encode_images(images), int8.encode_images(images)).min() >= 0.99


@pytest.mark.no_database
def test_int8_on_a_torch_without_a_cpu_int8_product_falls_back_to_fp32_with_the_reason(monkeypatch):
    """Older torch releases ran torch._int_mm on CUDA only: int8 must say so at load and run at
    fp32, not fail on a shopper's first query."""
    from embedder import precision

    def no_kernel(*args, **kwargs):
        raise RuntimeError("_int_mm_out_cpu not implemented")

    monkeypatch.setattr(torch, "_int_mm", no_kernel)
    precision.int8_support.cache_clear()
    try:
        used, why = resolve_precision("int8", "cpu")
        assert used is Precision.FP32 and "torch._int_mm" in why, why
        assert load_embedder(TINY, device="cpu", precision="int8").precision == "fp32"
    finally:
        precision.int8_support.cache_clear()
