"""Index versions on disk: written into a temp dir, fsynced, renamed into place, verified on load."""

from __future__ import annotations

import fcntl
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

from embedder import file_sha256
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


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (the directory's own metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(directory: Path, names) -> None:
    """Make `names` in `directory` durable, then the directory's entries: what a published
    version (index or model) needs before it is renamed into place."""
    for name in names:
        with open(Path(directory) / name, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(directory)


def new_index_version() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


@contextmanager
def build_lock(indexes_dir: Path, *, is_recorded: Callable[[str], bool] | None = None, store=None):
    """One index build at a time per database (with `store`) or per PRISM_HOME (without).

    With `store`, `Store.cluster_lock`: on PostgreSQL an advisory lock that excludes builds on
    every host sharing the database and ends with its holder's session; on SQLite an flock on
    indexes/.build.lock, as without one. The kernel drops an flock when its holder dies.

    While it is held no build is under way, so what a build leaves only while it runs is a dead
    build's: temp dirs, and versions renamed into place whose SQL row never came (a `.pending-`
    marker still names them and `is_recorded` says no row does). Both are removed; a version
    that did get its row only loses its stale marker.
    """
    indexes_dir.mkdir(parents=True, exist_ok=True)
    with (store.cluster_lock("index-build", wait=True, path=indexes_dir / ".build.lock") if store is not None
          else _flock(indexes_dir / ".build.lock")):
        for leftover in indexes_dir.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if is_recorded is not None:
            remove_unrecorded(indexes_dir, is_recorded, what="index version")
        yield


@contextmanager
def build_scratch(indexes_dir: Path):
    """A directory for what a build streams to disk before publishing (the re-rank codes), beside
    the versions so that publishing links its files rather than copying them. Removed when the
    build ends; a dead build's is a temp dir, which the next `build_lock` removes."""
    scratch = Path(indexes_dir) / f"{_TMP_PREFIX}build-{uuid.uuid4().hex}"
    scratch.mkdir(parents=True)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _flock(path: Path):
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mark_pending(directory: Path, version: str) -> None:
    """`directory/<version>` is about to be written and then recorded in SQL: until `mark_recorded`,
    a writer that dies leaves this marker, naming what `remove_unrecorded` may delete."""
    (Path(directory) / f"{_PENDING_PREFIX}{version}").touch()
    fsync_dir(directory)


def mark_recorded(directory: Path, version: str) -> None:
    """The version's SQL row is committed: it is no longer a write that may have died half-way."""
    (Path(directory) / f"{_PENDING_PREFIX}{version}").unlink(missing_ok=True)


def remove_unrecorded(
    directory: Path, is_recorded: Callable[[str], bool], *, what: str, temp_dirs: str | None = None
) -> list[str]:
    """Delete the versions whose writers died between `mark_pending` and their SQL row, and their
    temp dirs (`temp_dirs`, a glob with `{version}`); clear every marker. Only while no writer of
    `directory` can be live (under its build or job lock)."""
    directory = Path(directory)
    removed = []
    for marker in sorted(directory.glob(f"{_PENDING_PREFIX}*")):
        version = marker.name[len(_PENDING_PREFIX):]
        if version and temp_dirs is not None:
            for tmp in directory.glob(temp_dirs.format(version=version)):
                shutil.rmtree(tmp, ignore_errors=True)
        if version and not is_recorded(version) and (directory / version).exists():
            log.warning("removing %s %s: the run writing it died before recording it", what, version)
            shutil.rmtree(directory / version, ignore_errors=True)
            removed.append(version)
        marker.unlink(missing_ok=True)
    return removed


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
                files[name] = file_sha256(tmp / name)
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
        fsync_files(tmp, [*files, "manifest.json"])
        mark_pending(indexes_dir, version)
        os.rename(tmp, final)
        fsync_dir(indexes_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version, final, manifest


def index_version_path(indexes_dir: Path, recorded: str) -> Path:
    """Where an `index_versions.path` value points on this host.

    Rows record the version's directory relative to the home's `indexes/`, so a home can be moved,
    restored from backup or served from another mount point. Migration 0003 rewrote the rows of
    older releases, which held the path as PRISM_HOME spelled it; an absolute path it left (one
    not ending in `indexes/<version>`, set by hand) is taken as it is."""
    path = Path(recorded)
    return path if path.is_absolute() else indexes_dir / path


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
            if file_sha256(file) != digest:
                raise IndexVersionError(f"{file} does not match its sha256 in the manifest")
    indexes = {m: AnnIndex.load(path, m, info) for m, info in manifest["indexes"].items()}
    return LoadedIndexVersion(manifest["index_version"], manifest["model_version"], path, manifest, indexes)


def copy_version(published: Path, local: Path) -> Path:
    """A replica's own copy of a published (immutable) index or model version directory.

    Copied into a temporary sibling, fsynced and renamed, so `local` is either absent or whole;
    an existing copy is reused (versions never change once published). The loader checks the
    copy against the version's sha256 digests. Copies a dead process left half-made are removed."""
    published, local = Path(published), Path(local)
    if local.is_dir():
        return local
    if not published.is_dir():
        raise IndexVersionError(f"{published} is not published (is PRISM_SHARED_DIR the same path on every host?)")
    local.parent.mkdir(parents=True, exist_ok=True)
    for stale in local.parent.glob(f".{local.name}.copy-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = local.parent / f".{local.name}.copy-{uuid.uuid4().hex}"
    try:
        shutil.copytree(published, tmp)
        fsync_files(tmp, [p.name for p in tmp.iterdir() if p.is_file()])
        try:
            os.rename(tmp, local)
        except OSError:
            if not local.is_dir():  # not another process of this replica copying it first
                raise
        fsync_dir(local.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local
