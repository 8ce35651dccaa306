"""Prism's contrastive trainer: symmetric InfoNCE over (image, text) pairs.

One trainer serves the demo model (image tower fitted against a locked text tower, LiT-style) and
the nightly fine-tune on click pairs. What it does:

- symmetric InfoNCE with a learnable temperature; texts that repeat inside a batch are
  treated as positives of each other, not as negatives;
- lock either tower, or unlock only its last N layers (open_clip's lock methods);
- AdamW (no decay on norms, biases and the temperature), linear warm-up then cosine decay,
  gradient clipping, fp16 autocast on GPU (bfloat16 on CPUs that have it), seeded sampling and augmentation;
- a checkpoint after every epoch, atomically replaced; a run started again with the same
  configuration and data resumes from it.

Images are decoded once into a uint8 tensor a little larger than the model input. Each batch is
augmented on the fly with one affine warp (zoom in or out, shift, slight rotation) on the device.
Nothing shifts hue or flips: the colour and the direction of a product are part of what its text says.

A fully locked Hugging Face text tower is run once per distinct text, and its pooled features are
cached. Only the projection head trains on top of them, which is what makes a LiT-style fit fast on CPU.
Likewise a fully frozen image tower (a fine-tune with adapters on the text trunk only) is run once
per image, without augmentation: each step then costs only the trunk that trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embedder import ImageLimits, ImageSource, decode_image, pad_token_id, read_image_bytes, trim_padding

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad data, incompatible checkpoint)."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip_norm: float = 1.0
    init_temperature: float | None = 0.07  # None: keep the model's own (fine-tuning a trained model)
    learn_temperature: bool = True
    lock_image: bool = False
    image_unlocked_groups: int = 0
    lock_text: bool = False
    text_unlocked_layers: int = 0
    # texts drawn per image per step (with replacement): more signal per image forward, nearly free
    # when the text trunk is locked and cached
    texts_per_image: int = 2
    # Lay items of one PairData group out in the same batch (hard negatives: look-alike products,
    # the results a shopper skipped); False draws batches uniformly at random.
    group_batches: bool = False
    # Keep BatchNorm running statistics as they are (fine-tuning a trained model on a small,
    # skewed sample would otherwise shift them for every image it later embeds).
    freeze_batchnorm: bool = False
    augment: bool = True
    zoom: tuple[float, float] = (0.8, 1.15)  # >1 zooms out (the border colour fills in)
    max_shift: float = 0.08  # of the image side
    max_rotation_deg: float = 8.0
    # fp16 autocast on CUDA; bfloat16 on CPUs with oneDNN bfloat16 kernels (AVX-512, AMX), where
    # it makes a small CNN train 1.5-2x faster; fp32 elsewhere and when False.
    mixed_precision: bool = True
    seed: int = 0
    # LoRA adapters' learning rate (embedder.add_adapters); None: `lr`. Adapters start at zero and
    # are few: they want a larger step than the whole weights around them.
    adapter_lr: float | None = None
    max_steps: int | None = None  # stop early (tests, smoke runs); the schedule still spans all epochs

    def fingerprint(self) -> str:
        """Identifies the run a checkpoint belongs to; max_steps only says where to pause it."""
        fields = {k: v for k, v in asdict(self).items() if k != "max_steps"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PairData:
    """Training items: one image each, with the texts that describe it (any one is a positive).

    `groups` (optional, one label per item): items that are hard to tell apart; with
    `TrainConfig.group_batches` they meet in one batch, so each is the others' negative.
    `weights` (optional, one per item, > 0): how much each item's loss terms count, e.g. the
    inverse-propensity weight of a click; the loss is the weighted mean over the batch.
    """

    item_ids: list[str]
    images: list[ImageSource]
    texts: list[list[str]]
    groups: list[str] | None = None
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        if not (len(self.item_ids) == len(self.images) == len(self.texts)):
            raise TrainingError("item_ids, images and texts must have the same length")
        if self.groups is not None and len(self.groups) != len(self.item_ids):
            raise TrainingError("groups must have one label per item")
        if self.weights is not None and (
            len(self.weights) != len(self.item_ids) or not all(math.isfinite(w) and w > 0 for w in self.weights)
        ):
            raise TrainingError("weights must be one finite positive number per item")
        if len(self.item_ids) < 2:
            raise TrainingError(f"contrastive training needs at least 2 items, got {len(self.item_ids)}")
        empty = [i for i, t in zip(self.item_ids, self.texts) if not t]
        if empty:
            raise TrainingError(f"{len(empty)} items have no text, e.g. {empty[0]!r}")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for item_id, image, texts in zip(self.item_ids, self.images, self.texts):
            ref = image if isinstance(image, (str, Path)) else hashlib.sha256(
                image if isinstance(image, bytes) else image.tobytes()
            ).hexdigest()
            h.update(json.dumps([item_id, str(ref), texts]).encode())
        for extra in (self.groups, self.weights):
            if extra is not None:
                h.update(json.dumps(extra).encode())
        return h.hexdigest()[:16]


class TrainProgress(Protocol):
    def start(self, total_steps: int, done_steps: int) -> None: ...

    def step(self, step: int, *, loss: float, images_per_s: float, temperature: float) -> None: ...

    def epoch(self, epoch: int, *, mean_loss: float) -> None: ...

    def finish(self) -> None: ...


class SilentProgress:
    def start(self, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, step: int, *, loss: float, images_per_s: float, temperature: float) -> None:
        pass

    def epoch(self, epoch: int, *, mean_loss: float) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class TrainResult:
    steps: int
    epochs_done: int
    epoch_losses: list[float]
    first_step_loss: float | None
    temperature: float
    seconds: float
    images_per_s: float
    resumed_from_step: int = 0
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- locking


def apply_locks(model, config: TrainConfig) -> None:
    """Freeze what the config locks, with open_clip's own lock methods; everything else trains."""
    for p in model.parameters():
        p.requires_grad = True
    if config.lock_image:
        model.lock_image_tower(unlocked_groups=config.image_unlocked_groups, freeze_bn_stats=True)
    if config.lock_text:
        if not hasattr(model, "lock_text_tower"):
            raise TrainingError(f"{type(model).__name__} cannot lock its text tower")
        try:
            model.lock_text_tower(unlocked_layers=config.text_unlocked_layers, freeze_layer_norm=True)
        except KeyError:
            # open_clip's HF lock knows each architecture's layer attribute by name, and BERT's is
            # missing from its table (open_clip 3.3): unlock the last layers of the encoder ourselves.
            _unlock_last_hf_layers(model.text, config.text_unlocked_layers)
    if hasattr(model, "logit_scale"):
        model.logit_scale.requires_grad = config.learn_temperature
    # LoRA adapters (embedder.add_adapters) train inside a locked trunk: the lock freezes the base
    # weights around them, never the adapters themselves.
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad = True


