"""Service routes: liveness, readiness, versions, facets, metrics and the search page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, JSONResponse

from api.routes.models import canary_out, latest_canary
from api.schemas import (
    CanaryOut,
    FacetsResponse,
    FacetValue,
    Health,
    IndexVersionOut,
    ModelsResponse,
    ModelVersionOut,
    QueryCacheOut,
    Readiness,
)
from api.services import ServicesDep

router = APIRouter()
STATIC = Path(__file__).resolve().parents[1] / "static"

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob: https: http:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@router.get("/healthz", response_model=Health, tags=["service"], summary="Liveness")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Readiness, tags=["service"], summary="Readiness: an index version is serving",
    responses={503: {"model": Readiness, "description": "no index version loaded yet"}},
)
def readyz(services: ServicesDep) -> JSONResponse:
    try:
        services.engine.sync()
    except Exception:  # a broken active version: not ready, and the search routes say why
        pass
    stats = services.engine.stats()
    body = Readiness(ready=bool(stats), **{k: v for k, v in stats.items() if k in Readiness.model_fields})
    return JSONResponse(body.model_dump(), status_code=200 if stats else 503)


@router.get("/v1/models", response_model=ModelsResponse, tags=["versions"], summary="Model and index versions")
def models(services: ServicesDep) -> ModelsResponse:
    try:
        services.engine.sync()  # a replica that has not served a query since an activation notices it here
    except Exception:
        pass  # a broken active version: reported by /readyz and the search routes
    stats = services.engine.stats()
    serving = stats.get("model_version")
    return ModelsResponse(
        models=[
            ModelVersionOut(
                model_version=m.model_version, spec=m.spec, dim=m.dim, parent=m.parent,
                created_at=m.created_at, serving=m.model_version == serving,
            )
            for m in services.store.list_model_versions()
        ],
        indexes=[
            IndexVersionOut(
                index_version=v.index_version, model_version=v.model_version, active=v.is_active,
                created_at=v.created_at, activated_at=v.activated_at,
                counts={k: int(n) for k, n in v.manifest.get("counts", {}).items()},
                catalog_seq=int(v.manifest.get("catalog_seq", 0)),
                serving=v.index_version == stats.get("index_version"),
                precision=str(v.manifest.get("precision", "fp32")),
            )
            for v in services.store.list_index_versions()
        ],
        loading_index_version=stats.get("loading_index_version"),
        encoder_precision=stats.get("encoder_precision"),
        query_cache=QueryCacheOut(**services.engine.query_cache_stats()),
        canary=_canary(services),
    )


def _canary(services) -> CanaryOut | None:
    record = latest_canary(services.store)
    return None if record is None else canary_out(services.store, services.engine, record)


@router.get("/v1/facets", response_model=FacetsResponse, tags=["catalog"], summary="Filter values for the page")
def facets(services: ServicesDep) -> FacetsResponse:
    f = services.store.facets()
    return FacetsResponse(
        categories=[FacetValue(value=v, count=n) for v, n in f["categories"]],
        brands=[FacetValue(value=v, count=n) for v, n in f["brands"]],
        price_min=f["price_min"],
        price_max=f["price_max"],
        products=f["products"],
        attributes=services.engine.serving.filters.attribute_names if services.engine.ready else [],
        credits=_catalog_credits(services.settings.home),
    )


def _catalog_credits(home) -> str | None:
    path = home / "demo" / "ATTRIBUTION.txt"
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


@router.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=Response)
def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
