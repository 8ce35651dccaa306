"""The catalog change journal, read top to bottom: what writes it, what it promises, how a server
replays it. The replay is here; the other parts are named with where they live.

Why a journal. An index version is immutable, but products change between builds (API PUT and
DELETE, catalog files loaded by `prism index`). Every change is a row of `catalog_changes`, in
commit order (`seq`); a server serves "index version + every entry after its `catalog_seq`".

Writers (all in `store/db.py`, each in the same transaction as the product row it changes):
- `Store.upsert_product_live` (API PUT): op `upsert`, with the vectors the serving model made
  (`model_version`, text vector, image action set/clear/keep and vector).
- `Store.update_product_metadata` (a PUT that changes no embedded content): op `meta`, no vectors.
- `Store.soft_delete_product(s)` (API DELETE, `prism products delete`, feed deletes): op `delete`.
- `Store.upsert_products` (a catalog file, from the first index version on): op `file` for new,
  restored or content-changed products (the new text's hash when the text changed, the image
  action), op `meta` for metadata-only rows. File entries carry no vectors: the indexing run that
  loaded the file embeds the content into its model's vector cache.
On PostgreSQL every writer takes one advisory lock, so entries commit in `seq` order and a reader
never sees seq 11 before seq 10.

Positions. An index version records in its manifest the `catalog_seq` read before its build
listed products (`indexer/pipeline.py`, `CatalogIndexer.run`): entries after it are replayed on
top of it, entries at or before it are in it.

Pruning (`indexer/retention.py`). After a build publishes, entries at or below the lowest
`catalog_seq` of the versions still kept are deleted; a build still embedding holds the journal
from the position it started at (`indexes/.build-hold-<id>`), so its version can replay what
came after.

Replay (here, called by `SearchEngine` when it loads a version and before every query that sees a
newer `seq`). Each entry becomes per-modality vectors for the serving model (`ChangeVectors`) and
is applied to the immutable `Overlay` (search/overlay.py: base rows masked, changed vectors
searched exactly); the changed rows' filter columns patch the `FilterIndex`:
- `upsert` by the serving model: the journaled vectors;
- `upsert` by another model (a change that raced a model swap): the product embedded now;
- `file`: the vectors of the product's current content from the serving model's vector cache, or
  embedded now when another model's build embedded it (a rollback across models); content no
  build has embedded yet (its run is on its way) keeps the vectors the product had;
- `meta`: filters only; `delete`: masked everywhere.
A product's images after the first (`product_images`) are not journaled themselves: an entry that
sets or clears the product's image, or deletes it, makes the engine read the product's image rows
again (`search/images.py`, `ExtraOverlay.applied`; an API upload's rows carry their vectors).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from embedder import Embedder, VectorCache
from indexer import product_text
from search.filters import FilterIndex
from search.overlay import KEEP, ChangeVectors, Overlay
from store import CatalogChangeRecord, ProductRecord, Store

log = logging.getLogger(__name__)


def replay_changes(
    store: Store,
    changes: list[CatalogChangeRecord],
    embedder: Embedder,
    overlay: Overlay,
    filters: FilterIndex,
    *,
    embeddings_dir: Path,
) -> tuple[Overlay, FilterIndex]:
    """`overlay` and `filters` with `changes` (oldest first) applied, for the serving `embedder`."""
    computed = _reembedded(store, embedder, [c for c in changes if c.op == "upsert" and c.model_version != embedder.vector_space])
    from_files = [c for c in changes if c.op == "file"]
    if from_files:
        computed.update(_file_vectors(store, embedder, from_files, embeddings_dir / embedder.vector_space))

    def vectors_for(change: CatalogChangeRecord) -> ChangeVectors:
        if change.seq in computed:
            return computed[change.seq]
        image = KEEP if change.image_action == "keep" else change.image_vector
        return ChangeVectors(text=change.text_vector, image=image)

    # Filters take every change, metadata-only ones included, as the row is now.
    patched = filters.patched(store.filter_facts({c.row_id for c in changes}))
    return overlay.applied(changes, vectors_for), patched


def _reembedded(store: Store, embedder: Embedder, changes: list[CatalogChangeRecord]) -> dict[int, ChangeVectors]:
    """Vectors for API changes journaled by another model (made during a model swap): the product
    embedded as it is now. Later changes to the same product are replayed after it anyway."""
    if not changes:
        return {}
    products = store.products_by_row_ids({c.row_id for c in changes})
    out: dict[int, ChangeVectors] = {}
    for change in changes:
        product = products.get(change.row_id)
        if product is None:
            continue
        text = embedder.encode_texts([product_text(product, store.lexical.text_fields)])[0]
        image = KEEP if change.image_action == "keep" else _embed_image(embedder, product)
        out[change.seq] = ChangeVectors(text=text, image=image)
    log.info("re-embedded %d journaled changes made with another model", len(out))
    return out


def _file_vectors(
    store: Store, embedder: Embedder, changes: list[CatalogChangeRecord], cache_dir: Path
) -> dict[int, ChangeVectors]:
    """Vectors for content a catalog file changed after the serving version was built."""
    products = store.products_by_row_ids({c.row_id for c in changes})
    # Only content some build has embedded (its hash recorded on the product) is looked up.
    texts = [c for c in changes if c.text_hash and c.row_id in products
             and products[c.row_id].text_hash == c.text_hash]
    images = [c for c in changes if c.image_action == "set" and c.row_id in products
              and products[c.row_id].image_status in ("ok", "supplied") and products[c.row_id].image_hash]
    found: dict[tuple[str, int], np.ndarray | None] = {}
    if texts or images:
        cache = VectorCache(cache_dir, embedder.dim)
        text_vectors, text_hit = cache.get_many([f"text:{c.text_hash}" for c in texts])
        image_vectors, image_hit = cache.get_many([f"image:{products[c.row_id].image_hash}" for c in images])
        misses = [c for c, hit in zip(texts, text_hit) if not hit]
        fresh = embedder.encode_texts([product_text(products[c.row_id], store.lexical.text_fields) for c in misses]) if misses else []
        found.update({("text", c.seq): v for c, v, hit in zip(texts, text_vectors, text_hit) if hit})
        found.update({("text", c.seq): v for c, v in zip(misses, fresh)})
        for c, vector, hit in zip(images, image_vectors, image_hit):
            found[("image", c.seq)] = vector if hit else _embed_image(embedder, products[c.row_id])
        if misses or not image_hit.all():
            log.info("embedded %d texts and %d images a catalog file changed: %s's vector cache lacked them",
                     len(misses), int((~image_hit).sum()), embedder.name)
    out: dict[int, ChangeVectors] = {}
    for c in changes:
        product = products.get(c.row_id)
        if product is None:
            continue
        text = found.get(("text", c.seq), KEEP)
        if c.image_action == "clear" or product.image_status not in ("ok", "supplied", "pending"):
            image = None  # no image now, or one that failed to embed: never the old one's vector
        else:
            image = found.get(("image", c.seq), KEEP)
        out[c.seq] = ChangeVectors(text=text, image=image)
    return out


def _embed_image(embedder: Embedder, product: ProductRecord) -> np.ndarray | None:
    if product.image_status != "ok" or not product.image_uri:
        return None  # no image, one that failed, or a supplied vector (`--vectors`) this model has not got
    try:
        return embedder.encode_images([product.image_uri])[0]
    except Exception as exc:  # the product stays searchable by text
        log.warning("cannot re-embed the image of %s: %s", product.product_id, exc)
        return None
