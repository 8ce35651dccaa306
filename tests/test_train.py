"""Prism's contrastive trainer, the demo model's pieces, model versions and retrieval metrics.

Tiny configurations and a few steps: these check behaviour (loss falls, training helps, resume is
exact, locks hold), not the quality targets, which `prism eval` measures on the real demo model.
"""

import dataclasses

import numpy as np
import pytest
import torch

from embedder import create_base_model, load_embedder, prism_config_path, wrap_open_clip
from feedback import (
    DEMO_ARCH,
    ModelVersionExistsError,
    TrainConfig,
    evaluate,
    rank_metrics,
    train_contrastive,
    write_model_version,
)
from feedback.demo import eval_set, pair_data
from feedback.train import (
    TextFeatures,
    apply_locks,
    cached_image_features,
    cpu_bfloat16,
    decode_images,
    image_normalisation,
    model_image_size,
    trainable_names,
)
from indexer import build_demo_catalog

TINY_TRAIN = TrainConfig(epochs=10, batch_size=32, lr=3e-3, warmup_steps=5, lock_text=True, seed=0)


@pytest.fixture(scope="module")
def demo_catalog(tmp_path_factory):
    return build_demo_catalog(tmp_path_factory.mktemp("demo") / "demo", limit=200)


@pytest.fixture(scope="module")
def train_items(demo_catalog):
    return demo_catalog.split("train")[:128]


def _fresh_model():
    return create_base_model(DEMO_ARCH, seed=0)


def test_training_lowers_the_loss_and_beats_the_random_start(tmp_path, demo_catalog, train_items):
    model, preprocess, tokenizer = _fresh_model()
    data = eval_set(train_items, demo_catalog.root, "train-sample")
    before = evaluate(wrap_open_clip(model, preprocess, tokenizer, name="start"), data)
    result = train_contrastive(model, tokenizer, pair_data(train_items, demo_catalog.root), TINY_TRAIN,
                               workdir=tmp_path / "work")
    after = evaluate(wrap_open_clip(model, preprocess, tokenizer, name="trained"), data)
    assert result.steps == 40 and result.epochs_done == 10
    assert result.stats["text_features_cached"]  # the locked MiniLM ran once per distinct text
    assert not result.stats["image_features_cached"]  # the image tower trains: it runs every step
    assert result.epoch_losses[-1] < 0.6 * result.epoch_losses[0]
    assert after.title_to_image.at(1) > before.title_to_image.at(1) + 0.2
    assert after.image_to_text.at(5) > before.image_to_text.at(5) + 0.2
    assert after.text_to_image.mrr > 2 * before.text_to_image.mrr


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, demo_catalog, train_items):
    config = dataclasses.replace(TINY_TRAIN, epochs=3)
    data = pair_data(train_items, demo_catalog.root)
    straight, _, tokenizer = _fresh_model()
    train_contrastive(straight, tokenizer, data, config, workdir=tmp_path / "a")

    paused, _, tokenizer = _fresh_model()
    first = train_contrastive(paused, tokenizer, data, dataclasses.replace(config, max_steps=5), workdir=tmp_path / "b")
    assert first.steps == 5
    resumed, _, tokenizer = _fresh_model()  # a new process would start from the base model again
    second = train_contrastive(resumed, tokenizer, data, config, workdir=tmp_path / "b")
    assert first.epochs_done == 1  # the paused second epoch is not counted yet
    assert second.resumed_from_step == 5 and second.steps == 12 and second.epochs_done == 3
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "resumed weights differ from an uninterrupted run"

    other = train_contrastive(_fresh_model()[0], tokenizer, data, dataclasses.replace(config, lr=1e-3),
                              workdir=tmp_path / "b")
    assert other.resumed_from_step == 0  # a checkpoint from another configuration is not resumed


def test_mixed_precision_trains_in_bfloat16_where_the_cpu_has_it(tmp_path, demo_catalog, train_items):
    config = dataclasses.replace(TINY_TRAIN, epochs=2)
    data = pair_data(train_items, demo_catalog.root)
    exact, _, tokenizer = _fresh_model()
    fp32 = train_contrastive(exact, tokenizer, data, dataclasses.replace(config, mixed_precision=False),
                             workdir=tmp_path / "fp32")
    mixed_model, _, tokenizer = _fresh_model()
    mixed = train_contrastive(mixed_model, tokenizer, data, config, workdir=tmp_path / "mixed")
    assert fp32.stats["precision"] == "float32"
    assert mixed.stats["precision"] == ("bfloat16" if cpu_bfloat16() else "float32")
    # the same steps on the same batches: the losses agree to bfloat16's precision
    assert mixed.epoch_losses == pytest.approx(fp32.epoch_losses, rel=0.05)
    a, b = exact.state_dict(), mixed_model.state_dict()
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == (mixed.stats["precision"] == "float32"), "autocast did not change the arithmetic"
    assert mixed_model.visual.conv1.weight.is_contiguous()  # the trained model leaves NHWC behind


