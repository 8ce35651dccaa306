"""Typed request and response models of the v1 HTTP contract (docs/design.md, "HTTP contract")."""

from __future__ import annotations

import base64
import binascii
import json
import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from embedder import ACCEPTED_IMAGE_FORMATS_TEXT
from indexer import MAX_IMAGES
from search import FACET_NAMES, MAX_FACET_VALUES, MAX_FACETS, MAX_K, MAX_OFFSET, MAX_QUERY_CHARS, MAX_RESULT_WINDOW, Target

MAX_ID_CHARS = 256
MAX_FILTER_VALUES = 100
MAX_ATTRIBUTES_BYTES = 16_384
MAX_ATTRIBUTE_FILTERS = 16  # attribute names one filter may test
MAX_STOCK = 2**31 - 1


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and no legitimate catalog string contains one.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _text(min_length: int, max_length: int, *extra):
    # Length constraints before the custom checks, so pydantic reports them as string lengths.
    return Annotated[str, Field(min_length=min_length, max_length=max_length), AfterValidator(_no_nul), *extra]


# The engine refuses offset + k beyond MAX_RESULT_WINDOW (one check, shared with the CLI); the
# field bounds below only catch values that are wrong on their own.
K_DESCRIPTION = f"results to return (offset + k may be at most {MAX_RESULT_WINDOW})"
OFFSET_DESCRIPTION = (
    f"results to skip (paging); offset + k may be at most {MAX_RESULT_WINDOW}, "
    "beyond that the answer is a 422: refine the query instead"
)

FilterValues = Annotated[
    list[_text(1, MAX_ID_CHARS)],
    BeforeValidator(_as_list),
    Field(max_length=MAX_FILTER_VALUES),
]


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads true/false as 1/0; a boolean where a number belongs is a client bug.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


NotBool = BeforeValidator(_not_bool)
NoNul = AfterValidator(_no_nul)
Int = Annotated[int, NotBool]
Price = Annotated[float, NotBool, Field(ge=0, allow_inf_nan=False)]
Stock = Annotated[int, NotBool, Field(ge=0, le=MAX_STOCK, description="units on hand (null or absent: unknown)")]


