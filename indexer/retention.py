"""Retention: old versions' files and rows go, and the change journal they needed.

After a build publishes, `apply_retention` keeps the newest `keep_versions` index versions (by
creation) and the active one; every other version's row is deleted (it can no longer be
activated: the journal it would replay is pruned) and so is its directory under `indexes/`.
Journal entries every remaining version already holds are deleted in the same transaction as
the rows (`Store.prune_index_versions`). Then model versions go that no remaining index version
uses, older than the newest `keep_versions` models, that no running retrain or live build needs
(a nightly candidate that lost its gate is ~600 MB of weights, plus its vector cache).

Crash safety reuses the build's pending markers: each version about to be dropped is marked
pending first. Killed after its row is deleted but before its directory is, the marker and the
missing row are exactly what the next build's `build_lock` cleans up (`remove_unrecorded`);
killed before, the row still exists and only the marker is cleared.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from indexer.versions import index_version_path, mark_pending, mark_recorded
from store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionOutcome:
    dropped: list[str]  # index versions whose row (and local directory) were removed
    journal_entries_deleted: int
    model_versions_dropped: list[str]  # with their weights under models/ and their vector cache


_HOLD_PREFIX = ".build-hold-"


@dataclass(frozen=True)
class LiveBuilds:
    journal_floor: int | None  # the lowest journal position a live build started from (None: no build)
    # The models live builds embed with; None when a hold could not be read yet (being written):
    # then no model is pruned this time.
    model_versions: frozenset[str] | None


@contextmanager
def build_hold(indexes_dir: Path, seq: int, model_version: str):
    """Keep what a running build needs from retention: the journal entries after `seq` and the
    files of `model_version` (its weights, its vector cache).

    A build reads the journal position before it embeds (minutes to hours) and replays what came
    after it when it publishes; retention run by another build meanwhile must neither prune those
    entries nor the model it embeds with. The hold is a file naming both, flocked while the build
    lives, so the hold of a build that died is seen as such and removed."""
    indexes_dir = Path(indexes_dir)
    indexes_dir.mkdir(parents=True, exist_ok=True)
    path = indexes_dir / f"{_HOLD_PREFIX}{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"seq": int(seq), "model_version": model_version}).encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def live_builds(indexes_dir: Path) -> LiveBuilds:
    """What the builds alive now hold (see `build_hold`)."""
    floor, models, readable = None, set(), True
    for path in Path(indexes_dir).glob(f"{_HOLD_PREFIX}*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its build is alive
                try:
                    hold = json.loads(path.read_text())
                    seq, model = int(hold["seq"]), str(hold["model_version"])
                except (ValueError, KeyError, TypeError):
                    floor, readable = 0, False  # being written: hold everything, to be safe
                    continue
                floor = seq if floor is None else min(floor, seq)
                models.add(model)
                continue
            path.unlink(missing_ok=True)  # its build died
        finally:
            os.close(fd)
    return LiveBuilds(floor, frozenset(models) if readable else None)


def apply_retention(store: Store, home: Path, keep_versions: int) -> RetentionOutcome:
    """Drop index versions beyond the newest `keep_versions` and the active one, with the journal
    entries all remaining versions hold; then the model versions nothing needs any more. Call
    under `build_lock` (no build may be recording a version meanwhile): `CatalogIndexer.build`
    holds it right after publishing."""
    home = Path(home)
    indexes_dir = home / "indexes"
    live = live_builds(indexes_dir)
    candidates = store.retention_candidates(keep_versions)
    local = {}
    for version in candidates:
        path = index_version_path(indexes_dir, version.path)
        # Only directories inside this home's indexes/ are ours to delete; a path set by hand
        # elsewhere keeps its files (its row goes all the same).
        if path.parent.resolve() == indexes_dir.resolve() and path.name == version.index_version:
            local[version.index_version] = path
            mark_pending(indexes_dir, version.index_version)
    try:
        dropped, pruned = store.prune_index_versions(
            [v.index_version for v in candidates], keep_after=live.journal_floor
        )
        for name in dropped:
            if name in local:
                shutil.rmtree(local[name], ignore_errors=True)
    finally:
        for name in local:
            mark_recorded(indexes_dir, name)
    models = [] if live.model_versions is None else _prune_models(store, home, keep_versions, live.model_versions)
    if dropped or pruned or models:
        log.info("retention: dropped index versions %s, %d journal entries, model versions %s",
                 ", ".join(dropped) or "none", pruned, ", ".join(models) or "none")
    return RetentionOutcome(dropped, pruned, models)


def _prune_models(store: Store, home: Path, keep_versions: int, held: frozenset[str]) -> list[str]:
    """Model versions Prism trained (a directory under models/) that no index version uses, older
    than the newest `keep_versions`, not named by a running retrain nor embedded with by a live
    build: their row, weights and vector cache go. A pretrained model (no directory: its weights
    are not ours) keeps its row and cache."""
    models_dir = home / "models"
    chosen = [
        name for name in store.model_retention_candidates(keep_versions)
        if name not in held and (models_dir / name / "model.json").is_file()
    ]
    # Marked pending first, like index versions: killed between the row and the files, the next
    # retrain's `remove_unrecorded_candidates` deletes what is left.
    for name in chosen:
        mark_pending(models_dir, name)
    try:
        dropped = store.prune_model_versions(chosen)
        for name in dropped:
            shutil.rmtree(models_dir / name, ignore_errors=True)
            shutil.rmtree(home / "embeddings" / name, ignore_errors=True)
            for other in (home / "embeddings").glob(f"{name}@*"):  # its int8 / bf16 vector caches
                shutil.rmtree(other, ignore_errors=True)
    finally:
        for name in chosen:
            mark_recorded(models_dir, name)
    return dropped
