"""Plain records that cross the store's boundary: callers never hold ORM objects or sessions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

import numpy as np


class SourcePreference(str, Enum):
    """Which change wins when a catalog file row meets a product edited over the API since the
    last file load: the newer one (file modification time against the edit's time), or always
    the file, or always the API edit."""

    NEWER = "newer"
    FILE = "file"
    API = "api"


@dataclass
class CatalogWrite:
    """What one chunk (or a whole load) of catalog-file rows did to the products table."""

    row_ids: dict[str, int] = field(default_factory=dict)  # product_id -> row_id, of rows written
    created: int = 0
    content_changed: int = 0  # title, description or image: the product needs new vectors
    metadata_changed: int = 0  # only price, category, brand, currency or attributes
    unchanged: int = 0
    api_edits_kept: list[str] = field(default_factory=list)  # product ids the file did not overwrite
    api_edits_overwritten: list[str] = field(default_factory=list)

    def add(self, other: "CatalogWrite") -> None:
        self.row_ids.update(other.row_ids)
        self.created += other.created
        self.content_changed += other.content_changed
        self.metadata_changed += other.metadata_changed
        self.unchanged += other.unchanged
        self.api_edits_kept += other.api_edits_kept
        self.api_edits_overwritten += other.api_edits_overwritten


@dataclass(frozen=True)
class ProductInput:
    """One product as a catalog (or an API client) describes it."""

    product_id: str
    title: str
    description: str | None = None
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    currency: str | None = None
    image_ref: str | None = None
    image_uri: str | None = None
    attributes: dict = field(default_factory=dict)
    stock: int | None = None  # units on hand; None = unknown
    # False when a catalog row has no stock field at all: a feed that does not carry stock says
    # nothing about it, and the stock an inventory system PATCHed stays (a null stock clears it).
    stock_listed: bool = True
    # The images after the first, as (reference as written, resolved path or URL): `product_images`.
    extra_images: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ProductImageRecord:
    """One of a product's images after the first (`product_images`)."""

    image_id: int
    row_id: int
    position: int
    image_ref: str | None
    image_uri: str | None
    image_hash: str | None
    image_status: str
    image_error: str | None = None
    vector_space: str | None = None  # set for API uploads, with the vector they were embedded to
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class ProductRecord:
    row_id: int
    product_id: str
    title: str
    description: str | None
    category: str | None
    brand: str | None
    price: float | None
    currency: str | None
    image_ref: str | None
    image_uri: str | None
    image_hash: str | None
    text_hash: str | None
    image_status: str
    image_error: str | None
    attributes: dict
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    changed_by: str = "file"  # who wrote the current content: "file" or "api"
    stock: int | None = None  # units on hand; None = unknown


@dataclass(frozen=True)
class ImageState:
    """What the indexer learned about one product's image while embedding it."""

    row_id: int
    image_hash: str | None
    image_status: str
    image_error: str | None = None


@dataclass(frozen=True)
class ModelVersionRecord:
    model_version: str
    spec: str
    dim: int
    parent: str | None
    info: dict
    created_at: datetime


@dataclass(frozen=True)
class IndexVersionRecord:
    index_version: str
    model_version: str
    path: str
    manifest: dict
    is_active: bool
    created_at: datetime
    activated_at: datetime | None


def filter_key(value: str) -> str:
    """What a category or brand filter compares: "Shoes", "shoes" and " SHOES " are one value
    (shops and feeds spell them inconsistently; a filter that silently matched nothing for a
    different case was the worse failure)."""
    return value.strip().casefold()


def attribute_key(value) -> str | None:
    """What an attribute filter compares for one scalar attribute value (None: not filterable).
    Strings as `filter_key`; numbers by value, so 42, 42.0 and "42" are one value (CSV catalogs
    carry every extra column as text); booleans as "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, str):
        number = attribute_number(value)
        return filter_key(value) if number is None else attribute_key(number)
    return None


def attribute_number(value) -> float | None:
    """The number an attribute range filter compares: a JSON number, or text that is one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def attribute_keys(value) -> list[str]:
    """The filter keys of one attribute value: a scalar's, or each scalar's of a list (sizes
    ["S", "M"] match either); nested objects and lists are not filterable."""
    if isinstance(value, list):
        return list(dict.fromkeys(k for k in map(attribute_key, value[:_MAX_LIST_VALUES]) if k is not None))
    key = attribute_key(value)
    return [] if key is None else [key]


_MAX_LIST_VALUES = 100  # values of one list attribute that filters see


@dataclass(frozen=True)
class AttributeCondition:
    """One attribute filter: the attribute holds one of `values` (keys as `attribute_key`), or,
    when `numeric`, a number within [low, high] (either end open when None)."""

    name: str
    values: tuple[str, ...] = ()
    numeric: bool = False
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class ProductFilter:
    """Metadata filters on live products: values within a field OR-ed, fields AND-ed.
    `in_stock`: True keeps products whose stock is above 0 or unknown; False keeps those known
    to have none."""

    categories: tuple[str, ...] = ()
    brands: tuple[str, ...] = ()
    price_min: float | None = None
    price_max: float | None = None
    attributes: tuple[AttributeCondition, ...] = ()
    in_stock: bool | None = None

    def is_empty(self) -> bool:
        return not (self.categories or self.brands or self.price_min is not None or self.price_max is not None
                    or self.attributes or self.in_stock is not None)


@dataclass(frozen=True)
class ProductFacts:
    """What metadata filters test, for some products, column by column (`prices`: NaN = none;
    `live`: False for a deleted or unknown row)."""

    rows: np.ndarray  # int64
    categories: list[str | None]
    brands: list[str | None]
    prices: np.ndarray  # float64
    live: np.ndarray  # bool
    stocks: np.ndarray | None = None  # float64, NaN = unknown (None: all unknown)
    attributes: list[dict] | None = None  # each row's attributes (None: none)


@dataclass(frozen=True)
class ProductVectors:
    """What an incremental upsert embedded; journaled with the product change.

    `image_action`: "set" (a new image, `image_vector` holds it), "clear" (no usable image; the
    product is searchable by text only) or "keep" (the image the product already has stays).
    """

    model_version: str
    text_hash: str
    text_vector: np.ndarray
    image_action: str
    image_hash: str | None = None
    image_vector: np.ndarray | None = None
    image_status: str | None = None  # for "clear": none | missing | broken | ...
    image_error: str | None = None
    # The product's images after the first, embedded: (image_ref, image_uri, hash, vector) each.
    # None: they stay as they are (only with image_action "keep"); (): the product has no others.
    extra_images: tuple[tuple[str, str, str, np.ndarray], ...] | None = None


@dataclass(frozen=True)
class CatalogChangeRecord:
    seq: int
    row_id: int
    product_id: str
    op: str  # upsert | file (content from a catalog file: no vectors) | meta (metadata only) | delete
    model_version: str | None
    text_hash: str | None
    text_vector: np.ndarray | None
    image_action: str | None
    image_hash: str | None
    image_vector: np.ndarray | None
    ts: datetime


@dataclass(frozen=True)
class EventInput:
    """One impression or click as a client reports it; validated by feedback before it gets here."""

    event_id: str
    type: str  # impression | click
    query_id: str
    product_id: str
    position: int
    ts: datetime


@dataclass(frozen=True)
class SearchContext:
    """What the search log knows about a query_id: enough to validate and mine its events."""

    query_id: str
    query_text: str | None
    image_hash: str | None
    query_product_id: str | None
    target: str
    offset: int
    result_ids: list
    model_version: str
    ts: datetime


@dataclass(frozen=True)
class LoggedEvent:
    """An event joined to its search: the unit pair mining reads."""

    event_id: str | None
    type: str
    query_id: str
    product_id: str
    position: int
    ts: datetime
    search: SearchContext


@dataclass(frozen=True)
class TrainingRunRecord:
    id: int
    started_at: datetime | None  # None while queued
    finished_at: datetime | None
    status: str  # queued | running | succeeded | skipped | failed
    serving_model_version: str | None
    candidate_model_version: str | None
    data_window: dict
    metrics: dict
    decision: str | None
    requested_at: datetime | None = None
    requested_by: str | None = None
    request_key: str | None = None
    worker: str | None = None
    serving_index_version: str | None = None


@dataclass(frozen=True)
class CanaryRecord:
    id: int
    status: str  # running | promoted | stopped | superseded
    candidate_model_version: str
    candidate_index_version: str
    serving_model_version: str
    serving_index_version: str
    fraction: float
    policy: dict
    started_by: str | None
    training_run_id: int | None
    started_at: datetime
    finished_at: datetime | None
    finished_by: str | None
    reason: str | None
    result: dict
    running_slot: int | None = None


@dataclass(frozen=True)
class CanarySearch:
    """One interleaved search of a canary: the arm of each served position, and the positions
    (1-based, as events give them) its impressions and clicks name."""

    query_id: str
    offset: int
    arms: list
    impressions: frozenset[int]
    clicks: frozenset[int]


# ---------------------------------------------------------------- text fields and the lexical index

DEFAULT_TEXT_FIELDS = ("title", "description")
# `Store.lexical_search` scores a product whose indexed text holds every query word at least this
# (in either database); typo-tolerant matches score below it.
LEXICAL_EVERY_WORD = 2.0
# ... at least this when the query is the first text field (its name) but for one edit in one
# word, and at least LEXICAL_NAME + 1 when it is the name word for word.
LEXICAL_NAME = 3.0
_PLAIN_TEXT_FIELDS = ("title", "description", "category", "brand")
MAX_TEXT_FIELDS = 16


def parse_field_list(spec: str | Sequence[str], *, what: str) -> tuple[str, ...]:
    """A comma-separated list (or a sequence) of names, stripped, empty parts dropped, order kept."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = tuple(dict.fromkeys(str(p).strip() for p in parts if str(p).strip()))
    if len(names) > MAX_TEXT_FIELDS:
        raise ValueError(f"{what}: at most {MAX_TEXT_FIELDS} names, got {len(names)}")
    return names


def parse_text_fields(spec: str | Sequence[str]) -> tuple[str, ...]:
    """PRISM_TEXT_FIELDS: catalog fields whose values, in this order, form a product's text.

    `title`, `description`, `category`, `brand`, or `attributes.NAME` for one attribute (e.g.
    `attributes.title_zh`). Raises ValueError naming what is wrong."""
    fields_ = parse_field_list(spec, what="text fields")
    if not fields_:
        raise ValueError("text fields: name at least one field, e.g. title,description")
    for name in fields_:
        if name in _PLAIN_TEXT_FIELDS:
            continue
        if name.startswith("attributes.") and name.removeprefix("attributes.").strip():
            continue
        raise ValueError(
            f"text fields: unknown field {name!r}; use {', '.join(_PLAIN_TEXT_FIELDS)} or attributes.NAME"
        )
    return fields_


def _field_value(p, name: str) -> str | None:
    if name.startswith("attributes."):
        value = (getattr(p, "attributes", None) or {}).get(name.removeprefix("attributes."))
    else:
        value = getattr(p, name, None)
    if value is None or isinstance(value, (dict, list, bool)):
        return None  # nested values are not text a shopper types
    # Not stripped: the default fields must compose exactly the text earlier builds embedded.
    text = str(value)
    return text if text.strip() else None


def text_field_values(p, text_fields: Sequence[str] = DEFAULT_TEXT_FIELDS) -> tuple[str | None, ...]:
    """The values a product's text is composed of (None where a field is empty)."""
    return tuple(_field_value(p, name) for name in text_fields)


def compose_text(p, text_fields: Sequence[str] = DEFAULT_TEXT_FIELDS) -> str:
    """The text a product is embedded by and lexically indexed by: the non-empty values of
    `text_fields`, in order, joined by ". ". With the default fields this is "title. description"
    (or the title alone), the text every earlier build embedded, so content keys stay the same."""
    values = [v for v in text_field_values(p, text_fields) if v]
    if not values and text_fields and text_fields[0] == "title":
        return getattr(p, "title", "") or ""
    return ". ".join(values)


def identifier_key(value) -> str | None:
    """What an exact identifier match compares: the value stripped and case-folded (SKUs are
    written "AB-12" and "ab-12" alike); None for an empty or non-scalar value."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    key = str(value).strip().casefold()
    return key[:256] or None


@dataclass(frozen=True)
class LexicalConfig:
    """What the lexical index holds per product: the text of `text_fields`, and the exact
    identifiers (its product_id and the values of `id_attributes`, e.g. gtin, sku)."""

    text_fields: tuple[str, ...] = DEFAULT_TEXT_FIELDS
    id_attributes: tuple[str, ...] = ()

    def identifiers(self, p) -> list[str]:
        keys = [identifier_key(p.product_id)]
        attributes = getattr(p, "attributes", None) or {}
        keys += [identifier_key(attributes.get(name)) for name in self.id_attributes]
        return list(dict.fromkeys(k for k in keys if k))

    def document(self, p) -> str:
        return compose_text(p, self.text_fields)

    def to_dict(self) -> dict:
        return {"text_fields": list(self.text_fields), "id_attributes": list(self.id_attributes)}

    @classmethod
    def from_dict(cls, data: dict | None) -> "LexicalConfig":
        """From an index manifest; one written before this existed used the defaults."""
        data = data or {}
        return cls(tuple(data.get("text_fields") or DEFAULT_TEXT_FIELDS), tuple(data.get("id_attributes") or ()))
