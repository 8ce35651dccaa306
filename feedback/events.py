"""The search log: one row per served query, the anchor that impressions and clicks refer to."""

from __future__ import annotations

from search import SearchResult
from store import Store


def record_search(store: Store, result: SearchResult) -> None:
    """Write `result`'s search_log row; its query_id is valid for events once this returns."""
    q = result.query
    filters = {
        key: value
        for key, value in (
            ("category", list(q.filters.categories)),
            ("brand", list(q.filters.brands)),
            ("price_min", q.filters.price_min),
            ("price_max", q.filters.price_max),
        )
        if value not in (None, [])
    }
    store.log_search(
        query_id=result.query_id,
        query_text=q.text,
        image_hash=q.image_hash,
        query_product_id=q.similar_to,
        target=q.target.value,
        filters=filters,
        k=q.k,
        offset=q.offset,
        model_version=result.model_version,
        index_version=result.index_version,
        result_ids=[hit.product.product_id for hit in result.hits],
        took_ms=result.took_ms,
    )
