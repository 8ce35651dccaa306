"""LoRA adapters on the towers and adapter model versions: an open_clip text transformer
(prism-tiny-vit) and a Hugging Face text tower (the demo's MiniLM), trained for a few steps."""

import dataclasses
import os
import json

import numpy as np
import pytest
import torch

from embedder import (
    AdapterError,
    AdapterSettings,
    ModelIntegrityError,
    add_adapters,
    create_base_model,
    load_embedder,
    load_trainable,
    prism_config_path,
    wrap_open_clip,
)
from embedder.adapters import adapter_targets
from feedback import TrainConfig, train_contrastive, write_model_version
from feedback.train import PairData, trainable_names
from feedback.versions import version_size, write_adapter_version
from indexer import apply_retention

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

ARCHS = ("prism-tiny-vit", "prism-demo-minilm")
STEPS = TrainConfig(epochs=3, batch_size=16, lr=1e-3, adapter_lr=5e-3, warmup_steps=1, lock_text=True,
                    texts_per_image=1, augment=False, mixed_precision=False, seed=0)
TEXTS = ["red apple", "a dog face", "blue car with stripes", "花"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from sample_catalog import draw_product_image

    root = tmp_path_factory.mktemp("adapter-images")
    paths = []
    for i in range(32):
        path = root / f"{i}.png"
        draw_product_image(i).save(path)
        paths.append(str(path))
    # words no catalog text of the base has seen: only a trainable text trunk can place them
    words = ["zorbleflip", "quandrix", "mivvel", "sprockadee"]
    return PairData(item_ids=[str(i) for i in range(32)], images=paths,
                    texts=[[f"{words[i % 4]} number {i}"] for i in range(32)])


def _base_version(models, arch, store):
    model, preprocess, tokenizer = create_base_model(arch, seed=0)
    write_model_version(models, "base", model, arch=arch, config_file=prism_config_path(arch), info={}, store=store)
    return model, preprocess, tokenizer


def _train_adapter_version(tmp_path, store, arch, pairs, settings=AdapterSettings()):
    models = tmp_path / "models"
    _base_version(models, arch, store)
    trainable = load_trainable("base", models_dir=models)
    frozen = {k: v.clone() for k, v in trainable.model.state_dict().items()}
    modules = add_adapters(trainable.model, settings)
    train_contrastive(trainable.model, trainable.tokenizer, pairs, STEPS, workdir=tmp_path / "work")
    path = write_adapter_version(
        models, "ft-lora", trainable.model, arch=arch, config=trainable.config,
        adapters={**settings.to_dict(), "modules": modules}, base_version="base",
        trained=trainable_names(trainable.model), info={}, store=store, parent="base")
    return models, trainable, frozen, modules, path


@pytest.mark.parametrize("arch", ARCHS)
def test_an_adapter_version_is_small_loads_on_its_base_and_embeds_as_trained(tmp_path, store, pairs, arch):
    models, trainable, frozen, modules, path = _train_adapter_version(tmp_path, store, arch, pairs)
    model = trainable.model
    # the adapters sit in the text trunk only, on the modules the defaults name
    expected = ("transformer.resblocks.0.mlp.c_fc" if arch == "prism-tiny-vit"
                else "text.transformer.encoder.layer.0.attention.self.query")
    assert expected in modules and not any(m.startswith("visual.") for m in modules)
    # the base weights of the trunk did not move; the adapters did
    after = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    trunk = [k for k in frozen if k.startswith(("transformer.", "text.transformer.")) and frozen[k].is_floating_point()]
    changed = {k: float((frozen[k] - after[k]).abs().max()) for k in trunk if not torch.equal(frozen[k], after[k])}
    assert trunk and not changed, changed
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)

    full = version_size(models, "base")
    small = version_size(models, "ft-lora")
    assert small < 0.35 * full, (small, full)
    meta = json.loads((path / "model.json").read_text())
    assert meta["base_model"]["version"] == "base" and len(meta["base_model"]["sha256"]) == 64
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["adapter_model.safetensors", "trained.safetensors", "model.json", f"{arch}.json"])
    assert store.get_model_version("ft-lora").parent == "base"

    loaded = load_embedder("ft-lora", models_dir=models, device="cpu")
    memory = wrap_open_clip(model, trainable.preprocess, trainable.tokenizer, name="in-memory")
    a, b = loaded.encode_texts(TEXTS), memory.encode_texts(TEXTS)
    assert (a * b).sum(1).min() >= 0.9999
    image = pairs.images[3]
    assert float(loaded.encode_images([image])[0] @ memory.encode_images([image])[0]) >= 0.9999
    # merged at load: the served model is the base architecture, no peft module left
    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())
    # and the adapters changed what the text tower says
    base = load_embedder("base", models_dir=models, device="cpu")
    assert (base.encode_texts(TEXTS) * a).sum(1).min() < 0.9999


