"""The FastAPI application: `create_app(settings)` wires settings, store, engine and routes.

Run it with `prism serve`, or any ASGI server: `uvicorn --factory api.app:create_app`.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api import errors
from api.metrics import Metrics
from api.middleware import BodyLimit, RequestMetrics
from api.routes import events, models, products, search, system
from api.services import Services
from api.settings import PrismSettings
from embedder import ModelThread
from feedback import CanaryReviewer
from indexer import CatalogUpdater
from search import SearchEngine
from store import Store

log = logging.getLogger("prism.api")

DESCRIPTION = """
Cross-modal product search. Every search returns a `query_id`: impressions and clicks refer to it.

Errors are JSON `{"detail": ...}` with a 4xx status naming what was wrong (422 for invalid fields,
413 for bodies or images that are too large, 415 for uploads that are not images, 404 for unknown
products, 503 while no index version is serving).
"""


def _canary_metrics(store: Store) -> dict | None:
    """The running canary's evidence for /metrics (read from SQL: the same on every worker)."""
    from api.routes.models import canary_out

    record = store.running_canary()
    return None if record is None else canary_out(store, None, record).model_dump()


def create_app(settings: PrismSettings | None = None) -> FastAPI:
    settings = settings or PrismSettings()
    store = Store.open(settings.db_url)
    asked = settings.lexical()
    if asked is not None and asked != store.lexical:
        # As with precision: the served index decides how product texts are composed.
        log.warning("PRISM_TEXT_FIELDS / PRISM_ID_ATTRIBUTES (%s) differ from the served index version's %s: "
                    "they apply at the next `prism index`", asked.to_dict(), store.lexical.to_dict())
    limits = settings.image_limits()
    model_thread = ModelThread()
    engine = SearchEngine(
        store, indexes_dir=settings.indexes_dir, models_dir=settings.models_dir, device=settings.device,
        image_limits=limits, model_thread=model_thread,
        batching=settings.batch_config(), local_copies=settings.local_copies,
        query_cache=settings.query_cache_config(), precision=settings.encoder_precision,
        metadata_cache_entries=settings.metadata_cache_entries,
        result_cache_entries=settings.result_cache_entries,
    )
    search_log = settings.search_log_writer(store)
    services = Services(
        settings=settings,
        store=store,
        engine=engine,
        updater=CatalogUpdater(
            home=settings.artifacts, store=store, image_limits=limits, allow_url_images=settings.allow_url_images
        ),
        metrics=Metrics(engine.stats, engine.query_cache_stats,
                        lambda: {"metadata_cache": engine.metadata.stats(), "search_log": search_log.stats(),
                                 "result_cache": engine.results.stats()},
                        canary_stats=lambda: _canary_metrics(store)),
        search_log=search_log,
        canary_reviewer=CanaryReviewer(store, settings.canary_review_interval_s),
    )

    lifespans = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal lifespans
        lifespans += 1
        if lifespans > 1:
            # Shutdown closed the store, the model thread and the batcher this app was built with;
            # serving again on them would fail request by request, so fail the start-up instead.
            raise RuntimeError("this app has already been started and shut down: build a new one with create_app()")
        settings.apply_threads()
        if settings.admin_token is None:
            log.warning(
                "PRISM_ADMIN_TOKEN is not set: catalog changes, model activation and retraining over HTTP are disabled"
            )
        try:
            engine.refresh()  # load the model and index now, not on the first query
        except Exception as exc:  # keep serving /healthz and /readyz; searches answer 503 with the reason
            log.error("no index version loaded at start-up: %s", exc)
        yield
        # Every queued search-log row is written before the store closes (SIGTERM lands here).
        services.search_log.close()
        engine.close()
        model_thread.close()
        store.close()

    app = FastAPI(
        title="Prism",
        version="1",
        summary="Cross-modal product search: text to image, image to text, and more.",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.services = services
    errors.install(app)
    app.include_router(system.router)
    app.include_router(search.router)
    app.include_router(products.router)
    app.include_router(events.router)
    app.include_router(models.router)
    app.mount("/static", StaticFiles(directory=system.STATIC), name="static")
    # base64 inflates an image by 4/3; leave room for the JSON around it and multipart framing.
    app.add_middleware(BodyLimit, max_bytes=settings.max_image_bytes * 4 // 3 + 1024 * 1024)
    app.add_middleware(RequestMetrics, metrics=services.metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Only the named origins; credentials are never shared cross-site (admin calls send a token).
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"], allow_credentials=False,
        )
    return app