def test_locks_freeze_what_they_name(tmp_path, demo_catalog, train_items):
    data = pair_data(train_items[:64], demo_catalog.root)
    model, _, tokenizer = _fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = dataclasses.replace(TINY_TRAIN, epochs=1, lock_text=True, text_unlocked_layers=1, lock_image=True)
    result = train_contrastive(model, tokenizer, data, config, workdir=tmp_path / "w")
    # the frozen image tower ran once per image, not every step; the unlocked text layer every step
    assert result.stats["image_features_cached"] and not result.stats["text_features_cached"]
    assert result.stats["image_store_size"] == model_image_size(model)  # no augmentation margin decoded
    names = trainable_names(model)
    assert any(".layer.5." in n for n in names) and not any(".layer.4." in n for n in names)
    assert not any(n.startswith("visual.") for n in names)
    after = model.state_dict()
    # (locked BatchNorms become FrozenBatchNorm2d, which drops num_batches_tracked)
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("visual."))
    assert not torch.equal(before["text.transformer.encoder.layer.5.attention.self.query.weight"],
                           after["text.transformer.encoder.layer.5.attention.self.query.weight"])
    assert torch.equal(before["text.transformer.encoder.layer.0.attention.self.query.weight"],
                       after["text.transformer.encoder.layer.0.attention.self.query.weight"])


def test_a_frozen_image_tower_is_embedded_once_as_it_serves(demo_catalog, train_items):
    model, preprocess, tokenizer = _fresh_model()
    images = [str(demo_catalog.root / p.image) for p in train_items[:6]]
    size = model_image_size(model)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in image_normalisation(model))
    model.train()
    cached = cached_image_features(model, decode_images(images, size), mean, std, "cpu",
                                   torch.autocast("cpu", enabled=False), batch_size=4)
    assert model.visual.training  # the tower is put back in the mode it was in
    served = wrap_open_clip(model, preprocess, tokenizer, name="served").encode_images(images)
    cosine = (torch.nn.functional.normalize(cached, dim=-1).numpy() * served).sum(1)
    assert cached.shape == (6, served.shape[1]) and cosine.min() > 0.999, cosine


def test_a_text_drawn_twice_in_a_batch_runs_once_with_the_same_features(train_items):
    model, _, tokenizer = _fresh_model()
    apply_locks(model, dataclasses.replace(TINY_TRAIN, text_unlocked_layers=1))  # the trunk trains: no cache
    model.eval()
    texts = [p.title for p in train_items[:5]]
    side = TextFeatures(model, tokenizer, texts, "cpu")
    assert side.cached is None
    picks = torch.tensor([3, 0, 3, 1, 0, 4])
    together = side(picks)
    one_by_one = torch.cat([side(torch.tensor([i])) for i in picks.tolist()])
    assert together.shape == (6, one_by_one.shape[1])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    together.sum().backward()  # the shared rows still carry gradients to the trunk
    assert model.text.transformer.encoder.layer[5].output.dense.weight.grad is not None


def test_a_written_model_version_loads_back_through_the_factory(tmp_path, store, demo_catalog, train_items):
    model, preprocess, tokenizer = _fresh_model()
    train_contrastive(model, tokenizer, pair_data(train_items[:64], demo_catalog.root),
                      dataclasses.replace(TINY_TRAIN, epochs=1), workdir=tmp_path / "w")
    models = tmp_path / "models"
    path = write_model_version(models, "ft-1", model, arch=DEMO_ARCH, config_file=prism_config_path(DEMO_ARCH),
                               info={"note": "test"}, store=store)
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.pt", "model.json", f"{DEMO_ARCH}.json"]
    assert store.get_model_version("ft-1").dim == 256
    loaded = load_embedder("ft-1", models_dir=models, device="cpu")
    memory = wrap_open_clip(model, preprocess, tokenizer, name="ft-1")
    texts = ["red apple", "a dog face"]
    np.testing.assert_allclose(loaded.encode_texts(texts), memory.encode_texts(texts), atol=1e-5)
    image = str(demo_catalog.root / train_items[0].image)
    np.testing.assert_allclose(loaded.encode_images([image]), memory.encode_images([image]), atol=1e-5)
    with pytest.raises(ModelVersionExistsError):
        write_model_version(models, "ft-1", model, arch=DEMO_ARCH, config_file=prism_config_path(DEMO_ARCH), info={})


def test_rank_metrics_count_the_first_relevant_item():
    sim = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.9], [0.5, 0.6, 0.7]])
    relevant = np.array([[True, False, False], [True, False, False], [False, True, True]])
    scores = rank_metrics(sim, relevant, ks=(1, 2))
    # ranks: 1, 3, 1 (either relevant item counts)
    assert scores.recall == {"@1": round(2 / 3, 4), "@2": round(2 / 3, 4)}
    assert scores.mrr == round((1 + 1 / 3 + 1) / 3, 4)
    with pytest.raises(ValueError):
        rank_metrics(sim, np.zeros_like(relevant))
