"""search: the query engine over the active index version plus the catalog changes since its build."""

from search.batcher import BatchConfig
from search.engine import (
    FACET_NAMES,
    MAX_FACET_VALUES,
    MAX_FACETS,
    MAX_K,
    MAX_OFFSET,
    MAX_QUERY_CHARS,
    MAX_RESULT_WINDOW,
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
    "FACET_NAMES",
    "MAX_FACET_VALUES",
    "MAX_FACETS",
    "BatchConfig",
    "MAX_K",
    "MAX_OFFSET",
    "MAX_QUERY_CHARS",
    "MAX_RESULT_WINDOW",
    "NotReadyError",
    "ProductNotFoundError",
    "QueryError",
    "SearchEngine",
    "SearchHit",
    "SearchQuery",
    "SearchResult",
    "Target",
]