def _decode_b64(data: str) -> bytes:
    """Strict base64 (a data: URL prefix is accepted) to the image bytes."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if not decoded:
        raise ValueError("decodes to 0 bytes")
    return decoded


# Arrives as a base64 string (the OpenAPI type), reaches the route as bytes.
Base64Image = Annotated[str, AfterValidator(_decode_b64)]
# All of a product's images, the first one first: capped like the catalog's `images` column.
ImageList = Annotated[list[Base64Image], Field(min_length=1, max_length=MAX_IMAGES)]
IMAGES_B64_DESCRIPTION = (f"all the product's images, base64-encoded, its first image first (at most {MAX_IMAGES}; "
                          "each one is embedded and searchable, and a hit names the one that matched)")
QueryText = _text(1, MAX_QUERY_CHARS, AfterValidator(_not_blank))
ProductId = _text(1, MAX_ID_CHARS)
# The catalog fields a PUT sets and a PATCH changes, typed once for both.
ProductTitle = _text(1, 1000, AfterValidator(_not_blank))
ProductDescription = _text(0, 20_000)
ProductLabel = _text(1, MAX_ID_CHARS)  # category, brand
Currency = Annotated[
    str, Field(pattern=r"^[A-Za-z]{3}$", description="3-letter code, e.g. EUR"), AfterValidator(str.upper)
]


AttributeScalar = str | int | float | bool


class AttributeRange(BaseModel):
    """A numeric attribute within [min, max] (either may be left out)."""

    model_config = ConfigDict(extra="forbid")

    min: Annotated[float, NotBool, Field(allow_inf_nan=False)] | None = None
    max: Annotated[float, NotBool, Field(allow_inf_nan=False)] | None = None


def _attribute_value(name: str, value: Any) -> Any:
    if isinstance(value, (bool, int, float)):
        # Python's JSON parser reads NaN and Infinity, which no attribute can equal.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: values must be finite numbers")
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{name}: values must not be empty")
        if len(value) > MAX_ID_CHARS:
            raise ValueError(f"{name}: values are at most {MAX_ID_CHARS} characters")
        _no_nul(value)
        return value
    raise ValueError(f"{name}: values must be strings, numbers or booleans, not {type(value).__name__} "
                     "(nested objects and lists are not filterable)")


def _attribute_filters(value: Any) -> Any:
    """`{name: [values]}` or `{name: {"min": x, "max": y}}`, checked here so that every mistake
    names the attribute (a union's own errors would list each alternative)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("must be an object: attribute name -> list of values, or {\"min\": x, \"max\": y}")
    if len(value) > MAX_ATTRIBUTE_FILTERS:
        raise ValueError(f"{len(value)} attributes; a filter may test at most {MAX_ATTRIBUTE_FILTERS}")
    out: dict[str, Any] = {}
    for name, wanted in value.items():
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_ID_CHARS:
            raise ValueError(f"attribute names are 1 to {MAX_ID_CHARS} characters")
        _no_nul(name)
        if name.startswith("_"):
            raise ValueError(f"{name}: names starting with '_' are Prism's own, not filterable")
        if isinstance(wanted, dict):
            unknown = sorted(set(wanted) - {"min", "max"})
            if unknown or not wanted:
                raise ValueError(f"{name}: an object filter is a range, {{\"min\": x, \"max\": y}}"
                                 + (f"; unknown key(s) {', '.join(map(repr, unknown))} (nested attributes are not filterable)"
                                    if unknown else ""))
            try:
                bounds = AttributeRange.model_validate(wanted)
            except ValueError as exc:
                raise ValueError(f"{name}: min and max must be finite numbers ({exc.errors()[0]['msg']})") from None
            if bounds.min is not None and bounds.max is not None and bounds.min > bounds.max:
                raise ValueError(f"{name}: min ({bounds.min}) is above max ({bounds.max})")
            out[name] = bounds
            continue
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values:
            raise ValueError(f"{name}: give at least one value")
        if len(values) > MAX_FILTER_VALUES:
            raise ValueError(f"{name}: {len(values)} values; the limit is {MAX_FILTER_VALUES}")
        out[name] = [_attribute_value(name, v) for v in values]
    return out


AttributeFilters = Annotated[
    dict[str, list[AttributeScalar] | AttributeRange],
    BeforeValidator(_attribute_filters),
]


def split_facets(value: Any) -> Any:
    """GET and upload-form spelling: one comma-separated value."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _known_facets(names: list[str]) -> list[str]:
    for name in names:
        if name not in FACET_NAMES and not (name.startswith("attributes.") and len(name) > len("attributes.")):
            raise ValueError(f"unknown facet {name!r}: use {', '.join(FACET_NAMES)} or attributes.NAME")
    return list(dict.fromkeys(names))


FacetNames = Annotated[
    list[_text(1, MAX_ID_CHARS + len("attributes."))],
    Field(max_length=MAX_FACETS),
    AfterValidator(_known_facets),
]
FACETS_DESCRIPTION = (
    f"count the values of these fields over every product the filters match (not just this page): "
    f"{', '.join(FACET_NAMES)} or attributes.NAME; at most {MAX_FACETS} names, and the {MAX_FACET_VALUES} "
    "most frequent values of each"
)


class Filters(BaseModel):
    """Metadata filters; values within a field are OR-ed, fields are AND-ed."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"category": ["shoes"], "price_max": 100},
        {"attributes": {"color": ["red", "blue"], "size": {"min": 40, "max": 44}}, "in_stock": True},
    ]})

    category: FilterValues = Field(default_factory=list, description="only these categories (one or a list)")
    brand: FilterValues = Field(default_factory=list, description="only these brands (one or a list)")
    price_min: Price | None = None
    price_max: Price | None = None
    attributes: AttributeFilters = Field(default_factory=dict, description=(
        "attribute name -> accepted values (a product's value, or any value of a list, is one of them; text "
        "compares case-insensitively, numbers by value) or {\"min\": x, \"max\": y} for numbers. "
        f"At most {MAX_ATTRIBUTE_FILTERS} names; a name no product has matches nothing. In GET and the "
        "upload form: attr.NAME=VALUE, repeatable"))
    # Strict: a JSON 0 or 1 is not a yes or no (pydantic would read it as one).
    in_stock: StrictBool | None = Field(None, description=(
        "true: leave out products known to be out of stock (stock 0); unknown stock is kept. "
        "false: only products known to be out of stock"))

    @model_validator(mode="after")
    def _price_range(self) -> "Filters":
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError(f"price_min ({self.price_min}) is above price_max ({self.price_max})")
        return self


