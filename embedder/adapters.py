"""Low-rank adapters (LoRA, PyPI `peft`) on an open_clip model's towers, and adapter model versions.

An adapter model version stores what a fine-tune changed and nothing else: the LoRA matrices
(`adapter_model.safetensors`), the other weights that trained (projections, the temperature, a
tower trained whole: `trained.safetensors`) and a pointer to the full model version it was
trained on, by name and by the sha256 of that version's weight file. Loading one loads the base,
checks that digest (a base removed or replaced is an error that names it, never a silently
different model), puts the adapters back in and merges them into the base weights, so a served
adapter version runs exactly the base architecture at the base's speed.

Which modules get adapters: the Linear layers (and, when `attn` is named, open_clip's
`nn.MultiheadAttention`, whose in- and out-projections peft adapts as one module) inside a
tower's trunk whose names end with one of `targets`. The trunks: the text encoder of an open_clip `CLIP` (`transformer.`), of a
`CustomTextCLIP` (`text.transformer.`, for a Hugging Face tower its `encoder.` only, not the
unused BERT pooler), and the image tower (`visual.`). Projections stay outside: they train whole.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedder.spec import ModelSpecError

ADAPTER_FILE = "adapter_model.safetensors"
TRAINED_FILE = "trained.safetensors"
TOWERS = ("text", "image")
# The Linear layers of open_clip's own transformer blocks (the MLP's c_fc and c_proj) and of a
# BERT-style Hugging Face encoder (the demo's MiniLM: attention query, key, value and every dense).
# open_clip's attention is an `nn.MultiheadAttention`, whose forward reads `out_proj.weight`
# directly (a LoRA on `attn.out_proj` alone would never run) and packs q, k, v in one
# in_proj_weight. `attn` as a target adapts both through peft's MultiheadAttention support, which
# merges the adapter into the base weights for each forward and subtracts it again: the frozen
# base drifts by float rounding (~1e-8 a step), so it is not a default.
DEFAULT_TARGETS = ("c_fc", "c_proj", "query", "key", "value", "dense")


class AdapterError(ModelSpecError):
    """Adapters cannot be placed or loaded (no module matches, weights for another layout)."""


@dataclass(frozen=True)
class AdapterSettings:
    """How a fine-tune places its adapters. `alpha / rank` scales the adapters' output."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    towers: tuple[str, ...] = ("text",)
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise AdapterError(f"adapter rank must be at least 1, not {self.rank}")
        unknown = [t for t in self.towers if t not in TOWERS]
        if unknown or not self.towers:
            raise AdapterError(f"adapter towers are some of {', '.join(TOWERS)}, not {list(self.towers)}")
        if not self.targets:
            raise AdapterError("name at least one adapter target (e.g. query,value)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterSettings":
        return cls(rank=int(data["rank"]), alpha=float(data["alpha"]), dropout=float(data.get("dropout", 0.0)),
                   towers=tuple(data["towers"]), targets=tuple(data["targets"]))


@dataclass
class AdapterInfo:
    """What model.json says about an adapter version: its settings, the modules adapted, its base."""

    settings: AdapterSettings
    modules: list[str]
    base_version: str
    base_sha256: str
    extra: dict = field(default_factory=dict)


def trunk_prefixes(model, towers: Iterable[str]) -> list[str]:
    """Module-name prefixes of the trunks of `towers` in an open_clip model."""
    import open_clip
    from open_clip.hf_model import HFTextEncoder

    prefixes = []
    for tower in towers:
        if tower == "image":
            prefixes.append("visual.")
        elif isinstance(model, open_clip.CustomTextCLIP):
            prefixes.append("text.transformer.encoder." if isinstance(model.text, HFTextEncoder) else "text.transformer.")
        elif hasattr(model, "transformer"):
            prefixes.append("transformer.")
        else:
            raise AdapterError(f"cannot find the text trunk of a {type(model).__name__}")
    return prefixes


def adapter_targets(model, settings: AdapterSettings) -> list[str]:
    """The full names of the modules `settings` adapts in `model` (in model order)."""
    import torch

    prefixes = trunk_prefixes(model, settings.towers)
    adaptable = (torch.nn.Linear, torch.nn.MultiheadAttention)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, adaptable) or not name.startswith(tuple(prefixes)):
            continue
        if any(fnmatch.fnmatchcase(name, f"*.{pattern}") for pattern in settings.targets):
            # A MultiheadAttention's out_proj is adapted through its parent, never on its own.
            parent = name.rsplit(".", 1)[0]
            if name.endswith(".out_proj") and isinstance(model.get_submodule(parent), torch.nn.MultiheadAttention):
                continue
            chosen.append(name)
    if not chosen:
        raise AdapterError(
            f"no module of {type(model).__name__}'s {'+'.join(settings.towers)} trunk matches the adapter targets "
            f"{','.join(settings.targets)} (Linear layers such as query, value, dense, c_fc, c_proj, or attn)"
        )
    return chosen