def test_a_missing_or_changed_base_is_an_error_that_names_it(tmp_path, store, pairs):
    models, *_ = _train_adapter_version(tmp_path, store, "prism-tiny-vit", pairs)
    checkpoint = models / "base" / "checkpoint.pt"
    original = checkpoint.read_bytes()
    # the base replaced by other weights, with a model.json that is consistent with them
    other, _, _ = create_base_model("prism-tiny-vit", seed=5)
    torch.save(other.state_dict(), checkpoint)
    meta = json.loads((models / "base" / "model.json").read_text())
    from embedder import file_sha256

    meta["files"]["checkpoint.pt"] = file_sha256(checkpoint)
    (models / "base" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelIntegrityError, match=r"'ft-lora' was trained on model version 'base'.*not those weights"):
        load_embedder("ft-lora", models_dir=models, device="cpu")
    checkpoint.write_bytes(original)
    meta["files"]["checkpoint.pt"] = file_sha256(checkpoint)
    (models / "base" / "model.json").write_text(json.dumps(meta))
    assert load_embedder("ft-lora", models_dir=models, device="cpu").name == "ft-lora"

    (models / "base").rename(models / "elsewhere")
    with pytest.raises(ModelIntegrityError, match=r"trained on model version 'base', which is missing"):
        load_embedder("ft-lora", models_dir=models, device="cpu")
    with pytest.raises(ModelIntegrityError, match="missing"):
        load_trainable("ft-lora", models_dir=models)


def test_retention_keeps_a_base_an_adapter_version_still_needs(tmp_path, store, pairs):
    models, *_ = _train_adapter_version(tmp_path, store, "prism-tiny-vit", pairs)
    home = tmp_path
    model, _, _ = create_base_model("prism-tiny-vit", seed=1)

    def newer(name):
        write_model_version(models, name, model, arch="prism-tiny-vit",
                            config_file=prism_config_path("prism-tiny-vit"), info={}, store=store)

    # the base is old enough to go, and no index version uses it, but ft-lora loads on top of it
    newer("newer-1")
    assert store.model_retention_candidates(2) == []
    assert store.prune_model_versions(["base"]) == []
    assert apply_retention(store, home, keep_versions=2).model_versions_dropped == []
    assert (models / "base" / "checkpoint.pt").is_file()
    assert load_embedder("ft-lora", models_dir=models, device="cpu").name == "ft-lora"
    # once the adapter version itself is old enough to go, both go
    newer("newer-2")
    assert store.model_retention_candidates(2) == ["ft-lora", "base"]
    outcome = apply_retention(store, home, keep_versions=2)
    # the adapter version goes first; its base, needed by nothing any more, goes in the same pass
    assert sorted(outcome.model_versions_dropped) == ["base", "ft-lora"]
    assert not (models / "base").exists() and not (models / "ft-lora").exists()


def test_a_run_continues_the_serving_adapters_over_the_same_base(tmp_path, store, pairs):
    models, *_ = _train_adapter_version(tmp_path, store, "prism-demo-minilm", pairs)
    again = load_trainable("ft-lora", models_dir=models)
    assert again.adapters["base_model"]["version"] == "base"
    assert any("lora_" in n for n, _ in again.model.named_parameters())  # unmerged, to train on
    served = load_embedder("ft-lora", models_dir=models, device="cpu")
    memory = wrap_open_clip(again.model, again.preprocess, again.tokenizer, name="again")
    assert (served.encode_texts(TEXTS) * memory.encode_texts(TEXTS)).sum(1).min() >= 0.9999


