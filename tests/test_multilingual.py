"""Multilingual text towers through `hf:DIR` (ChineseCLIP, SigLIP) and the default open_clip model
loaded from a local Hugging Face cache, end to end: `prism index`, then text and image search.

The models are tiny and randomly initialised, built here from `transformers` configs with a
tokenizer and image processor written the way the real checkpoints ship them (ChineseCLIP: a BERT
vocab.txt; SigLIP: a sentencepiece spiece.model), so nothing comes from a hub. Random weights mean
nothing semantically, so the search assertions are ones any weights satisfy: the very text a
product was embedded by, or its very image, finds that product first.
"""

import io
import json

import numpy as np
import pytest

from embedder import ModelSpecError, ModelUnavailableError, load_embedder
from prism_cli import run_prism
from sample_catalog import draw_product_image

# Chinese titles and descriptions, one product in English: every text the catalog embeds.
PRODUCTS = [
    ("CN1", "红色跑步鞋", "轻便透气的运动鞋"),
    ("CN2", "蓝色皮革手提包", "真皮手提包，适合通勤"),
    ("CN3", "绿色棒球帽", None),
    ("CN4", "白色纯棉衬衫", "百分之百纯棉"),
    ("CN5", "黑色不锈钢手表", "防水五十米"),
    ("EN6", "yellow rain jacket", "light and waterproof"),
]
TEXT_LENGTH = 24  # tokens per text; every text above fits


def _product_text(title: str, description: str | None) -> str:
    # What Prism embeds for a product (indexer.product_text): title, then description.
    return f"{title}. {description}" if description else title


