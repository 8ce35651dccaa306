"""Catalog routes: read one product, upsert or delete it incrementally, serve its image."""

from __future__ import annotations

import io
import re
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path as PathParam, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from api.routes.common import ADMIN_ERRORS, ERRORS, product_detail
from api.schemas import MAX_ID_CHARS, NoNul, ProductIn, ProductOut, ProductPatch, ProductUpserted
from api.services import AdminDep, ServicesDep
from embedder import ImageDecodeError, ImageLimits, content_hash, read_image_bytes
from indexer import MAX_IMAGES
from store import ProductInput

router = APIRouter(prefix="/v1", tags=["catalog"])

# No NUL: the id is looked up in the database, and PostgreSQL text cannot hold one (a 500 there).
ProductIdPath = Annotated[
    str, PathParam(min_length=1, max_length=MAX_ID_CHARS, description="the catalog's product id"), NoNul,
]

# Every format in embedder.ACCEPTED_IMAGE_FORMATS (Pillow's names, upper case).
_MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
                "TIFF": "image/tiff"}


# Registered before the product route: `{product_id:path}` lets ids contain "/" (e.g. "AB/123").
@router.get(
    "/products/{product_id:path}/image",
    responses={
        404: ERRORS[404], 422: ERRORS[422], 200: {"content": {"image/*": {}}, "description": "the product image"},
    },
    response_class=Response,
    summary="Product image",
)
def product_image(product_id: ProductIdPath, services: ServicesDep, request: Request) -> Response:
    """The image the product was indexed with. Only catalog images are reachable: the file comes
    from the product's record and is served only while its bytes still match the indexed hash."""
    product = services.store.get_product(product_id)
    if product is None:
        raise HTTPException(404, f"no product {product_id!r}")
    if product.image_status != "ok" or not product.image_hash or not product.image_uri:
        raise HTTPException(404, f"product {product_id!r} has no usable image")
    return _serve_image(product_id, product.image_hash, product.image_uri, services, request)


@router.get(
    "/products/{product_id:path}/images/{position}",
    responses={
        404: ERRORS[404], 422: ERRORS[422], 200: {"content": {"image/*": {}}, "description": "the product image"},
    },
    response_class=Response,
    summary="One of a product's images",
)
def product_image_at(product_id: ProductIdPath, position: Annotated[int, PathParam(ge=0, le=MAX_IMAGES - 1, description="0: the first image")],
                     services: ServicesDep, request: Request) -> Response:
    """The product's image at `position` of its catalog `images` (0: its first, as `/image`), as
    indexed: served only while its bytes still match the indexed hash. Search hits name the image
    that matched as `matched_image`."""
    if position == 0:
        return product_image(product_id, services, request)
    product = services.store.get_product(product_id)
    if product is None:
        raise HTTPException(404, f"no product {product_id!r}")
    image = next((im for im in services.store.product_images([product.row_id]).get(product.row_id, [])
                  if im.position == position), None)
    if image is None or image.image_status != "ok" or not image.image_hash or not image.image_uri:
        raise HTTPException(404, f"product {product_id!r} has no usable image at position {position}")
    return _serve_image(product_id, image.image_hash, image.image_uri, services, request)


def _serve_image(product_id: str, image_hash: str, uri: str, services, request: Request) -> Response:
    etag = f'"{image_hash}"'
    cache = {"ETag": etag, "Cache-Control": "public, max-age=86400"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=cache)
    if uri.lower().startswith(("http://", "https://")):
        local = services.settings.artifacts / "downloads" / content_hash(uri)
        if not local.is_file():
            return RedirectResponse(uri, status_code=307)
        uri = str(local)
    limits = ImageLimits(services.settings.max_image_bytes, services.settings.max_image_pixels)
    try:
        # Bounded, regular files only: the path may since have become a symlink to /dev/zero or a FIFO.
        data = read_image_bytes(uri, limits)
    except ImageDecodeError as exc:
        raise HTTPException(404, f"the image of {product_id!r} is no longer readable on disk ({exc.reason})") from None
    if content_hash(data) != image_hash:
        raise HTTPException(404, f"the image of {product_id!r} changed on disk since it was indexed")
    return Response(
        data,
        media_type=_media_type(data),
        headers={**cache, "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'"},
    )


