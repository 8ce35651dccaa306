"""Model routes: activate a version (rollback or roll forward) and run the retrain job."""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path as PathParam
from fastapi.responses import JSONResponse

from api.routes.common import ADMIN_ERRORS
from api.schemas import ActivatedOut, ErrorOut, RetrainStarted, RetrainStatus, TrainingRunOut
from api.services import AdminDep, ServicesDep
from embedder import resolve_device
from feedback import RetrainBusyError, activate_version, is_running, run_retrain
from store import UnknownVersionError

log = logging.getLogger("prism.api")
router = APIRouter(prefix="/v1", tags=["versions"])

# The job lock covers other processes; this covers two requests racing inside this one.
_job_guard = threading.Lock()
_job: threading.Thread | None = None

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
    runs = [TrainingRunOut(**asdict(r)) for r in services.store.list_training_runs(limit=20)]
    return RetrainStatus(running=is_running(services.settings.home), runs=runs)


@router.post(
    "/retrain",
    status_code=202,
    response_model=RetrainStarted,
    dependencies=[AdminDep],
    tags=["feedback"],
    responses={**ADMIN_ERRORS, 409: {"model": ErrorOut, "description": "a run is already under way"}},
    summary="Run the retrain job now",
)
def retrain(services: ServicesDep):
    """Start one run of the nightly job in the background; follow it with `GET /v1/retrain`."""
    global _job
    settings = services.settings

    def job() -> None:
        try:
            outcome = run_retrain(services.store, home=settings.home, config=settings.retrain_config(),
                                  index_options=settings.index_options(), device=resolve_device(settings.device))
            log.info("retrain run %d: %s (%s)", outcome.run_id, outcome.decision, outcome.reason or "")
        except RetrainBusyError as exc:
            log.warning("%s", exc)
        except Exception:
            log.exception("retrain run failed; the serving version is unchanged")

    with _job_guard:
        if (_job is not None and _job.is_alive()) or is_running(settings.home):
            return JSONResponse({"detail": "a retrain run is already under way; see GET /v1/retrain"}, status_code=409)
        _job = threading.Thread(target=job, name="prism-retrain", daemon=True)
        _job.start()
    return RetrainStarted(detail="retrain run started; follow it with GET /v1/retrain")