def _catalog(root):
    """The products as UTF-8 JSONL (Chinese written as it is, not as \\u escapes), one image each."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (pid, title, description) in enumerate(PRODUCTS):
        draw_product_image(100 + i, 64).save(root / "images" / f"{pid}.png")
        row = {"product_id": pid, "title": title, "category": "服装", "image": f"images/{pid}.png"}
        if description:
            row["description"] = description
        lines.append(json.dumps(row, ensure_ascii=False))
    path = root / "catalog.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _texts() -> list[str]:
    return [_product_text(t, d) for _, t, d in PRODUCTS]


def _tower(**overrides) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **overrides)


def tiny_chinese_clip(path, *, model_max_length: int = TEXT_LENGTH, dtype=None):
    """A ChineseCLIPModel laid out as OFA-Sys/chinese-clip-* is: weights, config, a BERT
    vocab.txt with one token per Chinese character, tokenizer and preprocessor configs."""
    import torch
    from transformers import ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel

    chars = sorted({c for text in _texts() for c in text.lower() if not c.isspace()})
    words = sorted({w for text in _texts() for w in text.lower().replace(".", " ").split() if w.isascii()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *words]
    config = ChineseCLIPConfig(
        # At BERT's initializer_range of 0.02 a random one-layer tower's [CLS] output hardly depends
        # on the other tokens: every text would land within 1e-5 of cosine 1 of every other.
        text_config=_tower(vocab_size=len(vocab), max_position_embeddings=64, initializer_range=0.5),
        vision_config=_tower(image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = ChineseCLIPModel(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
         "model_max_length": model_max_length}
    ))
    ChineseCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def tiny_siglip(path):
    """A SiglipModel laid out as google/siglip-* is: a sentencepiece spiece.model (trained here on
    the catalog's texts) read by SiglipTokenizer, texts padded to the tower's full length."""
    import sentencepiece as spm
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    path.mkdir(parents=True, exist_ok=True)
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts() * 4), model_writer=model_file, vocab_size=120, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    (path / "spiece.model").write_bytes(model_file.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(path / "spiece.model"), model_max_length=TEXT_LENGTH)
    tokenizer.save_pretrained(path)
    config = SiglipConfig(
        text_config=_tower(vocab_size=len(tokenizer), max_position_embeddings=TEXT_LENGTH,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=None),
        vision_config=_tower(image_size=32, patch_size=8),
    )
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


BUILDERS = {"chinese_clip": tiny_chinese_clip, "siglip": tiny_siglip}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-models")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _reference(path, texts, images, *, text_kwargs):
    """transformers' own forward of the saved model (text_embeds, image_embeds), L2-normalised."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path).float().eval()
    tokens = AutoTokenizer.from_pretrained(path)(texts, return_tensors="pt", truncation=True, **text_kwargs)
    pixels = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
    inputs = {"input_ids": tokens["input_ids"], "pixel_values": pixels}
    if text_kwargs.get("padding") == "longest":
        inputs["attention_mask"] = tokens["attention_mask"]
    with torch.inference_mode():
        out = model(**inputs)
    norm = torch.nn.functional.normalize
    return norm(out.text_embeds, dim=-1).numpy(), norm(out.image_embeds, dim=-1).numpy()


@pytest.mark.no_database
def test_chinese_clip_embeds_chinese_text_one_token_per_character(models):
    emb = load_embedder(f"hf:{models['chinese_clip']}", device="cpu")
    assert emb.dim == 16 and emb.name.startswith("hf-chinese_clip-")
    assert emb.tokenizer.tokenize("红色跑步鞋") == list("红色跑步鞋")  # no [UNK]: every character is a token
    texts = _texts()
    images = [draw_product_image(100 + i, 64) for i in range(len(texts))]
    want_text, want_image = _reference(models["chinese_clip"], texts, images,
                                       text_kwargs={"padding": "longest", "max_length": TEXT_LENGTH})
    got = emb.encode_texts(texts)
    assert np.abs(got - want_text).max() < 1e-5
    # Padding is masked: a text embedded in a batch of longer ones equals it embedded alone.
    alone = np.concatenate([emb.encode_texts([t]) for t in texts])
    assert np.abs(got - alone).max() < 1e-5
    assert np.abs(emb.encode_images(images) - want_image).max() < 1e-5
    # Distinct Chinese titles get distinct vectors (no two collapsed onto the same tokens).
    assert _most_similar_pair(got) < 0.95


@pytest.mark.no_database
def test_siglip_pads_to_full_length_without_a_mask(models):
    emb = load_embedder(f"hf:{models['siglip']}", device="cpu")
    assert emb.dim == 32  # no projection_dim in a SigLIP config: the width comes from a forward pass
    assert emb._padding == "max_length" and emb._max_length == TEXT_LENGTH
    texts = _texts()
    images = [draw_product_image(100 + i, 64) for i in range(len(texts))]
    # SigLIP was trained on max-length padded text with no attention mask: so is the reference.
    want_text, want_image = _reference(models["siglip"], texts, images,
                                       text_kwargs={"padding": "max_length", "max_length": TEXT_LENGTH})
    got = emb.encode_texts(texts)
    assert np.abs(got - want_text).max() < 1e-5
    alone = np.concatenate([emb.encode_texts([t]) for t in texts])
    assert np.abs(got - alone).max() < 1e-5
    assert np.abs(emb.encode_images(images) - want_image).max() < 1e-5
    assert _most_similar_pair(got) < 0.999


def _most_similar_pair(vectors: np.ndarray) -> float:
    sims = vectors @ vectors.T
    return float(sims[~np.eye(len(vectors), dtype=bool)].max())


@pytest.mark.no_database
def test_tokenizer_limit_below_the_position_table_truncates(tmp_path, models):
    """A tokenizer that declares fewer tokens than the tower has positions is obeyed: the text
    tower sees the first 8 tokens ([CLS], six characters, [SEP]) of a longer text."""
    short = load_embedder(f"hf:{tiny_chinese_clip(tmp_path / 'short', model_max_length=8)}", device="cpu")
    full = load_embedder(f"hf:{models['chinese_clip']}", device="cpu")  # the same weights, 24 tokens
    long_text = "蓝色皮革手提包真皮适合通勤"
    assert np.abs(short.encode_texts([long_text]) - full.encode_texts([long_text[:6]])).max() < 1e-6
    assert np.abs(full.encode_texts([long_text]) - full.encode_texts([long_text[:6]])).max() > 1e-3


@pytest.mark.no_database
def test_half_precision_checkpoint_runs_in_float32(tmp_path, models):
    import torch

    half = load_embedder(f"hf:{tiny_chinese_clip(tmp_path / 'half', dtype=torch.float16)}", device="cpu")
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    full = load_embedder(f"hf:{models['chinese_clip']}", device="cpu")
    texts = _texts()
    # The same weights rounded to float16: the same vectors, to float16's precision.
    assert np.abs(half.encode_texts(texts) - full.encode_texts(texts)).max() < 1e-2


@pytest.mark.no_database
def test_unloadable_hf_directories_fail_with_a_message(tmp_path, models):
    import shutil

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ModelUnavailableError, match="transformers cannot load"):
        load_embedder(f"hf:{unknown}", device="cpu")

    # SigLIP 2's NaFlex images carry a patch mask and shapes: refused at load, not mid-index.
    from transformers import Siglip2ImageProcessor

    naflex = tmp_path / "naflex"
    shutil.copytree(models["siglip"], naflex)
    Siglip2ImageProcessor().save_pretrained(naflex)
    with pytest.raises(ModelSpecError, match="spatial_shapes"):
        load_embedder(f"hf:{naflex}", device="cpu")


