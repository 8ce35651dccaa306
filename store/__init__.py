"""store: SQL persistence for products, model and index versions, search log, events, training runs."""

from store.db import Store, StoreError, UnknownVersionError, migrate
from store.records import (
    ImageState,
    IndexableProduct,
    IndexVersionRecord,
    ModelVersionRecord,
    ProductFilter,
    ProductInput,
    ProductRecord,
)

__all__ = [
    "ImageState",
    "IndexVersionRecord",
    "IndexableProduct",
    "ModelVersionRecord",
    "ProductFilter",
    "ProductInput",
    "ProductRecord",
    "Store",
    "StoreError",
    "UnknownVersionError",
    "migrate",
]