def _unlock_last_hf_layers(text, unlocked_layers: int) -> None:
    import torch

    for p in text.transformer.parameters():
        p.requires_grad = False
    encoder = getattr(text.transformer, "encoder", text.transformer)
    layers = next((getattr(encoder, a) for a in ("layer", "layers", "block")
                   if isinstance(getattr(encoder, a, None), torch.nn.ModuleList)), None)
    if layers is None:
        raise TrainingError(f"cannot find the layers of {type(text.transformer).__name__} to unlock")
    for layer in list(layers)[len(layers) - unlocked_layers:] if unlocked_layers > 0 else []:
        for p in layer.parameters():
            p.requires_grad = True


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---- images


def image_normalisation(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))


def model_image_size(model) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def decode_images(images: Sequence[ImageSource], size: int, limits: ImageLimits | None = None, workers: int = 2):
    """Every image as a uint8 (N, 3, size, size) tensor: short side resized, centre crop, like inference."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from PIL import Image

    limits = limits or ImageLimits()

    def one(src: ImageSource) -> np.ndarray:
        img = decode_image(src if isinstance(src, Image.Image) else read_image_bytes(src, limits), limits)
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = list(pool.map(one, images))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def augment_batch(batch, out_size: int, config: TrainConfig, generator):
    """One random affine warp per image (zoom, shift, small rotation); float input in [0, 1]."""
    import torch
    import torch.nn.functional as F

    n = batch.shape[0]

    def uniform(lo: float, hi: float):
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    zoom = uniform(*config.zoom)
    angle = uniform(-config.max_rotation_deg, config.max_rotation_deg) * math.pi / 180
    tx, ty = uniform(-config.max_shift, config.max_shift) * 2, uniform(-config.max_shift, config.max_shift) * 2
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(batch)
    grid = F.affine_grid(theta, [n, batch.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---- texts


class TextFeatures:
    """Text side of a step: cached trunk features for a frozen HF tower, else the full forward."""

    def __init__(self, model, tokenizer, texts: list[str], device: str, batch_size: int = 256):
        from open_clip.hf_model import HFTextEncoder

        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.texts = texts
        self.cached = None
        text = getattr(model, "text", None)
        self._hf = isinstance(text, HFTextEncoder)
        if isinstance(text, HFTextEncoder) and not any(p.requires_grad for p in text.transformer.parameters()):
            self.cached = self._trunk_features(text, texts, batch_size)

    def _tokens(self, texts: Sequence[str]):
        return trim_padding(self.tokenizer(list(texts)), pad_token_id(self.tokenizer)).to(self.device)

    def _trunk_features(self, text, texts: list[str], batch_size: int):
        import torch

        # Batches of similar length waste little compute on padding; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        features = None
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                chunk = order[i : i + batch_size]
                tokens = self._tokens([texts[j] for j in chunk])
                mask = (tokens != text.config.pad_token_id).long()
                pooled = text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask).float()
                if features is None:
                    features = torch.empty(len(texts), pooled.shape[1])
                features[torch.tensor(chunk)] = pooled.cpu()
        return features.clone()

    def __call__(self, indices):
        import torch

        if self.cached is not None:
            return self.model.text.proj(self.cached[indices.to(self.cached.device)].to(self.device))
        # A trunk that trains (adapters, unlocked layers) runs every step: a text drawn twice in
        # one batch (a query with several clicked products, a title shared by variants) runs once.
        distinct, inverse = torch.unique(indices, return_inverse=True)
        if len(distinct) < len(indices):
            return self(distinct)[inverse.to(self.device)]
        texts = [self.texts[int(i)] for i in indices]
        requires_grad = any(p.requires_grad for p in _text_parameters(self.model))
        # open_clip's own text transformer adds positional embeddings for its whole context:
        # only a Hugging Face tower (which masks padding) takes trimmed token batches.
        tokens = self._tokens(texts) if self._hf else self.tokenizer(list(texts)).to(self.device)
        with torch.set_grad_enabled(requires_grad and torch.is_grad_enabled()):
            return self.model.encode_text(tokens)


def visual_frozen(model) -> bool:
    """True when nothing in the image tower trains (locked, or adapters on the text trunk only)."""
    return not any(p.requires_grad for p in model.visual.parameters())


def cached_image_features(model, pixels, mean, std, device: str, autocast, batch_size: int = 256):
    """Every item's image features, once: what a frozen image tower gives for the un-augmented image,
    exactly as it will embed it when serving. A frozen tower would otherwise run (and augment) every
    image on every step for features that could not change, the larger part of a step's time."""
    import torch

    was_training = model.visual.training
    model.visual.eval()
    features = []
    try:
        with torch.inference_mode(), autocast:
            for i in range(0, len(pixels), batch_size):
                images = pixels[i : i + batch_size].to(device).float().div_(255)
                images = ((images - mean) / std).contiguous(memory_format=torch.channels_last)
                features.append(model.encode_image(images).float())
    finally:
        model.visual.train(was_training)
    return torch.cat(features).clone()  # out of inference mode: indexable inside autograd