ATTRIBUTE_PARAM = "attr."  # GET and upload-form spelling of an attribute filter: attr.NAME=VALUE


def attribute_params(data: dict) -> dict:
    """`attr.NAME=VALUE` fields (repeatable) folded into `attributes`, as POST spells them."""
    found = {k: v for k, v in data.items() if isinstance(k, str) and k.startswith(ATTRIBUTE_PARAM)}
    if not found:
        return data
    rest = {k: v for k, v in data.items() if k not in found}
    attributes: dict[str, list] = {}
    for key, value in found.items():
        attributes.setdefault(key[len(ATTRIBUTE_PARAM):], []).extend(value if isinstance(value, list) else [value])
    return {**rest, "attributes": attributes}


SESSION_DESCRIPTION = (
    "optional: the page's opaque id of a shopper's visit (letters, digits, `_.:-`; not stored). A running "
    "canary interleaves all of a visit's searches or none, and every page of one query alike; without it "
    "each search is drawn on its own")
Session = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class SearchParams(Filters):
    """`GET /v1/search` query parameters. Unknown parameters are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _attr_params(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "attributes" in data:
                raise ValueError("attributes: spell attribute filters attr.NAME=VALUE in a query string")
            data = attribute_params(data)
            if "facets" in data:
                data = {**data, "facets": split_facets(data["facets"])}
        return data

    facets: FacetNames | None = Field(None, description=FACETS_DESCRIPTION + " (comma-separated)")
    # A query string carries text: true/false (also 1/0, yes/no) are read as booleans here, where
    # a JSON body's Filters.in_stock takes only true or false.
    in_stock: bool | None = Field(None, description=Filters.model_fields["in_stock"].description)

    q: QueryText = Field(
        description="the text query; a product_id or an identifier attribute's value (PRISM_ID_ATTRIBUTES, "
        "e.g. a gtin) returns that product first for every target",
        examples=["red running shoes", "4006381333931"],
    )
    target: Target = Field(
        Target.IMAGE,
        description="which index to search: image, text or hybrid (image and text vectors fused with the "
        "database's full-text search, typo-tolerant)",
    )
    k: Int = Field(10, ge=1, le=MAX_K, description=K_DESCRIPTION)
    offset: Int = Field(0, ge=0, le=MAX_OFFSET, description=OFFSET_DESCRIPTION)
    session: Session | None = Field(None, description=SESSION_DESCRIPTION)


class SearchRequest(BaseModel):
    """`POST /v1/search`: exactly one of `text`, `image_b64` or `similar_to`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "red running shoes", "target": "image", "k": 10, "filters": {"price_max": 120}},
                {"text": "runing shoe", "target": "hybrid", "k": 10},
                {"text": "SKU-00042-A", "target": "image", "k": 5},
                {"image_b64": "iVBORw0KGgo...", "target": "text", "k": 5},
                {"similar_to": "P00042", "target": "image", "k": 12},
                {"text": "sneaker", "filters": {"attributes": {"color": ["red"]}, "in_stock": True},
                 "facets": ["category", "brand", "attributes.color", "in_stock"]},
            ]
        },
    )

    text: QueryText | None = None
    image_b64: Base64Image | None = Field(None, description=f"a base64-encoded image ({ACCEPTED_IMAGE_FORMATS_TEXT})")
    similar_to: ProductId | None = Field(None, description="a product id: find products like it")
    target: Target = Target.IMAGE
    k: Int = Field(10, ge=1, le=MAX_K, description=K_DESCRIPTION)
    offset: Int = Field(0, ge=0, le=MAX_OFFSET, description=OFFSET_DESCRIPTION)
    filters: Filters = Field(default_factory=Filters)
    facets: FacetNames = Field(default_factory=list, description=FACETS_DESCRIPTION)
    session: Session | None = Field(None, description=SESSION_DESCRIPTION)

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [name for name in ("text", "image_b64", "similar_to") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image_b64 or similar_to (got {', '.join(given) or 'none'})")
        return self


class SearchHitOut(BaseModel):
    product_id: str
    score: float = Field(description="cosine similarity; for hybrid, the weighted reciprocal-rank-fusion score")
    rank: int = Field(description="1-based position in the full ranking (offset included)")
    title: str
    image_url: str | None = Field(description="where the page can load the product image (null: none)")
    description: str | None = None
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    currency: str | None = None
    stock: int | None = Field(None, description="units on hand; null: unknown")
    attributes: dict[str, Any] = Field(default_factory=dict)
    scores: dict[str, float] = Field(
        default_factory=dict,
        description="per leg: image and text cosines, `lexical` (the full-text score: >= 4 the query is the "
        "product's name, >= 3 its name but for one typo, >= 2 every query word, < 1 a typo-tolerant match), "
        "`exact` (1: the query is its identifier)",
    )
    matched_image: str | None = Field(
        None,
        description="the URL of the product's image that matched (image-target and hybrid queries rank a product "
        "by its best-matching image; its first image is `image_url`, others are `/v1/products/ID/images/N`); "
        "null when no image leg ranked the product",
        examples=["/v1/products/P00042/images/2?v=5f2b9c0e1d3a4b6c"],
    )


class SearchResponse(BaseModel):
    query_id: str = Field(description="refer to this query in impression and click events")
    model_version: str
    index_version: str
    took_ms: float
    target: Target
    query_kind: str = Field(description="text, image or product")
    k: int
    offset: int
    results: list[SearchHitOut]
    timings_ms: dict[str, float] = Field(default_factory=dict)
    facets: dict[str, dict[str, int]] | None = Field(None, description=(
        "when asked for: {facet: {value: count}} over every product the filters match, most frequent first "
        f"(at most {MAX_FACET_VALUES} values a facet)"),
        examples=[{"category": {"shoes": 120, "bags": 14}, "attributes.color": {"red": 40}, "in_stock": {"true": 98}}])


class ProductIn(BaseModel):
    """`PUT /v1/products/{product_id}`. With neither `image_b64` nor `image_url`, an existing
    product keeps its image and a new one is searchable by text only."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "title": "Trail running shoe",
                    "description": "Lightweight, waterproof, size 42",
                    "category": "shoes",
                    "brand": "Acme",
                    "price": 89.9,
                    "currency": "EUR",
                    "stock": 12,
                    "attributes": {"colour": "red"},
                    "image_b64": "iVBORw0KGgo...",
                }
            ]
        },
    )

    title: ProductTitle
    description: ProductDescription | None = None
    category: ProductLabel | None = None
    brand: ProductLabel | None = None
    price: Price | None = None
    currency: Currency | None = None
    stock: Stock | None = None
    attributes: dict[str, Any] = Field(default_factory=dict, description="free-form JSON object (<= 16 KiB)")
    image_b64: Base64Image | None = Field(None, description="the product image, base64-encoded")
    image_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = Field(
        None, description="an http(s) image URL (only when the server allows URL images)"
    )
    images_b64: ImageList | None = Field(None, description=IMAGES_B64_DESCRIPTION, examples=[["iVBORw0KGgo...", "/9j/4AAQ..."]])

    @model_validator(mode="after")
    def _check(self) -> "ProductIn":
        if sum(x is not None for x in (self.image_b64, self.image_url, self.images_b64)) > 1:
            raise ValueError("give one of image_b64, image_url or images_b64")
        _check_attributes(self.attributes)
        return self


def _check_attributes(attributes: dict) -> None:
    try:
        encoded = json.dumps(attributes, allow_nan=False)
    except ValueError:
        raise ValueError("attributes must not hold NaN or infinite numbers") from None
    except RecursionError:
        raise ValueError("attributes are nested too deeply") from None
    try:
        json.dumps(attributes, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows "\ud800"; no database can store a lone surrogate.
        raise ValueError("attributes must be valid Unicode text (no lone surrogates such as \\ud800)") from None
    if len(encoded.encode()) > MAX_ATTRIBUTES_BYTES:
        raise ValueError(f"attributes are {len(encoded)} bytes as JSON; the limit is {MAX_ATTRIBUTES_BYTES}")
    if "\x00" in encoded or "\\u0000" in encoded:
        raise ValueError("attributes must not contain NUL characters")


PATCH_METADATA = ("category", "brand", "price", "currency", "stock", "attributes")
PATCH_CONTENT = ("title", "description", "image_b64", "image_url", "images_b64")


class ProductPatch(BaseModel):
    """`PATCH /v1/products/{product_id}`: only the fields given change; `null` clears an optional
    one. Price, currency, stock, category, brand and attributes change without re-embedding;
    title, description or an image re-embed the product like PUT. `attributes` replaces the whole
    object (send the product's attributes with the change)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"price": 79.5}, {"stock": 0}, {"attributes": {"colour": "blue"}, "price": 12}]},
    )

    title: ProductTitle | None = None
    description: ProductDescription | None = None
    category: ProductLabel | None = None
    brand: ProductLabel | None = None
    price: Price | None = None
    currency: Currency | None = None
    stock: Stock | None = None
    attributes: dict[str, Any] | None = Field(None, description="replaces the attributes (<= 16 KiB as JSON)")
    image_b64: Base64Image | None = Field(None, description="a new product image, base64-encoded (re-embeds)")
    image_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = Field(
        None, description="a new http(s) image URL (only when the server allows URL images; re-embeds)")
    images_b64: ImageList | None = Field(None, description=IMAGES_B64_DESCRIPTION + " (re-embeds)")

    @model_validator(mode="after")
    def _check(self) -> "ProductPatch":
        given = self.model_fields_set
        if not given:
            raise ValueError(f"give at least one field to change: {', '.join((*PATCH_METADATA, *PATCH_CONTENT))}")
        for name in ("title", "attributes", "image_b64", "image_url", "images_b64"):
            if name in given and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null" + (" (send {} to clear attributes)" if name == "attributes" else ""))
        if sum(x is not None for x in (self.image_b64, self.image_url, self.images_b64)) > 1:
            raise ValueError("give one of image_b64, image_url or images_b64")
        if self.attributes is not None:
            _check_attributes(self.attributes)
        return self

    def changes(self) -> dict[str, Any]:
        """The fields given, by name."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class ProductOut(BaseModel):
    product_id: str
    title: str
    description: str | None
    category: str | None
    brand: str | None
    price: float | None
    currency: str | None
    stock: int | None = Field(None, description="units on hand; null: unknown")
    attributes: dict[str, Any]
    image_url: str | None
    image_status: str = Field(description="ok, none, pending (not embedded yet), or why the image is unusable")
    created_at: datetime
    updated_at: datetime
    images: list[str] = Field(
        default_factory=list,
        description="URLs of all the product's usable images, its first (`image_url`) first",
        examples=[["/v1/products/P00042/image?v=5f2b9c0e1d3a4b6c", "/v1/products/P00042/images/1?v=0a1b2c3d4e5f6a7b"]],
    )


class ProductUpserted(ProductOut):
    created: bool
    image_action: str = Field(description="set (new image embedded), keep (unchanged) or clear (text only)")
    catalog_seq: int = Field(description="position of this change in the catalog change journal")


class ModelVersionOut(BaseModel):
    model_version: str
    spec: str
    dim: int
    parent: str | None
    created_at: datetime
    serving: bool = Field(description="this replica serves this model version")


class IndexVersionOut(BaseModel):
    index_version: str
    model_version: str
    active: bool
    created_at: datetime
    activated_at: datetime | None
    counts: dict[str, int]
    catalog_seq: int
    serving: bool = Field(False, description="this replica serves this index version (the active one, once loaded)")
    precision: str = Field("fp32", description="encoder precision the version's vectors were made at (fp32, bf16, "
                           "int8); queries to it are encoded at the same one")


class QueryCacheOut(BaseModel):
    """This replica's query-vector cache (per process; `prism serve --workers N` has N)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "enabled": True, "max_entries": 10000, "max_bytes": 67108864, "entries": 412, "bytes": 631000,
        "hits": {"text": 1830, "image": 12}, "misses": {"text": 412, "image": 3}, "evictions": 0,
    }]})

    enabled: bool
    max_entries: int = Field(description="PRISM_QUERY_CACHE_ENTRIES; 0 disables the cache")
    max_bytes: int = Field(description="PRISM_QUERY_CACHE_BYTES; 0 disables the cache")
    entries: int
    bytes: int = Field(description="vectors, keys and bookkeeping held now")
    hits: dict[str, int] = Field(description="lookups answered from the cache, by query kind (text, image)")
    misses: dict[str, int] = Field(description="lookups that encoded the query, by query kind")
    evictions: int = Field(description="entries dropped to stay within the bounds")


