"""store: SQL persistence for products, model and index versions, search log, events, training runs."""

from store.db import ConflictError, Store, StoreError, UnknownVersionError, migrate
from store.records import (
    CatalogChangeRecord,
    EventInput,
    ImageState,
    IndexVersionRecord,
    LoggedEvent,
    ModelVersionRecord,
    ProductFacts,
    ProductFilter,
    ProductInput,
    ProductRecord,
    ProductVectors,
    SearchContext,
    TrainingRunRecord,
)

__all__ = [
    "CatalogChangeRecord",
    "EventInput",
    "ConflictError",
    "ImageState",
    "IndexVersionRecord",
    "LoggedEvent",
    "ModelVersionRecord",
    "ProductFacts",
    "ProductFilter",
    "ProductInput",
    "ProductRecord",
    "ProductVectors",
    "SearchContext",
    "Store",
    "StoreError",
    "TrainingRunRecord",
    "UnknownVersionError",
    "migrate",
]
