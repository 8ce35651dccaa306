"""Hugging Face backend: CLIPModel-compatible models (CLIP, SigLIP, ChineseCLIP) from a dir or the hub."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedder.base import Embedder, tokenizer_lowercases


class HFClipEmbedder(Embedder):
    def __init__(self, model, tokenizer, image_processor, *, name: str, spec: str, device: str, **kwargs):
        super().__init__(name=name, spec=spec, device=device, **kwargs)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        model_type = getattr(model.config, "model_type", "")
        # SigLIP was trained on max-length padded text and has no padding mask: trimming would change it.
        self._padding = "max_length" if model_type.startswith("siglip") else "longest"
        self._max_length = _text_max_length(model.config, tokenizer)
        self.dim = int(getattr(model.config, "projection_dim", 0) or self._probe_dim())
        self._lowercases = tokenizer_lowercases(tokenizer)

    def _tokenizer_lowercases(self) -> bool:
        return self._lowercases

    def _probe_dim(self) -> int:
        return self._encode_text_list(["probe"]).shape[1]

    def preprocess(self, image):
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def stack(self, tensors: list):
        import torch

        return torch.stack(tensors)

    def _encode_image_tensors(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode(), self.autocast():
            out = self.model.get_image_features(pixel_values=batch.to(self.device))
        return _features(out)

    def _encode_text_list(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        enc = self.tokenizer(
            list(texts), padding=self._padding, truncation=True, max_length=self._max_length, return_tensors="pt"
        )
        kwargs = {"input_ids": enc["input_ids"].to(self.device)}
        if "attention_mask" in enc and self._padding == "longest":
            kwargs["attention_mask"] = enc["attention_mask"].to(self.device)
        with torch.inference_mode(), self.autocast():
            out = self.model.get_text_features(**kwargs)
        return _features(out)


def _features(out) -> np.ndarray:
    # transformers < 5 returns a tensor; 5.x returns an output whose pooler_output is projected.
    tensor = out if hasattr(out, "float") else out.pooler_output
    return tensor.float().cpu().numpy()


def _text_max_length(config, tokenizer=None) -> int:
    """Tokens per text: the text tower's positions, or fewer where the tokenizer declares a lower
    limit (a BERT-style tower such as Chinese-CLIP's has 512 positions but was trained on far
    shorter texts; its tokenizer config is where a checkpoint can say so). SigLIP pads every text
    to this length, so it must be the length the model was trained with."""
    text_cfg = getattr(config, "text_config", None)
    positions = int(getattr(text_cfg, "max_position_embeddings", 77) or 77)
    declared = getattr(tokenizer, "model_max_length", None)
    # transformers writes a huge sentinel (int(1e30)) when a tokenizer declares no limit.
    if isinstance(declared, int) and 0 < declared < 1_000_000:
        return min(positions, declared)
    return positions