class CanaryStart(BaseModel):
    """Start an interleaved canary of a model or index version."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"fraction": 0.1}]})

    fraction: Annotated[float, NotBool] = Field(
        gt=0, le=1, description="share of searches that get the interleaved ranking, in (0, 1]")


class CanaryArmOut(BaseModel):
    impressions: int = Field(description="impression events on positions this arm contributed")
    clicks: int = Field(description="click events credited to this arm")
    wins: int = Field(description="interleaved searches in which this arm got more clicks than the other")


class CanaryOut(BaseModel):
    """A canary: what it compares, its state, and the live evidence so far."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 3, "status": "running", "candidate_model_version": "ft-20261130-030000-12",
        "candidate_index_version": "20261130-031502-114211", "serving_model_version": "demo",
        "serving_index_version": "20261124-101500-000001", "fraction": 0.1,
        "policy": {"min_queries": 200, "max_queries": 5000, "alpha": 0.05}, "started_by": "retrain",
        "training_run_id": 12, "started_at": "2026-11-30T03:15:09Z", "finished_at": None, "finished_by": None,
        "reason": None, "searches": 1840, "serving": {"impressions": 9120, "clicks": 301, "wins": 118},
        "candidate": {"impressions": 9080, "clicks": 377, "wins": 171}, "ties": 22, "decided": 289,
        "p_value": 0.0022, "decision": "candidate won 171, serving 118 of 289 ...", "loaded": True,
    }]})

    id: int
    status: Literal["running", "promoted", "stopped", "superseded"]
    candidate_model_version: str
    candidate_index_version: str
    serving_model_version: str
    serving_index_version: str = Field(description="the version the candidate is compared with, and promoted over")
    fraction: float
    policy: dict[str, Any] = Field(description="its decision rule: min_queries, max_queries, alpha")
    started_by: str | None = Field(None, description="cli | http | retrain")
    training_run_id: int | None = Field(None, description="the training_runs row that logged its start")
    started_at: datetime
    finished_at: datetime | None = None
    finished_by: str | None = Field(None, description="cli | http | review (the decision rule)")
    reason: str | None = Field(None, description="why it ended")
    searches: int = Field(description="interleaved searches logged")
    serving: CanaryArmOut
    candidate: CanaryArmOut
    ties: int = Field(description="searches with clicks, as many for each arm")
    decided: int = Field(description="searches with a winner")
    p_value: float = Field(description="two-sided sign test of candidate wins against serving wins")
    decision: str | None = Field(None, description="where the decision rule stands (running), or what it decided")
    loaded: bool | None = Field(None, description="this server has the candidate loaded and interleaves (running)")


