"""Index-version retention: old versions' files and rows go, and the change journal they needed.

After a build publishes, `apply_retention` keeps the newest `keep_versions` index versions (by
creation) and the active one; every other version's row is deleted (it can no longer be
activated: the journal it would replay is pruned) and so is its directory under `indexes/`.
Journal entries every remaining version already holds are deleted in the same transaction as
the rows (`Store.prune_index_versions`).

Crash safety reuses the build's pending markers: each version about to be dropped is marked
pending first. Killed after its row is deleted but before its directory is, the marker and the
missing row are exactly what the next build's `build_lock` cleans up (`remove_unrecorded`);
killed before, the row still exists and only the marker is cleared.
"""

from __future__ import annotations

import fcntl
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


_HOLD_PREFIX = ".journal-hold-"


@contextmanager
def journal_hold(indexes_dir: Path, seq: int):
    """Keep journal entries after `seq` from being pruned while a build that started there runs.

    A build reads the journal position before it embeds (minutes to hours) and replays what came
    after it when it publishes; retention run by another build meanwhile must not prune those
    entries. The hold is a file naming `seq`, flocked while the build lives, so the hold of a
    build that died is seen as such and removed."""
    indexes_dir = Path(indexes_dir)
    indexes_dir.mkdir(parents=True, exist_ok=True)
    path = indexes_dir / f"{_HOLD_PREFIX}{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(int(seq)).encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def held_journal_floor(indexes_dir: Path) -> int | None:
    """The lowest journal position a live build holds (None: no build holds any)."""
    floor = None
    for path in Path(indexes_dir).glob(f"{_HOLD_PREFIX}*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its build is alive
                text = path.read_text().strip()
                if text.isdigit():
                    floor = int(text) if floor is None else min(floor, int(text))
                else:
                    floor = 0  # being written: hold everything, to be safe
                continue
            path.unlink(missing_ok=True)  # its build died
        finally:
            os.close(fd)
    return floor


def apply_retention(store: Store, indexes_dir: Path, keep_versions: int) -> RetentionOutcome:
    """Drop index versions beyond the newest `keep_versions` and the active one, with the journal
    entries all remaining versions hold. Call under `build_lock` (no build may be recording a
    version meanwhile): `CatalogIndexer.build` holds it right after publishing."""
    indexes_dir = Path(indexes_dir)
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
            [v.index_version for v in candidates], keep_after=held_journal_floor(indexes_dir)
        )
        for name in dropped:
            if name in local:
                shutil.rmtree(local[name], ignore_errors=True)
    finally:
        for name in local:
            mark_recorded(indexes_dir, name)
    if dropped or pruned:
        log.info("retention: dropped index versions %s, %d journal entries", ", ".join(dropped) or "none", pruned)
    return RetentionOutcome(dropped, pruned)
