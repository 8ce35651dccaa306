"""search: the query engine over the active index version plus the catalog changes since its build."""

from search.engine import (
    MAX_K,
    MAX_OFFSET,
    MAX_QUERY_CHARS,
    NotReadyError,
    ProductNotFoundError,
    QueryError,
    SearchEngine,
    SearchHit,
    SearchQuery,
    SearchResult,
    Target,
)

__all__ = [
    "MAX_K",
    "MAX_OFFSET",
    "MAX_QUERY_CHARS",
    "NotReadyError",
    "ProductNotFoundError",
    "QueryError",
    "SearchEngine",
    "SearchHit",
    "SearchQuery",
    "SearchResult",
    "Target",
]
