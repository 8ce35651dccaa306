"""Search routes: text by GET, any query by JSON POST, image upload by multipart POST."""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from api.routes.common import ERRORS, catalog_fields, image_position_url, to_filter
from api.schemas import (
    ATTRIBUTE_PARAM,
    K_DESCRIPTION,
    OFFSET_DESCRIPTION,
    SESSION_DESCRIPTION,
    FacetNames,
    Filters,
    SearchParams,
    SearchRequest,
    SearchResponse,
    Session,
    attribute_params,
    split_facets,
)
from api.services import Services, ServicesDep
from embedder import ImageDecodeError
from feedback import SearchLogWriter, record_search
from search import MAX_K, MAX_OFFSET, SearchResult, Target
from store import Store

router = APIRouter(prefix="/v1", tags=["search"])

SINGLE_QUERY_PARAMS = ("q", "target", "k", "offset", "price_min", "price_max", "in_stock", "facets", "session")
UPLOAD_FIELDS = {"file", "target", "k", "offset", "category", "brand", "price_min", "price_max", "in_stock", "facets",
                 "session"}
SINGLE_FORM_FIELDS = UPLOAD_FIELDS - {"category", "brand"}


async def _single_valued(request: Request) -> None:
    # async (it never blocks): a plain `def` dependency would cost a thread-pool hop per search.
    # Starlette decodes percent-escapes that are not UTF-8 (`q=%FF`, a CESU-8 surrogate) into
    # U+FFFD and would search for that; the raw query string tells them apart from a real U+FFFD.
    for part in request.scope.get("query_string", b"").split(b"&"):
        name, _, value = part.partition(b"=")
        try:
            for piece in (name, value):
                unquote_to_bytes(piece.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            shown = unquote_to_bytes(name).decode("utf-8", "replace")
            raise HTTPException(422, f"query.{shown}: not valid UTF-8 once percent-decoded") from None
    # `q=a&q=b` would otherwise silently search for one of them.
    for name in SINGLE_QUERY_PARAMS:
        if len(request.query_params.getlist(name)) > 1:
            raise HTTPException(422, f"query.{name}: give it once, not {len(request.query_params.getlist(name))} times")


async def _known_form_fields(request: Request) -> None:
    # Multipart forms are not pydantic models here, so unknown fields would pass silently,
    # unlike everywhere else in the API. The form is already parsed and cached by then.
    form = await request.form()
    request.scope["prism.form"] = form
    unknown = sorted(k for k in set(form.keys()) - UPLOAD_FIELDS if not k.startswith(ATTRIBUTE_PARAM))
    if unknown:
        raise HTTPException(422, "; ".join(f"body.{name}: unknown field" for name in unknown))
    # Two files, or `k=1` and `k=5`: which one was meant? Refused, as in the query string.
    for name in sorted(SINGLE_FORM_FIELDS):
        count = len(form.getlist(name))
        if count > 1:
            raise HTTPException(422, f"body.{name}: give it once, not {count} times")


def run_search(services: Services, *, filters: Filters, facets: list[str] | None = None, **query) -> SearchResponse:
    """Search, write the search_log row, respond.

    The search routes are `async` and run this (which blocks: SQL, the model thread) on the thread
    pool themselves: for a plain `def` route FastAPI would also validate the returned model on the
    pool, a second thread hop per request; from a coroutine it validates and dumps it inline."""
    result = services.engine.search(filters=to_filter(filters), facets=tuple(facets or ()), **query)
    response = logged_response(services.store, result, services.search_log)
    services.metrics.observe_search(result.query.kind, result.query.target.value, result.timings_ms)
    return response


def logged_response(store: Store, result: SearchResult, search_log: SearchLogWriter | None = None) -> SearchResponse:
    """The answer to a search, after its search_log row is written or queued to the server's
    grouped writer (its query_id is valid for events once we answer: feedback/search_log.py).
    `prism search --json` prints this too, so both carry the same fields."""
    started = time.perf_counter()
    record_search(store, result, search_log)
    result.timings_ms["log"] = round((time.perf_counter() - started) * 1000.0, 3)
    return SearchResponse(
        query_id=result.query_id,
        model_version=result.model_version,
        index_version=result.index_version,
        took_ms=result.took_ms,
        target=result.query.target,
        query_kind=result.query.kind,
        k=result.query.k,
        offset=result.query.offset,
        timings_ms=result.timings_ms,
        results=[
            {**catalog_fields(hit.product), "score": hit.score, "rank": hit.rank, "scores": hit.scores,
             "matched_image": image_position_url(hit.product, hit.matched_image)}
            for hit in result.hits
        ],
        facets=result.facets,
    )


@router.get(
    "/search", response_model=SearchResponse, responses=ERRORS, summary="Text query", dependencies=[Depends(_single_valued)]
)
async def search_text(params: Annotated[SearchParams, Query()], services: ServicesDep) -> SearchResponse:
    """Search by text: `target=image` (the default) finds products whose *images* match the words."""
    return await run_in_threadpool(run_search, services, filters=params, facets=params.facets, text=params.q,
                                   target=params.target, k=params.k, offset=params.offset, session=params.session)


@router.post("/search", response_model=SearchResponse, responses=ERRORS, summary="Any query")
async def search_any(body: SearchRequest, services: ServicesDep) -> SearchResponse:
    """Search by `text`, by a base64 image (`image_b64`) or by a product (`similar_to`)."""
    return await run_in_threadpool(
        run_search, services, filters=body.filters, facets=body.facets, text=body.text, image=body.image_b64,
        similar_to=body.similar_to, target=body.target, k=body.k, offset=body.offset, session=body.session,
    )


@router.post(
    "/search/image", response_model=SearchResponse, responses=ERRORS, summary="Image upload query",
    dependencies=[Depends(_known_form_fields)],
)
async def search_upload(
    request: Request,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="the query image")],
    target: Annotated[Target, Form()] = Target.IMAGE,
    k: Annotated[int, Form(ge=1, le=MAX_K, description=K_DESCRIPTION)] = 10,
    offset: Annotated[int, Form(ge=0, le=MAX_OFFSET, description=OFFSET_DESCRIPTION)] = 0,
    category: Annotated[list[str] | None, Form()] = None,
    brand: Annotated[list[str] | None, Form()] = None,
    price_min: Annotated[float | None, Form()] = None,
    price_max: Annotated[float | None, Form()] = None,
    in_stock: Annotated[bool | None, Form(description="as in GET /v1/search")] = None,
    facets: Annotated[str | None, Form(description="comma-separated facet names, as in GET /v1/search")] = None,
    session: Annotated[Session | None, Form(description=SESSION_DESCRIPTION)] = None,
) -> SearchResponse:
    """Search by an uploaded image (multipart field `file`); `target=image` finds look-alikes.
    Attribute filters are fields `attr.NAME` (repeatable), as in GET /v1/search."""
    # The form as `_known_form_fields` parsed it: `attr.NAME` fields are not declared parameters.
    form = request.scope.get("prism.form")
    fields = {k: form.getlist(k) for k in form.keys() if k.startswith(ATTRIBUTE_PARAM)} if form is not None else {}
    attributes = attribute_params(fields).get("attributes", {})
    try:
        filters = Filters(category=category or [], brand=brand or [], price_min=price_min, price_max=price_max,
                          attributes=attributes, in_stock=in_stock)
    except ValidationError as exc:  # reported like every other invalid form field: body.<name>
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    try:
        names = TypeAdapter(FacetNames).validate_python(split_facets(facets or []))
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", "facets", *e["loc"])} for e in exc.errors()]) from None
    limit = services.settings.max_image_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ImageDecodeError("too_large", f"image is over the {limit}-byte limit")
    return await run_in_threadpool(run_search, services, filters=filters, facets=names, image=data, target=target,
                                   k=k, offset=offset, session=session)
