"""store: SQL persistence for products, model and index versions, search log, events, training runs."""

from store.db import ConflictError, Store, StoreError, UnknownVersionError, migrate
from store.records import (
    CatalogChangeRecord,
    ImageState,
    IndexableProduct,
    IndexVersionRecord,
    ModelVersionRecord,
    ProductFilter,
    ProductInput,
    ProductRecord,
    ProductVectors,
)

__all__ = [
    "CatalogChangeRecord",
    "ConflictError",
    "ImageState",
    "IndexVersionRecord",
    "IndexableProduct",
    "ModelVersionRecord",
    "ProductFilter",
    "ProductInput",
    "ProductRecord",
    "ProductVectors",
    "Store",
    "StoreError",
    "UnknownVersionError",
    "migrate",
]
