"""Model versions on disk: models/<version>/ with checkpoint.pt, the open_clip config and model.json;
an adapter version (`write_adapter_version`) holds its LoRA adapters and trained heads instead of
checkpoint.pt, and names the full version it loads on top of.

Written as index versions are: into a temporary directory, every file and the directory fsynced,
a pending marker, a rename into place, then the `model_versions` row (and the marker removed).
model.json lists the sha256 of the other files, and the loader (`embedder.verify_model_files`)
checks them, so a truncated or corrupted checkpoint is refused by name instead of loading as
garbage. Once written a version is never changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from embedder import file_sha256, model_output_dim, read_model_meta
from indexer import fsync_dir, fsync_files, mark_pending, mark_recorded, remove_unrecorded
from store import Store

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_JSON = "model.json"


class ModelVersionExistsError(FileExistsError):
    pass


def training_workdir(models_dir: Path, version: str) -> Path:
    """Where a run keeps its per-epoch checkpoint until the version is written (hidden from listings)."""
    return Path(models_dir) / ".training" / version


def write_model_version(
    models_dir: Path,
    version: str,
    model,
    *,
    arch: str,
    config_file: Path | None = None,
    config: dict | None = None,
    info: dict,
    store: Store | None = None,
    parent: str | None = None,
) -> Path:
    """Write `model` as model version `version` atomically; with `store`, also its SQL row.

    A writer killed before the rename leaves only a temp dir; one killed after it, before the row,
    leaves a pending marker: under the retrain job lock, `remove_unrecorded_candidates` removes both.
    """
    import torch

    if config_file is None and config is None:
        raise ValueError("give the open_clip config as config_file or config")

    def write(tmp: Path) -> tuple[tuple[str, ...], dict]:
        torch.save(model.state_dict(), tmp / CHECKPOINT_FILE)
        config_name = f"{arch}.json"
        if config_file is not None:
            shutil.copyfile(config_file, tmp / config_name)
        else:
            (tmp / config_name).write_text(json.dumps(config, indent=2))
        return (CHECKPOINT_FILE, config_name), _meta(version, model, arch, CHECKPOINT_FILE, config_name, parent, info)

    return _publish(Path(models_dir), version, write, store=store, parent=parent)


def write_adapter_version(
    models_dir: Path,
    version: str,
    model,
    *,
    arch: str,
    config: dict,
    adapters: dict,
    base_version: str,
    trained: list[str],
    info: dict,
    store: Store | None = None,
    parent: str | None = None,
) -> Path:
    """Write `model` (its adapters still unmerged) as an adapter version over `base_version`.

    Only the adapters (`adapter_model.safetensors`), the other weights in `trained` (the names of
    the parameters that trained) and the buffers go into it (`trained.safetensors`); model.json
    points at the base by name and by the sha256 of its weight file, which every load checks.
    `adapters`: the adapter settings and modules (model.json's "adapter" section). Written as
    `write_model_version` writes, atomically, with its SQL row when `store` is given.
    """
    from embedder import ADAPTER_FILE, TRAINED_FILE, adapter_state, save_safetensors, trained_state

    models_dir = Path(models_dir)
    base_meta = read_model_json(models_dir, base_version)
    if base_meta is None:
        raise FileNotFoundError(f"base model version {base_version!r} is not in {models_dir}")
    if base_meta.get("adapter"):
        raise ValueError(f"{base_version!r} is an adapter version; adapters go on a full model version")
    base_checkpoint = models_dir / base_version / base_meta["checkpoint"]

    def write(tmp: Path) -> tuple[tuple[str, ...], dict]:
        save_safetensors(adapter_state(model), tmp / ADAPTER_FILE)
        save_safetensors(trained_state(model, trained), tmp / TRAINED_FILE)
        config_name = f"{arch}.json"
        (tmp / config_name).write_text(json.dumps(config, indent=2))
        meta = {
            **_meta(version, model, arch, TRAINED_FILE, config_name, parent, info),
            "adapter": {**adapters, "file": ADAPTER_FILE},
            "base_model": {"version": base_version, "checkpoint": base_meta["checkpoint"],
                           "sha256": file_sha256(base_checkpoint)},
        }
        return (ADAPTER_FILE, TRAINED_FILE, config_name), meta

    return _publish(models_dir, version, write, store=store, parent=parent)


def _meta(version: str, model, arch: str, checkpoint: str, config_name: str, parent: str | None, info: dict) -> dict:
    return {
        "model_version": version,
        "arch": arch,
        "checkpoint": checkpoint,
        "open_clip_config": config_name,
        "parent": parent,
        "embed_dim": int(model_output_dim(model)),
        "created_at": datetime.now(timezone.utc).isoformat(),
        **info,
    }


def _publish(models_dir: Path, version: str, write, *, store: Store | None, parent: str | None) -> Path:
    """The one publish protocol of model versions: `write(tmp)` makes the files in a temp dir and
    returns (their names, model.json's content); their sha256 digests go into model.json last (no
    `info` a caller passes may replace what the loader checks); fsync, a pending marker (with
    `store`), rename, then the SQL row."""
    target = models_dir / version
    if target.exists():
        raise ModelVersionExistsError(f"model version {version!r} already exists at {target}; versions are immutable")
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=models_dir))
    try:
        names, meta = write(tmp)
        meta = {**meta, "files": {name: file_sha256(tmp / name) for name in names}}
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        fsync_files(tmp, (*names, MODEL_JSON))
        if store is not None:
            mark_pending(models_dir, version)
        os.rename(tmp, target)
        fsync_dir(models_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if store is not None:
        store.register_model_version(version, spec=version, dim=meta["embed_dim"], parent=parent, info=meta)
        mark_recorded(models_dir, version)
    return target


def version_size(models_dir: Path, version: str) -> int:
    """Bytes a model version's own directory holds (an adapter version's base not counted)."""
    root = Path(models_dir) / version
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@contextlib.contextmanager
def pending_candidate(models_dir: Path, version: str) -> Iterator[None]:
    """Mark `version` as being written by a retrain run until it is written and registered.

    The marker exists from before the version's temp dir is made until its `model_versions` row is
    committed; a run killed (or failing) in between leaves it, and the next run, under the job
    lock, removes the half-written or unregistered version it names.
    """
    models_dir = Path(models_dir)
    if (models_dir / version).exists():  # not ours to mark: it could be removed as a dead run's
        raise ModelVersionExistsError(f"model version {version!r} already exists at {models_dir / version}")
    models_dir.mkdir(parents=True, exist_ok=True)
    mark_pending(models_dir, version)
    yield
    mark_recorded(models_dir, version)


def remove_unrecorded_candidates(models_dir: Path, store: Store) -> list[str]:
    """Remove the versions retrain runs that died were writing: their temp dirs, and the version
    itself when no `model_versions` row names it. Only under the retrain job lock (no run is live)."""
    return remove_unrecorded(
        models_dir, lambda version: store.get_model_version(version) is not None, what="model version",
        temp_dirs=".{version}.tmp-*",  # write_model_version's temp dir
    )


def read_model_json(models_dir: Path, version: str) -> dict | None:
    path = Path(models_dir) / version / MODEL_JSON
    return read_model_meta(version, path) if path.is_file() else None


def activate_version(store: Store, version: str):
    """Serve `version`: an index version, or a model version (its newest index version). One transaction.

    This is rollback and roll-forward alike; running servers swap on their next query.
    """
    return store.activate_index_version(resolve_version(store, version).index_version)


def resolve_version(store: Store, version: str):
    """The index version `version` names: itself, or a model version's newest index version.
    Raises `UnknownVersionError` for neither, or a model version with no index built."""
    from store import UnknownVersionError

    found = store.get_index_version(version)
    if found is not None:
        return found
    if store.get_model_version(version) is None:
        raise UnknownVersionError(f"no model or index version named {version!r}")
    built = [v for v in store.list_index_versions() if v.model_version == version]
    if not built:
        raise UnknownVersionError(
            f"model version {version!r} has no index version yet: build one with `prism index --model {version}`"
        )
    return built[-1]
