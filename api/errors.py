"""Prism's exceptions as HTTP answers: always a JSON `detail`, a 4xx for anything the client sent."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from embedder import ImageDecodeError, ModelUnavailableError
from indexer import IndexVersionError, UpdateError
from search import NotReadyError, ProductNotFoundError, QueryError

log = logging.getLogger("prism.api")

# Image problems by cause: too big is 413, not an image at all is 415, a damaged one is 422.
IMAGE_STATUS = {"too_large": 413, "too_many_pixels": 413, "not_an_image": 415}


def image_status(exc: ImageDecodeError) -> int:
    return IMAGE_STATUS.get(exc.reason, 422)


def jsonable_errors(errors) -> list[dict]:
    # pydantic puts the offending input (maybe bytes, maybe huge) and exception objects in errors.
    out = []
    for e in errors:
        item = {"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
        ctx = e.get("ctx")
        if ctx:
            item["ctx"] = {k: str(v) for k, v in ctx.items()}
        out.append(item)
    return out


def _json(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def describe_validation(errors: list[dict]) -> str:
    """FastAPI's structured validation errors as one readable sentence per problem."""
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()))
        if e.get("type") == "extra_forbidden":
            message = "unknown field"
        elif e.get("type") == "json_invalid":
            message = f"malformed JSON ({e.get('ctx', {}).get('error', 'cannot parse')})"
        else:
            message = str(e.get("msg", "invalid"))
            message = message.removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


# FastAPI answers a body it cannot decode (JSON that is not UTF-8, say) with this 400 and chains
# the cause; Starlette answers a broken multipart form with a 400 raised while a
# MultiPartException is handled. Both are malformed input: 422 like every other (README, OpenAPI).
_BODY_PARSE_ERROR = "There was an error parsing the body"


# What the JSON and multipart parsers raise on bad bytes. Anything else behind that 400 (a full
# disk while a form spools to a temp file, MemoryError) is the server's fault, not the client's.
_PARSE_FAILURES = (UnicodeDecodeError, RecursionError, ValueError, MultiPartException)


def unparsable_body(request: Request, exc: StarletteHTTPException) -> tuple[int, str] | None:
    """(status, detail) for a 400 that means "the body could not be parsed", else None."""
    if exc.status_code != 400:
        return None
    if isinstance(exc.__context__, MultiPartException):
        reason = str(exc.detail)
        return (413 if "maximum size" in reason else 422), f"body: malformed multipart form ({reason})"
    if exc.detail != _BODY_PARSE_ERROR:
        return None
    cause = exc.__cause__
    if not isinstance(cause, _PARSE_FAILURES):
        log.error("%s %s: reading the request body failed", request.method, request.url.path, exc_info=cause)
        return 500, "internal error while reading the request body; it was not stored"
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/"):
        return 422, f"body: malformed multipart form ({cause})"
    if isinstance(cause, RecursionError):
        return 422, "body: malformed JSON (nested too deeply)"
    if isinstance(cause, UnicodeDecodeError):
        byte = cause.object[cause.start]
        return 422, f"body: malformed JSON (not UTF-8 text: byte {byte:#04x} at position {cause.start})"
    return 422, "body: malformed JSON (cannot parse it)" if "json" in content_type else "body: cannot parse it"


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        mapped = unparsable_body(request, exc)
        if mapped is not None:
            return _json(*mapped)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        # `detail` is a sentence for people; `errors` keeps FastAPI's structure for programs.
        errors = jsonable_errors(exc.errors())
        return JSONResponse({"detail": describe_validation(errors), "errors": errors}, status_code=422)

    @app.exception_handler(QueryError)
    async def _query(_: Request, exc: QueryError):
        return _json(422, str(exc))

    @app.exception_handler(ProductNotFoundError)
    async def _not_found(_: Request, exc: ProductNotFoundError):
        return _json(404, str(exc))

    @app.exception_handler(ImageDecodeError)
    async def _image(request: Request, exc: ImageDecodeError):
        request.app.state.services.metrics.rejected_images.labels(exc.reason).inc()
        return _json(image_status(exc), f"unusable image ({exc.reason}): {exc}")

    @app.exception_handler(UpdateError)
    async def _update(_: Request, exc: UpdateError):
        status = {"urls_disabled": 403, "busy": 409}.get(exc.reason, 422)
        return _json(status, str(exc))

    @app.exception_handler(NotReadyError)
    async def _not_ready(_: Request, exc: NotReadyError):
        return _json(503, str(exc), {"Retry-After": "30"})

    @app.exception_handler(IndexVersionError)
    @app.exception_handler(ModelUnavailableError)
    async def _cannot_serve(_: Request, exc: Exception):
        log.error("cannot serve the active index version: %s", exc)
        return _json(503, f"the active index version cannot be served: {exc}", {"Retry-After": "30"})

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json(500, "internal error; it has been logged")