def _text_parameters(model):
    if hasattr(model, "text"):
        return list(model.text.parameters())
    visual = {id(p) for p in model.visual.parameters()}
    return [p for n, p in model.named_parameters() if id(p) not in visual and n != "logit_scale"]


# ---- the loop


def contrastive_loss(image_features, text_features, logit_scale, text_ids, weights=None):
    """Symmetric InfoNCE over B images and their B x K sampled texts (text_ids: B x K).

    A text is a positive of its own image and of every image that drew the identical text: two
    products both described as "flag" are not each other's negatives. `weights` (B): per-item
    weights of the loss terms (an item's texts carry its weight); None weighs all alike.
    """
    import torch
    import torch.nn.functional as F

    b, k = text_ids.shape
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale * image_features @ text_features.T  # B x BK
    flat = text_ids.reshape(-1)
    positive = (text_ids[:, :, None] == flat[None, None, :]).any(dim=1).float()  # B x BK, own texts included
    if weights is None:
        weights = torch.ones(b, device=logits.device)
    weights = weights.float()
    image_terms = -(positive / positive.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1)
    text_targets = positive.T / positive.T.sum(1, keepdim=True)
    text_terms = -(text_targets * F.log_softmax(logits.T, dim=1)).sum(1)
    text_weights = weights.repeat_interleave(k)
    image_loss = (image_terms * weights).sum() / weights.sum()
    text_loss = (text_terms * text_weights).sum() / text_weights.sum()
    return (image_loss + text_loss) / 2


