"""Products' images after the first: the serving version's `image_extra` index, joined to products.

An index version holds a product's first image in its `image` index under the product's row id,
and each further image in its `image_extra` index under that image's `product_images.image_id`.
The join from image id to product is read from SQL when the version loads (`Store.image_rows`);
image ids of images replaced since the build (a new image list gets new ids) map to no product
and are never returned.

Filters and deletions are row-id sets: an image-target search maps them onto image ids (every
image of a product the filter admits is admitted; every image of a masked product is masked), so
a filter or a deletion applies to all of a product's images. An image query ranks each product by
its best-matching image: image hits are fetched deeper than the products wanted (a product may
hold up to MAX_IMAGES of them) and folded to one per product.
"""

from __future__ import annotations

import threading

import numpy as np

from indexer import MAX_IMAGES, AnnIndex, IdSet
from store import Store

# Image hits fetched per product wanted on the first try: most products' images are not all near
# one query; a query that folds to too few products fetches again, up to MAX_IMAGES per product.
FIRST_FETCH_FACTOR = 4
# Filters whose image-id sets are kept (oldest dropped first).
MAPPED_FILTERS = 64


class ExtraImages:
    def __init__(self, ann: AnnIndex, image_ids: np.ndarray, rows: np.ndarray, gone: np.ndarray):
        self.ann = ann
        self.image_ids = image_ids  # sorted; those the index holds that still exist in SQL
        self.rows = rows  # the product (row id) of each
        self._gone = gone  # ids the index holds that no longer exist: always excluded
        self._excluded: tuple[object, IdSet] | None = None
        # Filters' row-id sets mapped onto image ids, by the set object: FilterIndex hands out one
        # object per distinct filter, so a repeated filter maps once. The set is kept with its
        # mapping, so its id is never reused while cached.
        self._mapped: dict[int, tuple[IdSet, IdSet]] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, ann: AnnIndex, store: Store) -> "ExtraImages":
        held = ann.ids()
        image_ids, rows = store.image_rows(held)
        gone = np.setdiff1d(held, image_ids, assume_unique=True)
        return cls(ann, image_ids, rows, gone)

    def excluded(self, masked_rows: IdSet) -> IdSet:
        """The image ids a search must not return: those of `masked_rows` (the overlay's mask of
        changed and deleted products, one object per overlay) and those gone from SQL. Made once
        per overlay."""
        cached = self._excluded
        if cached is not None and cached[0] is masked_rows:
            return cached[1]
        masked = self.image_ids[masked_rows.contains(self.rows)] if len(masked_rows) else self.image_ids[:0]
        excluded = IdSet(np.union1d(masked, self._gone))
        with self._lock:
            self._excluded = (masked_rows, excluded)
        return excluded

    def allowed(self, rows: IdSet) -> IdSet:
        """The image ids of the products a filter admits."""
        cached = self._mapped.get(id(rows))
        if cached is not None and cached[0] is rows:
            return cached[1]
        mapped = IdSet(self.image_ids[rows.contains(self.rows)])
        with self._lock:
            if len(self._mapped) >= MAPPED_FILTERS:
                self._mapped.pop(next(iter(self._mapped)))
            self._mapped[id(rows)] = (rows, mapped)
        return mapped

    def search(
        self, query: np.ndarray, want: int, *, allowed: IdSet | None, masked_rows: IdSet, exclude_rows: np.ndarray,
        exact_subset_max: int,
    ) -> list[tuple[int, float, int]]:
        """Top `want` products by their best image here: (row id, cosine, image id), best first."""
        if want <= 0 or not len(self.image_ids):
            return []
        allowed_images = None if allowed is None else self.allowed(allowed)
        excluded = self.excluded(masked_rows)
        total = self.ann.ntotal
        fetch = min(want * FIRST_FETCH_FACTOR, total)
        while True:
            scores, ids = self.ann.search(query, fetch, allowed=allowed_images, excluded=excluded,
                                          exact_subset_max=exact_subset_max)
            best = self._fold(scores[0], ids[0], exclude_rows)
            exhausted = (ids[0] < 0).any() or fetch >= min(total, want * MAX_IMAGES)
            if len(best) >= want or exhausted:
                return best[:want]
            fetch = min(fetch * FIRST_FETCH_FACTOR, total, want * MAX_IMAGES)

    def _fold(self, scores: np.ndarray, ids: np.ndarray, exclude_rows: np.ndarray) -> list[tuple[int, float, int]]:
        valid = ids >= 0
        ids, scores = ids[valid], scores[valid]
        at = np.minimum(np.searchsorted(self.image_ids, ids), max(len(self.image_ids) - 1, 0))
        known = self.image_ids[at] == ids
        best: dict[int, tuple[float, int]] = {}
        for image_id, score, row in zip(ids[known].tolist(), scores[known].tolist(), self.rows[at[known]].tolist()):
            if row in exclude_rows:
                continue
            if row not in best or score > best[row][0]:
                best[row] = (score, image_id)
        return sorted(((row, s, i) for row, (s, i) in best.items()), key=lambda t: (-t[1], t[0]))