def _search(env, *args) -> list[str]:
    res = run_prism(["search", *args, "-k", "3", "--json"], env, timeout=300)
    return [hit["product_id"] for hit in json.loads(res.stdout)["results"]]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prism_index_and_search_with_a_multilingual_tower(name, models, tmp_path, databases):
    """`prism index --model hf:DIR` on a Chinese catalog, then search by Chinese text, by text
    across to images, and by image: once through `prism search`, then through the engine behind
    it (and behind HTTP), since each CLI run costs seconds of imports."""
    from search import SearchEngine
    from store import Store

    catalog = _catalog(tmp_path / "catalog")
    home = tmp_path / "home"
    env = databases.env(home, PRISM_THREADS="2")
    out = run_prism(["index", str(catalog), "--model", f"hf:{models[name]}", "--json"], env, timeout=300)
    summary = json.loads(out.stdout)
    assert summary["products_indexed"] == len(PRODUCTS) and summary["texts_embedded"] == len(PRODUCTS)
    assert summary["model_version"].startswith(f"hf-{name}-")
    if name == "chinese_clip":  # a Chinese query through the CLI (its parsing and JSON output); once is enough
        assert _search(env, _product_text(*PRODUCTS[0][1:]), "--target", "text")[0] == PRODUCTS[0][0]

    store = Store.open(databases.url(home))
    try:
        engine = SearchEngine(store, indexes_dir=home / "indexes", models_dir=home / "models", device="cpu")
        for pid, title, description in PRODUCTS:
            hits = engine.search(text=_product_text(title, description), target="text", k=3).hits
            assert hits[0].product.product_id == pid and hits[0].score == pytest.approx(1.0, abs=1e-4)
        across = engine.search(text="红色跑步鞋", target="image", k=3).hits  # text tower -> image tower
        assert len({h.product.product_id for h in across}) == 3
        for pid, _, _ in PRODUCTS:
            hits = engine.search(image=str(tmp_path / "catalog" / "images" / f"{pid}.png"), target="image", k=3).hits
            assert hits[0].product.product_id == pid and hits[0].score == pytest.approx(1.0, abs=1e-4)
    finally:
        store.close()


OPEN_CLIP_ARCH, OPEN_CLIP_TAG = "ViT-B-32", "laion2b_s34b_b79k"


def _write_hub_cache(hub, repo_id: str, filename: str, source) -> None:
    """One file (moved from `source`) in the Hugging Face hub cache layout, as a download leaves
    it: the bytes in blobs/<sha256>, snapshots/<commit>/<filename> a relative link to them,
    refs/main the commit."""
    import hashlib
    import os

    from embedder.images import file_sha256

    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    blob = repo / "blobs" / file_sha256(source)
    blob.parent.mkdir(parents=True)
    os.replace(source, blob)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / filename)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_default_model_loads_from_the_local_hub_cache(tmp_path, databases):
    """An empty home indexes with ViT-B-32:laion2b_s34b_b79k; with its weights in the local hub
    cache (random here, under the names open_clip looks up) `prism index` loads them offline."""
    import open_clip
    import torch
    from open_clip.pretrained import get_pretrained_cfg

    from embedder import VectorCache
    from embedder.images import content_hash
    from indexer.pipeline import DEFAULT_MODEL_SPEC

    assert DEFAULT_MODEL_SPEC == f"{OPEN_CLIP_ARCH}:{OPEN_CLIP_TAG}"
    # open_clip's own record of where the tag's weights live: "org/name/" (default file name) or "org/name/file".
    repo_id, filename = get_pretrained_cfg(OPEN_CLIP_ARCH, OPEN_CLIP_TAG)["hf_hub"].rstrip("/"), None
    if repo_id.count("/") > 1:
        repo_id, filename = repo_id.rsplit("/", 1)
    filename = filename or open_clip.constants.HF_WEIGHTS_NAME  # open_clip_pytorch_model.bin

    torch.manual_seed(7)
    model = open_clip.create_model(OPEN_CLIP_ARCH, pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "weights")  # ~600 MB: straight to disk, never a copy in memory
    _write_hub_cache(tmp_path / "hf" / "hub", repo_id, filename, tmp_path / "weights")

    catalog = _catalog(tmp_path / "catalog")
    home = tmp_path / "home"
    env = databases.env(home, HF_HOME=str(tmp_path / "hf"), PRISM_THREADS="2")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    # A fresh process: huggingface_hub reads HF_HOME when it is imported.
    out = run_prism(["index", str(catalog), "--json"], env, timeout=400, fresh_process=True)  # no --model: the default
    summary = json.loads(out.stdout)
    assert summary["products_indexed"] == len(PRODUCTS)
    assert summary["model_version"] == f"{OPEN_CLIP_ARCH}-{OPEN_CLIP_TAG}"

    # The vectors are the cache's weights, not some other ViT-B-32's.
    text = _product_text(*PRODUCTS[1][1:])
    tokens = open_clip.get_tokenizer(OPEN_CLIP_ARCH)([text])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()[0]
    stored = VectorCache(home / "embeddings" / summary["model_version"], expected.shape[0]).get(
        f"text:{content_hash(text)}"
    )
    assert stored is not None and np.abs(stored - expected).max() < 1e-4
