"""Catalog changes newer than the serving index version, held in memory on top of it.

An index version is immutable; catalog changes land in the change journal (SQL; the protocol is
described in search/journal.py) and every server replays the entries newer than its version's
`catalog_seq` into an `Overlay`:

- `masked[modality]`: row ids whose vector in the base index is stale or deleted (excluded from
  base searches with an id selector);
- `vectors[modality]`: the current vectors of changed products, searched exactly (the overlay
  holds only what changed since the last build, so brute force is the right tool).

Overlays are immutable snapshots: applying changes builds a new one, so a search in flight keeps
a consistent view while the next one sees the change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from indexer import IdSet
from store import CatalogChangeRecord

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class ChangeVectors:
    """The vectors a change means for the serving model: None = modality absent, KEEP = unchanged."""

    text: np.ndarray | None | str
    image: np.ndarray | None | str


KEEP = "keep"


class Overlay:
    def __init__(
        self,
        seq: int,
        dim: int,
        vectors: dict[str, dict[int, np.ndarray]],
        masked: dict[str, frozenset[int]],
        indexed: dict[str, np.ndarray] | None = None,
    ):
        self.seq = seq
        self.dim = dim
        self._vectors = vectors
        self._masked = masked
        # Sorted row ids of each modality's base index (None: unknown, mask every changed row).
        # Rows it does not hold need no mask, and every masked id costs each base search.
        self._indexed = indexed
        self._ids: dict[str, np.ndarray] = {}
        self._matrix: dict[str, np.ndarray] = {}
        self._masked_ids: dict[str, IdSet] = {}
        for m in MODALITIES:
            rows = sorted(vectors[m])
            self._ids[m] = np.asarray(rows, dtype=np.int64)
            self._matrix[m] = (
                np.stack([vectors[m][r] for r in rows]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
            )
            self._masked_ids[m] = IdSet(np.asarray(sorted(masked[m]), dtype=np.int64))

    @classmethod
    def start(
        cls, seq: int, dim: int, deleted: Iterable[int] = (), *, indexed: dict[str, np.ndarray] | None = None
    ) -> "Overlay":
        """The overlay of a freshly loaded version: products deleted outside the journal masked.

        `indexed`: per modality, the sorted row ids of the version's index; masks are kept to them."""
        deleted = [int(r) for r in deleted]
        masked = {m: frozenset(deleted) for m in MODALITIES}
        if indexed is not None:
            masked = {m: frozenset(r for r in deleted if _holds(indexed.get(m), r)) for m in MODALITIES}
        return cls(seq, dim, {m: {} for m in MODALITIES}, masked, indexed)

    def applied(
        self, changes: list[CatalogChangeRecord], vectors_for: Callable[[CatalogChangeRecord], ChangeVectors]
    ) -> "Overlay":
        """A new overlay with `changes` (oldest first) applied on top of this one."""
        if not changes:
            return self
        vectors = {m: dict(self._vectors[m]) for m in MODALITIES}
        masked = {m: set(self._masked[m]) for m in MODALITIES}
        for change in changes:
            row = change.row_id
            if change.op == "meta":
                continue  # price, category and the like: the filters' business, not the vectors'
            if change.op == "delete":
                for m in MODALITIES:
                    if self._in_base(m, row):
                        masked[m].add(row)
                    vectors[m].pop(row, None)
                continue
            new = vectors_for(change)
            for m, vector in (("text", new.text), ("image", new.image)):
                if isinstance(vector, str) and vector == KEEP:
                    continue
                if self._in_base(m, row):
                    masked[m].add(row)
                if vector is None:
                    vectors[m].pop(row, None)
                else:
                    vectors[m][row] = np.asarray(vector, dtype=np.float32)
        seq = max(self.seq, changes[-1].seq)
        return Overlay(seq, self.dim, vectors, {m: frozenset(v) for m, v in masked.items()}, self._indexed)

    def _in_base(self, modality: str, row: int) -> bool:
        return self._indexed is None or _holds(self._indexed.get(modality), row)

    def masked(self, modality: str) -> IdSet:
        """The row ids the base index must not return for this modality (sorted, with the bitmap
        its searches select by, built once per overlay)."""
        return self._masked_ids[modality]

    def is_masked(self, modality: str, row: int) -> bool:
        return row in self._masked[modality]

    def vector(self, modality: str, row: int) -> np.ndarray | None:
        return self._vectors[modality].get(row)

    def count(self, modality: str) -> int:
        return len(self._ids[modality])

    def search(
        self, modality: str, query: np.ndarray, k: int, *, allowed: IdSet | None, excluded: np.ndarray | None
    ) -> list[tuple[int, float]]:
        """Exact top-k (row id, cosine) among this modality's changed products. `allowed` is
        tested through its bitmap: a broad filter holds millions of ids at 10M products."""
        ids, matrix = self._ids[modality], self._matrix[modality]
        if not len(ids) or k <= 0:
            return []
        keep = np.ones(len(ids), dtype=bool)
        if allowed is not None:
            keep &= allowed.contains(ids)
        if excluded is not None and len(excluded):
            keep &= ~np.isin(ids, excluded)
        if not keep.any():
            return []
        ids, matrix = ids[keep], matrix[keep]
        scores = matrix @ np.asarray(query, dtype=np.float32).reshape(-1)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(ids[i]), float(scores[i])) for i in top]


def _holds(sorted_ids: np.ndarray | None, row: int) -> bool:
    if sorted_ids is None or not len(sorted_ids):
        return False
    at = int(np.searchsorted(sorted_ids, row))
    return at < len(sorted_ids) and int(sorted_ids[at]) == row