class ExtraOverlay:
    """The images after the first of products changed since the serving version was built (API
    uploads, catalog files), searched exactly like the overlay's changed vectors (search/overlay.py).
    The version's own images of those products are masked with the product (its row is in the
    image overlay's mask). Immutable: `applied` makes a new one.

    Vectors come from `product_images.vector` (an API upload, when made by the serving vector
    space), else from the serving model's vector cache (a catalog file's images, once its
    indexing run embedded them). An image in neither (not embedded yet, or by another model) is
    left out until the next build includes it; the product is still found by its first image."""

    def __init__(self, dim: int, by_row: dict[int, list[tuple[int, np.ndarray]]] | None = None):
        self.dim = dim
        self._by_row = by_row or {}
        pairs = [(row, image_id, vector) for row, images in sorted(self._by_row.items()) for image_id, vector in images]
        self._rows = np.asarray([p[0] for p in pairs], dtype=np.int64)
        self._ids = np.asarray([p[1] for p in pairs], dtype=np.int64)
        self._matrix = (np.stack([p[2] for p in pairs]).astype(np.float32) if pairs
                        else np.zeros((0, dim), np.float32))

    def __len__(self) -> int:
        return len(self._ids)

    def applied(self, changes, store: Store, vector_space: str, cache_dir) -> "ExtraOverlay":
        """A new overlay with `changes` (journal entries, oldest first) applied: products deleted,
        or whose images changed, are read again from SQL."""
        touched = {c.row_id for c in changes
                   if c.op == "delete" or (c.op in ("upsert", "file") and c.image_action in ("set", "clear"))}
        if not touched:
            return self
        by_row = {row: images for row, images in self._by_row.items() if row not in touched}
        live = {row for row, p in store.products_by_row_ids(touched).items() if p.deleted_at is None}
        found = {row: [im for im in images if im.image_status == "ok" and im.image_hash]
                 for row, images in store.product_images(live).items()}
        cached = [im for images in found.values() for im in images
                  if im.vector is None or im.vector_space != vector_space]
        from_cache: dict[int, np.ndarray] = {}
        if cached:
            from embedder import VectorCache

            vectors, hit = VectorCache(cache_dir, self.dim).get_many([f"image:{im.image_hash}" for im in cached])
            from_cache = {im.image_id: v for im, v, ok in zip(cached, vectors, hit) if ok}
        for row, images in found.items():
            kept = []
            for im in images:
                vector = im.vector if im.vector is not None and im.vector_space == vector_space \
                    else from_cache.get(im.image_id)
                if vector is not None and len(vector) == self.dim:
                    kept.append((im.image_id, np.asarray(vector, dtype=np.float32)))
            if kept:
                by_row[row] = kept
        return ExtraOverlay(self.dim, by_row)

    def search(self, query: np.ndarray, want: int, *, allowed: IdSet | None,
               exclude_rows: np.ndarray) -> list[tuple[int, float, int]]:
        """Top `want` products by their best image here: (row id, cosine, image id)."""
        if not len(self._ids) or want <= 0:
            return []
        keep = np.ones(len(self._ids), dtype=bool)
        if allowed is not None:
            keep &= allowed.contains(self._rows)
        if len(exclude_rows):
            keep &= ~np.isin(self._rows, exclude_rows)
        if not keep.any():
            return []
        scores = self._matrix[keep] @ np.asarray(query, dtype=np.float32).reshape(-1)
        best: dict[int, tuple[float, int]] = {}
        for row, score, image_id in zip(self._rows[keep].tolist(), scores.tolist(), self._ids[keep].tolist()):
            if row not in best or score > best[row][0]:
                best[row] = (score, image_id)
        return sorted(((row, s, i) for row, (s, i) in best.items()), key=lambda t: (-t[1], t[0]))[:want]
