"""Index versions on disk: written into a temp dir, fsynced, renamed into place, verified on load."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from indexer.ann import AnnIndex

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
_TMP_PREFIX = ".tmp-"
# indexes/.pending-<version>: made before <version> is renamed into place, removed once its
# index_versions row is committed. Left behind, it names a build that died in between.
_PENDING_PREFIX = ".pending-"


class IndexVersionError(RuntimeError):
    pass


@dataclass
class LoadedIndexVersion:
    index_version: str
    model_version: str
    path: Path
    manifest: dict
    indexes: dict[str, AnnIndex]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (the directory's own metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_index_version() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


@contextmanager
def build_lock(indexes_dir: Path, *, is_recorded: Callable[[str], bool] | None = None):
    """One index build at a time per PRISM_HOME (an flock: the kernel drops it when its holder dies).

    While it is held no build is under way, so what a build leaves only while it runs is a dead
    build's: temp dirs, and versions renamed into place whose SQL row never came (a `.pending-`
    marker still names them and `is_recorded` says no row does). Both are removed; a version
    that did get its row only loses its stale marker.
    """
    indexes_dir.mkdir(parents=True, exist_ok=True)
    with open(indexes_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for leftover in indexes_dir.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if is_recorded is not None:
                for marker in indexes_dir.glob(f"{_PENDING_PREFIX}*"):
                    version = marker.name[len(_PENDING_PREFIX):]
                    if version and not is_recorded(version):
                        log.warning("removing index version %s: its build died before recording it", version)
                        shutil.rmtree(indexes_dir / version, ignore_errors=True)
                    marker.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mark_recorded(indexes_dir: Path, version: str) -> None:
    """The version's SQL row is committed: it is no longer a build that may have died half-way."""
    (Path(indexes_dir) / f"{_PENDING_PREFIX}{version}").unlink(missing_ok=True)


def write_index_version(
    indexes_dir: Path, *, model_version: str, indexes: dict[str, AnnIndex], extra: dict | None = None
) -> tuple[str, Path, dict]:
    """Write indexes + manifest atomically; returns (index_version, final path, manifest).

    Call under `build_lock`, and `mark_recorded` once the version's SQL row is committed: until
    then the version is marked pending, and the next build removes it if its row never came.
    """
    version = new_index_version()
    tmp = indexes_dir / f"{_TMP_PREFIX}{version}"
    final = indexes_dir / version
    tmp.mkdir(parents=True)
    try:
        files: dict[str, str] = {}
        for modality, ann in indexes.items():
            for name in ann.save(tmp, modality):
                files[name] = _sha256(tmp / name)
        manifest = {
            "format": 1,
            "index_version": version,
            "model_version": model_version,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "indexes": {m: ann.info.to_dict() for m, ann in indexes.items()},
            "files": files,
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for name in [*files, "manifest.json"]:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        pending = indexes_dir / f"{_PENDING_PREFIX}{version}"
        pending.touch()
        fsync_dir(indexes_dir)
        os.rename(tmp, final)
        fsync_dir(indexes_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version, final, manifest


def load_index_version(path: str | Path, *, verify: bool = True) -> LoadedIndexVersion:
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise IndexVersionError(f"{path} is not an index version (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    if verify:
        for name, digest in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise IndexVersionError(f"{file} is missing")
            if _sha256(file) != digest:
                raise IndexVersionError(f"{file} does not match its sha256 in the manifest")
    indexes = {m: AnnIndex.load(path, m, info) for m, info in manifest["indexes"].items()}
    return LoadedIndexVersion(manifest["index_version"], manifest["model_version"], path, manifest, indexes)
