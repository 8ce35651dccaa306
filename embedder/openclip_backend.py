"""open_clip backend: built-in and Prism-registered architectures, tags, checkpoints, seeded random."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from embedder.base import Embedder, tokenizer_lowercases

log = logging.getLogger(__name__)


class OpenClipEmbedder(Embedder):
    def __init__(self, model, preprocess, tokenizer, *, name: str, spec: str, device: str, **kwargs):
        super().__init__(name=name, spec=spec, device=device, **kwargs)
        self.model = model.eval()
        self._preprocess = preprocess
        self.tokenizer = tokenizer
        self.dim = model_output_dim(model)
        self._trim = _text_trimmer(model, tokenizer)
        self._lowercases = tokenizer_lowercases(tokenizer)

    def _tokenizer_lowercases(self) -> bool:
        return self._lowercases

    def preprocess(self, image):
        return self._preprocess(image)

    def stack(self, tensors: list):
        import torch

        return torch.stack(tensors)

    def _encode_image_tensors(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode(), self.autocast():
            feats = self.model.encode_image(batch.to(self.device, non_blocking=True))
        return feats.float().cpu().numpy()

    def _encode_text_list(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(list(texts))
        with torch.inference_mode(), self.autocast():
            feats = self._trim(tokens.to(self.device)) if self._trim else self.model.encode_text(tokens.to(self.device))
        return feats.float().cpu().numpy()

    def encode_text_tokens_padded(self, texts: Sequence[str]) -> np.ndarray:
        """The untrimmed reference path (full context length); used to prove trimming is exact."""
        import torch

        with torch.inference_mode():
            feats = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return feats.float().cpu().numpy()


def model_output_dim(model) -> int:
    """The embedding width of an open_clip model (from its projection, else one forward pass)."""
    import torch

    if getattr(model, "text_projection", None) is not None:
        proj = model.text_projection
        return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]
    visual = getattr(model, "visual", None)
    if visual is not None and getattr(visual, "output_dim", None):
        return int(visual.output_dim)
    with torch.inference_mode():
        size = model.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        return int(model.encode_image(torch.zeros(1, 3, *size, device=next(model.parameters()).device)).shape[-1])


def pad_token_id(tokenizer) -> int:
    return int(getattr(tokenizer, "pad_token_id", 0) or 0)


def trim_padding(tokens, pad_id: int):
    """Cut a padded (batch, context) token tensor to its longest sequence."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return tokens[:, :length]


def _text_trimmer(model, tokenizer):
    """A forward that cuts padded token batches to their longest sequence, or None when not exact.

    Trimming is exact when the text tower attends causally and pools at the end-of-text token
    (positions after it cannot influence it), or when it masks padding itself (HF towers).
    """
    import open_clip
    import torch
    from open_clip.hf_model import HFTextEncoder
    from open_clip.transformer import TextTransformer, text_global_pool

    pad_id = pad_token_id(tokenizer)

    def cut(tokens: torch.Tensor) -> torch.Tensor:
        return trim_padding(tokens, pad_id)

    if isinstance(model, open_clip.CLIP):
        tower, pool, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)
        if model.attn_mask is None or pool not in ("argmax", "eos"):
            return None
    elif isinstance(model, open_clip.CustomTextCLIP) and isinstance(model.text, HFTextEncoder):
        return lambda tokens: model.encode_text(cut(tokens))
    elif isinstance(model, open_clip.CustomTextCLIP) and isinstance(model.text, TextTransformer):
        tower, pool, eos = model.text, model.text.pool_type, getattr(model.text, "eos_id", None)
        if tower.attn_mask is None or pool not in ("argmax", "eos") or tower.cls_emb is not None or tower.use_pad_mask:
            return None
    else:
        return None

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        tokens = cut(tokens)
        length = tokens.shape[1]
        cast = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast) + tower.positional_embedding[:length].to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.ln_final(x)
        x = text_global_pool(x, tokens, pool, eos_token_id=eos)
        # Read when called: int8 replaces a Linear projection after this forward is made.
        projection = tower.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Module) else x @ projection
        return x

    return forward
