"""Helpers shared by routes: product JSON, image URLs, error response docs."""

from __future__ import annotations

from urllib.parse import quote

from api.schemas import AttributeRange, ErrorOut, Filters, ValidationErrorOut
from store import AttributeCondition, ProductFilter, ProductImageRecord, ProductRecord, attribute_key

ERRORS = {
    404: {"model": ErrorOut, "description": "unknown product"},
    413: {"model": ErrorOut, "description": "request body or image too large (bytes or pixels)"},
    415: {"model": ErrorOut, "description": "the upload is not an image"},
    422: {"model": ValidationErrorOut, "description": "invalid request: the detail names the field and the problem"},
    503: {"model": ErrorOut, "description": "no index version is serving yet"},
}

ADMIN_ERRORS = {
    401: {"model": ErrorOut, "description": "missing or wrong admin token"},
    403: {"model": ErrorOut, "description": "no admin token is configured on the server"},
    # Admin routes take path parameters that can fail validation; without this entry FastAPI
    # documents its default 422 body (`detail` as a list), which is not what errors.install answers.
    422: ERRORS[422],
}


def image_url(product: ProductRecord) -> str | None:
    """Root-relative URL of the product image route; `v` changes with the image, so caches stay right."""
    if product.image_status != "ok" or not product.image_hash:
        return None
    return f"/v1/products/{quote(product.product_id, safe='')}/image?v={product.image_hash[:16]}"


def image_position_url(product: ProductRecord, image: ProductImageRecord | None) -> str | None:
    """URL of one of the product's images (position 0: its first, the `image` route; position n:
    `/images/n`), or None when that image is not usable."""
    if image is None:
        return None
    if image.position == 0:
        return image_url(product)
    if image.image_status != "ok" or not image.image_hash:
        return None
    return f"/v1/products/{quote(product.product_id, safe='')}/images/{image.position}?v={image.image_hash[:16]}"


def all_image_urls(product: ProductRecord, others: list[ProductImageRecord]) -> list[str]:
    """URLs of the product's usable images, its first image first."""
    urls = [image_url(product)] + [image_position_url(product, im) for im in others]
    return [u for u in urls if u is not None]


def product_detail(store, product: ProductRecord) -> dict:
    """GET /v1/products/{id}'s answer (and `prism products get`'s): the product with all its images."""
    others = store.product_images([product.row_id]).get(product.row_id, [])
    return {**product_out(product), "images": all_image_urls(product, others)}


def public_attributes(attributes: dict) -> dict:
    # Keys starting with "_" are Prism's own bookkeeping (e.g. why an image was rejected).
    return {k: v for k, v in attributes.items() if not k.startswith("_")}


def catalog_fields(product: ProductRecord) -> dict:
    """What a client sees of a product, in search hits and product responses alike."""
    return {
        "product_id": product.product_id,
        "title": product.title,
        "description": product.description,
        "category": product.category,
        "brand": product.brand,
        "price": product.price,
        "currency": product.currency,
        "stock": product.stock,
        "attributes": public_attributes(product.attributes),
        "image_url": image_url(product),
    }


def product_out(product: ProductRecord) -> dict:
    return {
        **catalog_fields(product),
        "image_status": product.image_status,
        "created_at": product.created_at,
        "updated_at": product.updated_at,
    }


def to_filter(filters: Filters) -> ProductFilter:
    return ProductFilter(
        categories=tuple(filters.category),
        brands=tuple(filters.brand),
        price_min=filters.price_min,
        price_max=filters.price_max,
        attributes=tuple(_condition(name, wanted) for name, wanted in sorted(filters.attributes.items())),
        in_stock=filters.in_stock,
    )


def _condition(name: str, wanted) -> AttributeCondition:
    if isinstance(wanted, AttributeRange):
        return AttributeCondition(name, numeric=True, low=wanted.min, high=wanted.max)
    # Sorted keys: one filter, however its values are ordered, is one cache entry in FilterIndex.
    return AttributeCondition(name, values=tuple(sorted({k for k in map(attribute_key, wanted) if k is not None})))