def test_attention_adapters_on_open_clip_merge_to_what_trained(tmp_path, store, pairs):
    settings = AdapterSettings(targets=("attn", "c_fc"))
    models, trainable, frozen, modules, _ = _train_adapter_version(tmp_path, store, "prism-tiny-vit", pairs, settings)
    assert "transformer.resblocks.1.attn" in modules
    attn_b = [p for n, p in trainable.model.named_parameters() if ".attn.lora_B" in n]
    assert attn_b and all(p.abs().sum() > 0 for p in attn_b)  # the attention adapters learned
    loaded = load_embedder("ft-lora", models_dir=models, device="cpu")
    memory = wrap_open_clip(trainable.model, trainable.preprocess, trainable.tokenizer, name="in-memory")
    assert (loaded.encode_texts(TEXTS) * memory.encode_texts(TEXTS)).sum(1).min() >= 0.9999


def test_adapter_settings_are_checked_and_targets_found_by_name():
    model, _, _ = create_base_model("prism-tiny-vit", seed=0)
    both = adapter_targets(model, AdapterSettings(towers=("text", "image"), targets=("c_fc",)))
    assert both == ["visual.transformer.resblocks.0.mlp.c_fc", "visual.transformer.resblocks.1.mlp.c_fc",
                    "transformer.resblocks.0.mlp.c_fc", "transformer.resblocks.1.mlp.c_fc"]
    # a MultiheadAttention's out_proj is adapted through the attention module, never alone
    with pytest.raises(AdapterError, match="no module"):
        adapter_targets(model, AdapterSettings(targets=("out_proj",)))
    with pytest.raises(AdapterError, match="no module"):
        adapter_targets(model, AdapterSettings(targets=("no_such_layer",)))
    with pytest.raises(AdapterError, match="towers"):
        AdapterSettings(towers=("audio",))
    with pytest.raises(AdapterError, match="rank"):
        AdapterSettings(rank=0)
    assert dataclasses.asdict(AdapterSettings()) == AdapterSettings.from_dict(AdapterSettings().to_dict()).to_dict()


def test_adapter_settings_reach_the_retrain_config(monkeypatch):
    from pathlib import Path

    import pydantic

    from api.settings import PrismSettings

    for name in [n for n in os.environ if n.startswith("PRISM_RETRAIN_")]:
        monkeypatch.delenv(name)
    default = PrismSettings(home=Path("unused")).retrain_config()
    assert default.adapters == AdapterSettings() and default.train.adapter_lr == 1e-3
    monkeypatch.setenv("PRISM_RETRAIN_ADAPTER_RANK", "4")
    monkeypatch.setenv("PRISM_RETRAIN_ADAPTER_TOWERS", "text, image")
    monkeypatch.setenv("PRISM_RETRAIN_ADAPTER_TARGETS", "query,value")
    monkeypatch.setenv("PRISM_RETRAIN_ADAPTER_LR", "0.0005")
    tuned = PrismSettings(home=Path("unused")).retrain_config()
    assert tuned.adapters == AdapterSettings(rank=4, alpha=16.0, towers=("text", "image"), targets=("query", "value"))
    assert tuned.train.adapter_lr == 5e-4
    assert default.freeze_unadapted and tuned.freeze_unadapted
    monkeypatch.setenv("PRISM_RETRAIN_ADAPTER_FREEZE_UNADAPTED", "false")
    assert not PrismSettings(home=Path("unused")).retrain_config().freeze_unadapted
    monkeypatch.setenv("PRISM_RETRAIN_ADAPTERS", "false")
    assert PrismSettings(home=Path("unused")).retrain_config().adapters is None
    monkeypatch.setenv("PRISM_RETRAIN_ADAPTER_TOWERS", "audio")
    with pytest.raises(pydantic.ValidationError, match="text and/or image"):
        PrismSettings(home=Path("unused"))
