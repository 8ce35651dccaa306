"""Model routes: activate a version (rollback or roll forward) and queue the retrain job."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path as PathParam

from api.routes.common import ADMIN_ERRORS
from api.schemas import ActivatedOut, ErrorOut, RetrainQueued, RetrainStatus, TrainingRunOut
from api.services import AdminDep, ServicesDep
from feedback import activate_version, is_running
from store import UnknownVersionError

log = logging.getLogger("prism.api")
router = APIRouter(prefix="/v1", tags=["versions"])

VersionPath = Annotated[str, PathParam(min_length=1, max_length=200, description="a model or index version")]


@router.post(
    "/models/{version}/activate",
    response_model=ActivatedOut,
    dependencies=[AdminDep],
    responses={**ADMIN_ERRORS, 404: {"model": ErrorOut, "description": "no such version, or no index built for it"}},
    summary="Serve a model or index version (rollback, roll forward)",
)
def activate(version: VersionPath, services: ServicesDep) -> ActivatedOut:
    """Activate an index version, or a model version's newest index version, in one transaction.

    This server loads it before answering; other servers swap on their next query, each
    finishing the searches already in flight on the version they started with.
    """
    try:
        record = activate_version(services.store, version)
    except UnknownVersionError as exc:
        raise HTTPException(404, str(exc)) from None
    try:
        services.engine.refresh()
    except Exception as exc:  # logged by the engine; the previous version keeps serving
        log.error("activated %s but cannot load it here: %s", record.index_version, exc)
    serving = services.engine.stats().get("index_version") == record.index_version
    return ActivatedOut(index_version=record.index_version, model_version=record.model_version,
                        activated_at=record.activated_at, serving=serving)


@router.get("/retrain", response_model=RetrainStatus, tags=["feedback"], summary="Retrain runs")
def retrain_status(services: ServicesDep) -> RetrainStatus:
    """Queued, running and finished runs, newest first; `running` says whether a worker (on any
    host sharing the database) holds the job lock now."""
    store = services.store
    runs = [TrainingRunOut(**asdict(r)) for r in store.list_training_runs(limit=20)]
    return RetrainStatus(running=is_running(store, services.settings.home), queued=store.count_training_runs("queued"),
                         runs=runs)


@router.post(
    "/retrain",
    status_code=202,
    response_model=RetrainQueued,
    dependencies=[AdminDep],
    tags=["feedback"],
    responses=ADMIN_ERRORS,
    summary="Queue a retrain run",
)
def retrain(services: ServicesDep) -> RetrainQueued:
    """Queue one run of the retrain job for a `prism worker`; follow it with `GET /v1/retrain`.

    Servers never train (it would take a serving worker's CPU and memory for many minutes). A run
    already queued, not yet started, serves this request too: its id is answered, and nothing
    more is queued."""
    run, queued = services.store.enqueue_training_run(requested_by="http")
    if queued:
        detail = f"retrain run {run.id} queued; a `prism worker` runs it (follow it with GET /v1/retrain)"
    else:
        detail = f"retrain run {run.id} was already queued and serves this request; follow it with GET /v1/retrain"
    return RetrainQueued(run_id=run.id, detail=detail)