def add_adapters(model, settings: AdapterSettings, modules: list[str] | None = None) -> list[str]:
    """Put fresh LoRA adapters (B = 0: the model's outputs do not change) on `modules` (default:
    `adapter_targets`), in place. Every base weight is left as it is; returns the modules adapted."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model

    modules = list(modules) if modules is not None else adapter_targets(model, settings)
    # A regex, matched whole: a plain list would also match every module whose name merely ends
    # the same way (`transformer.resblocks.0.attn` inside `visual.transformer...`).
    pattern = "^(?:" + "|".join(re.escape(m) for m in modules) + ")$"
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=pattern, bias="none")
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        # peft flags its MultiheadAttention support as experimental; its merge is checked by tests
        warnings.simplefilter("ignore", UserWarning)
        inject_adapter_in_model(config, model)
    # peft freezes everything that is not an adapter; what trains besides is the trainer's business
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad = trainable.get(_base_name(name), p.requires_grad)
    return modules


def adapter_state(model) -> dict:
    """The adapter weights of `model`, keyed as peft saves them (`...lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise AdapterError(
            f"adapter weights do not fit the model: {len(unexpected)} unexpected (e.g. {unexpected[:1]}), "
            f"{len(missing)} missing (e.g. {missing[:1]})"
        )


def has_adapters(model) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def base_state_name(name: str) -> str:
    """The name a parameter has in the model without adapters (`x.base_layer.weight` -> `x.weight`)."""
    return _base_name(name)


def _base_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def merge_adapters(model):
    """Fold every adapter into its base weights and put the plain modules back (peft's
    merge_and_unload, for a model the adapters were injected into): the result is the base
    architecture, as fast as the base model, with no peft module left in it."""
    import warnings

    from peft.tuners.tuners_utils import BaseTunerLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        while True:
            # outermost first: merging a MultiheadAttention adapter merges its out_proj too
            layer = next(((n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
            if layer is None:
                return model
            name, module = layer
            if not module.merged:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


def trained_state(model, names: Iterable[str]) -> dict:
    """The non-adapter weights that trained, keyed by their names without adapters, plus every
    buffer (BatchNorm statistics move unless frozen; the rest are small)."""
    wanted = {n for n in names if "lora_" not in n}
    state = {}
    params = dict(model.named_parameters())
    for name in wanted:
        state[_base_name(name)] = params[name].detach().cpu().contiguous().clone()
    for name, buffer in model.named_buffers():
        if "lora_" not in name:
            state[_base_name(name)] = buffer.detach().cpu().contiguous().clone()
    return state


def load_trained_state(model, state: dict) -> None:
    """Load `trained_state` back (names without adapters) into `model`, with or without adapters."""
    import torch

    own = {**{_base_name(n): p for n, p in model.named_parameters()}, **{_base_name(n): b for n, b in model.named_buffers()}}
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise AdapterError(f"trained weights do not fit the model: {len(unknown)} unknown, e.g. {unknown[0]!r}")
    with torch.no_grad():
        for name, value in state.items():
            target = own[name]
            if target.shape != value.shape:
                raise AdapterError(f"trained weight {name!r} has shape {tuple(value.shape)}, the model {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def save_safetensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def adapter_info(meta: dict) -> AdapterInfo | None:
    """The adapter section of a model.json, or None for a full model version."""
    adapter, base = meta.get("adapter"), meta.get("base_model")
    if not adapter:
        return None
    if not isinstance(base, dict) or not base.get("version") or not base.get("sha256"):
        raise AdapterError(f"model version {meta.get('model_version')!r} has adapters but no base_model pointer")
    return AdapterInfo(AdapterSettings.from_dict(adapter), list(adapter.get("modules") or []), str(base["version"]),
                       str(base["sha256"]))