def _check_new_id(product_id: str) -> None:
    if "\ufffd" in product_id:
        raise HTTPException(422, "product_id is not valid UTF-8 once percent-decoded")
    if product_id.endswith("/image"):
        # GET /v1/products/<id>/image is the image route of product <id>.
        raise HTTPException(422, "product_id must not end in '/image'")
    if re.search(r"/images/[0-9]+$", product_id):
        # GET /v1/products/<id>/images/<n> is the route of product <id>'s n-th image.
        raise HTTPException(422, "product_id must not end in '/images/<number>'")


def _media_type(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return _MEDIA_TYPES.get(img.format or "", "application/octet-stream")
    except Exception:
        return "application/octet-stream"


@router.get(
    "/products/{product_id:path}", response_model=ProductOut, responses={404: ERRORS[404], 422: ERRORS[422]},
    summary="One product",
)
def get_product(product_id: ProductIdPath, services: ServicesDep) -> dict:
    product = services.store.get_product(product_id)
    if product is None:
        raise HTTPException(404, f"no product {product_id!r}")
    return product_detail(services.store, product)


@router.put(
    "/products/{product_id:path}",
    response_model=ProductUpserted,
    status_code=200,
    responses={201: {"model": ProductUpserted, "description": "created"}, **ERRORS, **ADMIN_ERRORS},
    dependencies=[AdminDep],
    summary="Add or replace one product",
)
def put_product(product_id: ProductIdPath, body: ProductIn, services: ServicesDep) -> JSONResponse:
    """Embedded with the serving model and searchable on the next query, in every worker, without
    a rebuild. The next index build includes it like any catalog product. A change of price,
    currency, category, brand or attributes alone embeds nothing and shows at once as well.
    Needs the admin token."""
    _check_new_id(product_id)
    services.engine.sync()
    embedder = services.engine.serving.embedder
    item = ProductInput(
        product_id=product_id,
        title=body.title,
        description=body.description,
        category=body.category,
        brand=body.brand,
        price=body.price,
        currency=body.currency,
        attributes=body.attributes,
        stock=body.stock,
    )
    outcome = services.updater.upsert(item, embedder, image=body.image_b64, image_url=body.image_url,
                                      images=body.images_b64)
    services.metrics.catalog_changes.labels("meta" if outcome.metadata_only else "upsert").inc()
    services.engine.sync()
    payload = ProductUpserted(
        **product_detail(services.store, outcome.product),
        created=outcome.created,
        image_action=outcome.image_action,
        catalog_seq=outcome.seq,
    )
    return JSONResponse(payload.model_dump(mode="json"), status_code=201 if outcome.created else 200)


@router.patch(
    "/products/{product_id:path}",
    response_model=ProductUpserted,
    responses={**ERRORS, **ADMIN_ERRORS},
    dependencies=[AdminDep],
    summary="Change some fields of one product",
)
def patch_product(product_id: ProductIdPath, body: ProductPatch, services: ServicesDep) -> ProductUpserted:
    """Only the fields given change (`null` clears an optional one). Price, currency, stock,
    category, brand and attributes change without re-embedding; a new title, description or
    image is embedded with the serving model, as PUT does. Visible on the next query in every
    worker. 404 for an unknown (or deleted) product: PATCH creates nothing. Needs the admin token."""
    changes = body.changes()
    image, image_url = changes.pop("image_b64", None), changes.pop("image_url", None)
    images = changes.pop("images_b64", None)
    embedder = None
    if services.updater.patch_may_embed(changes, image=any(x is not None for x in (image, image_url, images))):
        services.engine.sync()
        embedder = services.engine.serving.embedder
    outcome = services.updater.patch(product_id, changes, embedder, image=image, image_url=image_url, images=images)
    if outcome is None:
        raise HTTPException(404, f"no product {product_id!r}")
    services.metrics.catalog_changes.labels("meta" if outcome.metadata_only else "upsert").inc()
    services.engine.catch_up(outcome.seq, outcome.product if outcome.metadata_only else None)
    return ProductUpserted(
        **product_detail(services.store, outcome.product), created=False, image_action=outcome.image_action, catalog_seq=outcome.seq,
    )


@router.delete(
    "/products/{product_id:path}",
    status_code=204,
    responses={404: ERRORS[404], **ADMIN_ERRORS},  # ADMIN_ERRORS has the 422
    dependencies=[AdminDep],
    summary="Delete one product",
)
def delete_product(product_id: ProductIdPath, services: ServicesDep) -> Response:
    """Gone from results at once (every worker checks the change journal per query). Needs the admin token."""
    if services.updater.delete(product_id) is None:
        raise HTTPException(404, f"no product {product_id!r}")
    services.metrics.catalog_changes.labels("delete").inc()
    services.engine.sync()
    return Response(status_code=204)
