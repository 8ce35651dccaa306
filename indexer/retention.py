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

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from indexer.versions import index_version_path, mark_pending, mark_recorded
from store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionOutcome:
    dropped: list[str]  # index versions whose row (and local directory) were removed
    journal_entries_deleted: int


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
        dropped, pruned = store.prune_index_versions([v.index_version for v in candidates])
        for name in dropped:
            if name in local:
                shutil.rmtree(local[name], ignore_errors=True)
    finally:
        for name in local:
            mark_recorded(indexes_dir, name)
    if dropped or pruned:
        log.info("retention: dropped index versions %s, %d journal entries", ", ".join(dropped) or "none", pruned)
    return RetentionOutcome(dropped, pruned)