def _param_groups(model, weight_decay: float, adapter_lr: float | None = None):
    decay, no_decay, adapters = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if adapter_lr is not None and "lora_" in name:
            adapters.append(p)
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if adapters:
        groups.append({"params": adapters, "weight_decay": 0.0, "lr": adapter_lr})
    return groups


def _schedule(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_contrastive(
    model,
    tokenizer,
    data: PairData,
    config: TrainConfig,
    *,
    workdir: Path,
    device: str = "cpu",
    progress: TrainProgress | None = None,
    image_limits: ImageLimits | None = None,
    decode_workers: int = 2,
) -> TrainResult:
    """Fit `model` in place on `data`; checkpoints go to `workdir` (resumed from if compatible)."""
    import torch

    progress = progress or SilentProgress()
    started = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model.to(device)
    apply_locks(model, config)
    trainable = trainable_names(model)
    if not trainable:
        raise TrainingError("every parameter is locked: nothing to train")
    if hasattr(model, "logit_scale") and config.learn_temperature and config.init_temperature is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / config.init_temperature))

    if device == "cpu":
        # oneDNN's convolutions run fastest on NHWC; the batches below are made to match
        model.visual.to(memory_format=torch.channels_last)
    size = model_image_size(model)
    frozen_visual = visual_frozen(model)
    # A frozen image tower is run once per image, un-augmented (`cached_image_features`).
    store_size = size if not config.augment or frozen_visual else int(math.ceil(size * 1.15))
    pixels = decode_images(data.images, store_size, image_limits, decode_workers)
    mean, std = image_normalisation(model)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    autocast, use_scaler, precision = _autocast(device, config.mixed_precision)
    image_cache = cached_image_features(model, pixels, mean_t, std_t, device, autocast) if frozen_visual else None
    if image_cache is not None:
        del pixels

    # Every (item, text) choice indexes one flat list of distinct texts.
    distinct = list(dict.fromkeys(t for texts in data.texts for t in texts))
    position = {t: i for i, t in enumerate(distinct)}
    choices = [torch.tensor([position[t] for t in texts]) for texts in data.texts]
    text_side = TextFeatures(model, tokenizer, distinct, device)
    item_weights = None if data.weights is None else torch.tensor(data.weights, dtype=torch.float32)

    n = len(data.item_ids)
    batch_size = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch_size)  # drop the ragged tail: InfoNCE wants full batches
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay, config.adapter_lr), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, warmup=config.warmup_steps, total=total_steps)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    generator = torch.Generator().manual_seed(config.seed)

    fingerprint = f"{config.fingerprint()}-{data.fingerprint()}"
    state = _load_checkpoint(workdir / CHECKPOINT_NAME, fingerprint)
    step, epoch_losses, first_loss, order, losses = 0, [], None, None, []
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        step, epoch_losses, first_loss = state["step"], state["epoch_losses"], state["first_loss"]
        order, losses = state["order"], state["epoch_step_losses"]  # a run paused inside an epoch goes on with it
        log.info("resuming training at step %d (epoch %d)", step, len(epoch_losses))
    resumed_from = step
    stop_at = total_steps if config.max_steps is None else min(total_steps, config.max_steps)

    model.train()
    if config.lock_image or config.freeze_batchnorm:
        # frozen BatchNorm statistics stay frozen (open_clip froze a locked tower's; train() would unfreeze them)
        model.visual.apply(lambda m: m.eval() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) else None)
    progress.start(stop_at, step)
    seen_images, loop_started = 0, time.perf_counter()
    while step < stop_at:
        epoch = step // steps_per_epoch
        if step % steps_per_epoch == 0 or order is None:
            order, losses = _epoch_order(n, data.groups if config.group_batches else None, generator), []
        for b in range(step % steps_per_epoch, steps_per_epoch):
            if step >= stop_at:
                break
            idx = order[b * batch_size : (b + 1) * batch_size]
            picks = torch.stack(
                [choices[i][torch.randint(len(choices[i]), (config.texts_per_image,), generator=generator)] for i in idx]
            )
            if image_cache is None:
                images = pixels[idx].to(device, non_blocking=True).float().div_(255)
                if config.augment:
                    images = augment_batch(images, size, config, generator)
                elif images.shape[-1] != size:
                    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
                images = ((images - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
            with autocast:
                image_features = model.encode_image(images) if image_cache is None else image_cache[idx].to(device)
                text_features = text_side(picks.reshape(-1))
                scale = model.logit_scale.exp().clamp(max=100)
                batch_weights = None if item_weights is None else item_weights[idx].to(device)
                loss = contrastive_loss(image_features, text_features, scale, picks.to(device), batch_weights)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            value = float(loss.detach())
            first_loss = value if first_loss is None else first_loss
            losses.append(value)
            seen_images += len(idx)
            rate = seen_images / max(1e-9, time.perf_counter() - loop_started)
            progress.step(step, loss=value, images_per_s=rate, temperature=_temperature(model))
        if losses:
            if step % steps_per_epoch == 0:  # a run paused mid-epoch records the epoch when it completes
                epoch_losses.append(float(np.mean(losses)))
                progress.epoch(epoch + 1, mean_loss=epoch_losses[-1])
            _save_checkpoint(workdir / CHECKPOINT_NAME, model, trainable, optimizer, scheduler, scaler, generator,
                             step=step, epoch_losses=epoch_losses, first_loss=first_loss, fingerprint=fingerprint,
                             order=order, epoch_step_losses=losses)
    progress.finish()
    model.eval()
    if device == "cpu":
        model.visual.to(memory_format=torch.contiguous_format)
    elapsed = time.perf_counter() - loop_started
    return TrainResult(
        steps=step,
        epochs_done=len(epoch_losses),
        epoch_losses=[round(x, 5) for x in epoch_losses],
        first_step_loss=first_loss,
        temperature=_temperature(model),
        seconds=round(time.perf_counter() - started, 2),
        images_per_s=round(seen_images / max(1e-9, elapsed), 1),
        resumed_from_step=resumed_from,
        stats={"items": n, "distinct_texts": len(distinct), "batch_size": batch_size,
               "steps_per_epoch": steps_per_epoch, "trainable_parameters": _count(model, trainable),
               "adapter_parameters": _count(model, [n for n in trainable if "lora_" in n]),
               "text_features_cached": text_side.cached is not None, "image_store_size": store_size,
               "image_features_cached": image_cache is not None,
               "precision": precision},
    )


def _epoch_order(n: int, groups: list[str] | None, generator):
    """A random permutation of the items; with groups, each group's items stay next to each other
    (so they share a batch unless a batch boundary cuts the group) and the groups come in random order."""
    import torch

    order = torch.randperm(n, generator=generator)
    if groups is None:
        return order
    members: dict[str, list[int]] = {}
    for i in order.tolist():
        members.setdefault(groups[i], []).append(i)
    runs = list(members.values())
    return torch.tensor([i for g in torch.randperm(len(runs), generator=generator).tolist() for i in runs[g]])


def _autocast(device: str, mixed_precision: bool):
    """The autocast context for training steps, whether it needs a gradient scaler (fp16), its dtype."""
    import torch

    if mixed_precision and device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16), True, "float16"
    if mixed_precision and device == "cpu" and cpu_bfloat16():
        return torch.autocast("cpu", dtype=torch.bfloat16), False, "bfloat16"
    return torch.autocast("cpu", enabled=False), False, "float32"


def cpu_bfloat16() -> bool:
    """True where oneDNN has bfloat16 kernels (AVX-512 or AMX); elsewhere it would be slower than fp32."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _temperature(model) -> float:
    return float(model.logit_scale.detach().exp().reciprocal())


def _count(model, names: list[str]) -> int:
    wanted = set(names)
    return sum(p.numel() for n, p in model.named_parameters() if n in wanted)


def _save_checkpoint(path: Path, model, trainable, optimizer, scheduler, scaler, generator, **extra) -> None:
    import torch

    # Frozen weights come back from the base model on resume; only what trains is saved.
    keep = set(trainable)
    parameters = {name for name, _ in model.named_parameters()}
    weights = {k: v for k, v in model.state_dict().items() if k in keep or k not in parameters}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "generator": generator.get_state(), **extra}, tmp)
    # Without the fsync a power loss can leave the renamed name pointing at unwritten blocks:
    # the last good checkpoint would be gone, not just the newest epoch.
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file: start over rather than fail forever
        log.warning("ignoring unreadable training checkpoint %s: %s", path, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("training checkpoint %s is for another configuration or data; starting over", path)
        return None
    return state