class ModelsResponse(BaseModel):
    models: list[ModelVersionOut]
    indexes: list[IndexVersionOut]
    loading_index_version: str | None = Field(
        None, description="a newly activated version this replica is loading in the background")
    encoder_precision: str | None = Field(
        None, description="precision this replica encodes queries at (the serving index's, or fp32 where that "
        "cannot run here); null while nothing serves")
    query_cache: QueryCacheOut | None = Field(None, description="this replica's query-vector cache")
    canary: CanaryOut | None = Field(
        None, description="the running interleaved canary, else the latest one to end; null if there never was one")


class FacetValue(BaseModel):
    value: str
    count: int


class FacetsResponse(BaseModel):
    categories: list[FacetValue]
    brands: list[FacetValue]
    price_min: float | None
    price_max: float | None
    products: int
    attributes: list[str] = Field(default_factory=list, description=(
        "filterable attribute names, most common first (what `attributes.NAME` facets and filters take)"))
    credits: str | None = Field(None, description="licence attribution the catalog's images require (the demo: OpenMoji, CC BY-SA 4.0)")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    index_version: str | None = Field(None, description="the index version this replica serves")
    model_version: str | None = None
    loading_index_version: str | None = Field(
        None, description="a newly activated version this replica is loading; it switches once loaded")
    vectors: dict[str, int] = Field(default_factory=dict)
    overlay_vectors: dict[str, int] = Field(default_factory=dict)
    catalog_seq: int | None = None


