"""search: the query engine over the active index version."""

from search.engine import (
    MAX_K,
    MAX_OFFSET,
    MAX_QUERY_CHARS,
    NotReadyError,
    QueryError,
    SearchEngine,
    SearchHit,
    SearchResult,
    Target,
)

__all__ = [
    "MAX_K",
    "MAX_OFFSET",
    "MAX_QUERY_CHARS",
    "NotReadyError",
    "QueryError",
    "SearchEngine",
    "SearchHit",
    "SearchResult",
    "Target",
]
