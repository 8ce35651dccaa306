"""Model routes: activate a version (rollback or roll forward), interleaved canaries, the retrain job."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path as PathParam

from api.routes.common import ADMIN_ERRORS
from api.schemas import (
    ActivatedOut, CanaryArmOut, CanaryOut, CanaryStart, ErrorOut, NoNul, RetrainQueued, RetrainStatus, TrainingRunOut,
)
from api.services import AdminDep, ServicesDep
from feedback import (
    CanaryError, CanaryPolicy, activate_version, canary_stats, decide, is_running, resolve_version, start_canary,
    stop_canary,
)
from search import SearchEngine
from store import CanaryConflictError, CanaryRecord, Store, UnknownVersionError

log = logging.getLogger("prism.api")
router = APIRouter(prefix="/v1", tags=["versions"])

# No NUL: the name is looked up in the database, and PostgreSQL text cannot hold one (a 500 there).
VersionPath = Annotated[str, PathParam(min_length=1, max_length=200, description="a model or index version"), NoNul]


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


# ---------------------------------------------------------------- canaries

CANARY_ERRORS = {
    **ADMIN_ERRORS,
    404: {"model": ErrorOut, "description": "no such version, or no index built for it"},
    409: {"model": ErrorOut, "description": "a canary is running already (or none is), or the version is what serves"},
}
_NO_ARM = {"impressions": 0, "clicks": 0, "wins": 0}


def canary_out(store: Store, engine: SearchEngine | None, record: CanaryRecord) -> CanaryOut:
    """A canary with its live evidence (running), or the counts and reason it ended with."""
    if record.status == "running":
        evidence = canary_stats(store, record)
        _, decision = decide(evidence, CanaryPolicy(**record.policy))
        stats = evidence.to_dict()
        canary = engine.stats().get("canary") if engine is not None else None
        loaded = bool(canary and canary["id"] == record.id) if engine is not None else None
    else:
        stats, decision, loaded = record.result, record.reason, None
    return CanaryOut(
        **{k: getattr(record, k) for k in (
            "id", "status", "candidate_model_version", "candidate_index_version", "serving_model_version",
            "serving_index_version", "fraction", "policy", "started_by", "training_run_id", "started_at",
            "finished_at", "finished_by", "reason")},
        searches=stats.get("searches", 0), serving=CanaryArmOut(**stats.get("serving", _NO_ARM)),
        candidate=CanaryArmOut(**stats.get("candidate", _NO_ARM)), ties=stats.get("ties", 0),
        decided=stats.get("decided", 0), p_value=stats.get("p_value", 1.0), decision=decision, loaded=loaded,
    )


def latest_canary(store: Store) -> CanaryRecord | None:
    """The running canary, else the latest one to end."""
    running = store.running_canary()
    if running is not None:
        return running
    latest = store.list_canaries(limit=1)
    return latest[0] if latest else None


@router.post(
    "/models/{version}/canary",
    status_code=201,
    response_model=CanaryOut,
    dependencies=[AdminDep],
    responses=CANARY_ERRORS,
    summary="Start an interleaved canary of a model or index version",
)
def canary_start(version: VersionPath, body: CanaryStart, services: ServicesDep) -> CanaryOut:
    """Interleave `fraction` of searches (team draft) with the rankings of `version` (an index
    version, or a model version's newest index version), and credit clicks to the ranking that
    contributed the clicked product. The candidate is promoted when it wins at p < alpha after the
    policy's minimum of searches with a winner, stopped when it loses (PRISM_CANARY_*); follow it
    with GET /v1/models. One canary runs at a time."""
    store = services.store
    try:
        record = start_canary(store, version, body.fraction, policy=services.settings.canary_policy(),
                              started_by="http")
    except UnknownVersionError as exc:
        raise HTTPException(404, str(exc)) from None
    except CanaryConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    except CanaryError as exc:
        raise HTTPException(422, str(exc)) from None
    services.engine.sync()  # start loading the candidate here now; other servers do on their next query
    return canary_out(store, services.engine, record)


@router.delete(
    "/models/{version}/canary",
    response_model=CanaryOut,
    dependencies=[AdminDep],
    responses=CANARY_ERRORS,
    summary="Stop the interleaved canary of a version",
)
def canary_stop(version: VersionPath, services: ServicesDep) -> CanaryOut:
    """Stop the running canary of `version` (a model or index version, as it was started with);
    the serving version stays, and the stop is logged in `training_runs` with the counts."""
    store = services.store
    running = store.running_canary()
    if running is None:
        raise HTTPException(409, "no canary is running")
    try:
        named = resolve_version(store, version).index_version
    except UnknownVersionError as exc:
        raise HTTPException(404, str(exc)) from None
    if named != running.candidate_index_version and version != running.candidate_model_version:
        raise HTTPException(409, f"the running canary is {running.candidate_index_version} "
                                 f"(model {running.candidate_model_version}), not {version}")
    try:
        review = stop_canary(store, by="http", canary=running)
    except CanaryConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    return canary_out(store, services.engine, review.canary)