MAX_EVENTS_PER_BATCH = 1000


class EventIn(BaseModel):
    """One impression (a result was shown) or click (a result was opened)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "event_id": "3f2b7c9e-0c1e-4a7a-9d7e-1b2c3d4e5f60", "type": "click", "query_id": "9c1d...",
            "product_id": "1F34E", "position": 3, "ts": "2026-11-23T18:30:00Z",
        }]},
    )

    event_id: _text(1, 128) = Field(description="client-made unique id: a retried event is stored once")
    type: Literal["impression", "click"]
    query_id: _text(1, 64) = Field(description="the query_id of the search that served the product")
    product_id: ProductId
    position: Int = Field(ge=1, le=MAX_RESULT_WINDOW, description="the 1-based rank the product was served at")
    ts: AwareDatetime = Field(description="when it happened, with a time zone (ISO 8601)")


EventBatch = Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS_PER_BATCH)]


class EventsStored(BaseModel):
    stored: int = Field(description="events newly stored")
    duplicates: int = Field(description="events whose event_id was already stored (retries), not stored again")


class EventProblem(BaseModel):
    index: int = Field(description="position of the event in the batch (0-based)")
    event_id: str
    error: str


class EventsRejected(BaseModel):
    """422 of `POST /v1/events`: `problems` when events were checked against the search log,
    `errors` when the batch did not even parse (wrong types, missing fields)."""

    detail: str
    problems: list[EventProblem] | None = Field(None, description="one entry per invalid event")
    errors: list[dict[str, Any]] | None = Field(None, description="one entry per invalid field: type, loc, msg")


class ActivatedOut(BaseModel):
    index_version: str
    model_version: str
    activated_at: datetime | None
    serving: bool = Field(description="this server already answers from it (others swap on their next query)")


class TrainingRunOut(BaseModel):
    id: int
    status: str = Field(description="queued | running | succeeded | skipped | failed")
    decision: str | None = Field(
        description="promoted | canary (ended in a canary) | canary-stopped | rejected | superseded (another "
        "version was activated during the run or the canary) | none")
    serving_model_version: str | None
    serving_index_version: str | None = Field(None, description="the index version the run started from")
    candidate_model_version: str | None
    requested_at: datetime | None = None
    requested_by: str | None = Field(None, description="http | nightly | cli")
    worker: str | None = Field(None, description="host:pid of the process that ran it")
    started_at: datetime | None = Field(description="when a worker took it; null while queued")
    finished_at: datetime | None
    data_window: dict[str, Any]
    metrics: dict[str, Any]


class RetrainStatus(BaseModel):
    running: bool = Field(description="a run is under way (on any worker sharing the database)")
    queued: int = Field(0, description="runs waiting for a `prism worker`")
    runs: list[TrainingRunOut] = Field(description="the latest runs, newest first")


class RetrainQueued(BaseModel):
    status: Literal["queued"] = "queued"
    run_id: int = Field(description="the queued run: follow it with GET /v1/retrain")
    detail: str


class ErrorOut(BaseModel):
    detail: str = Field(description="what was wrong with the request")


class ValidationErrorOut(ErrorOut):
    # Only request validation fills `errors`; a 422 raised by a route (a query the engine refuses,
    # an unusable image) has the `detail` sentence alone.
    errors: list[dict[str, Any]] | None = Field(
        None, description="when the request failed validation: one entry per problem: type, loc (where), msg"
    )
