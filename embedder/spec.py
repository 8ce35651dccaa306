"""Model specs: the one string grammar that names every model Prism can embed with.

    ARCH:TAG          open_clip architecture with a pretrained tag    ViT-B-32:laion2b_s34b_b79k
    ARCH:PATH         open_clip architecture with a checkpoint file   ViT-B-32:/models/ft.pt
    ARCH:random       open_clip architecture, seeded random weights   ViT-B-32:random
    hf:DIR_OR_HUB_ID  Hugging Face CLIP-compatible model              hf:/models/clip, hf:openai/clip-vit-base-patch32
    demo              Prism's offline demo model (MiniLM text tower, trained image tower)
    VERSION           a Prism model version under PRISM_HOME/models/
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class SpecKind(str, Enum):
    OPEN_CLIP = "open_clip"
    HF = "hf"
    DEMO = "demo"
    VERSION = "version"


class ModelSpecError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    kind: SpecKind
    raw: str
    arch: str | None = None
    # pretrained tag, checkpoint path, "random", an HF dir / hub id, or a version name
    source: str | None = None

    @property
    def is_random(self) -> bool:
        return self.kind is SpecKind.OPEN_CLIP and self.source == "random"


_ARCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")


def parse_model_spec(raw: str) -> ModelSpec:
    text = (raw or "").strip()
    if not text:
        raise ModelSpecError("empty model spec; expected ARCH:TAG, ARCH:PATH, ARCH:random, hf:DIR, demo or a model version")
    if text == "demo":
        return ModelSpec(SpecKind.DEMO, text)
    if text.startswith("hf:"):
        source = text[3:].strip()
        if not source:
            raise ModelSpecError(f"{raw!r}: 'hf:' needs a directory or hub id after it")
        return ModelSpec(SpecKind.HF, text, source=source)
    if ":" in text:
        arch, source = text.split(":", 1)
        arch, source = arch.strip(), source.strip()
        if not arch or not _ARCH.match(arch):
            raise ModelSpecError(f"{raw!r}: {arch!r} is not an open_clip architecture name")
        if not source:
            raise ModelSpecError(f"{raw!r}: give a pretrained tag, a checkpoint path or 'random' after ':'")
        return ModelSpec(SpecKind.OPEN_CLIP, text, arch=arch, source=source)
    return ModelSpec(SpecKind.VERSION, text, source=text)
