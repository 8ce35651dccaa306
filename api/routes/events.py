"""Feedback routes: impressions and clicks that refer to a served query."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.routes.common import ERRORS
from api.schemas import EventBatch, EventsRejected, EventsStored
from api.services import ServicesDep
from feedback import EventBatchError, EventConflictError, record_events
from store import EventInput

router = APIRouter(prefix="/v1", tags=["feedback"])


@router.post(
    "/events",
    response_model=EventsStored,
    responses={422: {"model": EventsRejected, "description": "invalid events, each named; nothing was stored"},
               409: {"model": EventsRejected, "description": "event_ids reused with other content, each named in "
                     "`detail` and `problems`; nothing of the batch was stored"},
               413: ERRORS[413]},
    summary="Report impressions and clicks",
)
def post_events(events: EventBatch, services: ServicesDep):
    """Store a batch of events atomically; the answer comes after the commit.

    Each event names the `query_id` of a search, a product that search returned and the position
    it was served at. A batch with any invalid event is refused whole, with every problem listed.
    Sending the same `event_id` again (a retry) is safe: it is counted once. The same `event_id`
    with other content (type, query_id, product_id, position or ts) is a conflict: 409, and
    nothing of the batch is stored, so the client can fix it and send the whole batch again.
    """
    batch = [EventInput(e.event_id, e.type, e.query_id, e.product_id, e.position, e.ts) for e in events]
    try:
        outcome = record_events(services.store, batch, search_log=services.search_log)
    except EventBatchError as exc:
        body = EventsRejected(detail=f"{exc}: " + "; ".join(f"[{p['index']}] {p['error']}" for p in exc.problems[:5]),
                              problems=exc.problems)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=422)
    except EventConflictError as exc:
        services.metrics.events.labels("conflict").inc(len(exc.conflicts))
        body = EventsRejected(detail=f"{exc}: " + "; ".join(f"[{p['index']}] {p['error']}" for p in exc.conflicts[:3]),
                              problems=exc.conflicts)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=409)
    services.metrics.events.labels("stored").inc(outcome.stored)
    services.metrics.events.labels("duplicate").inc(outcome.duplicates)
    if services.canary_reviewer is not None and outcome.stored:
        # After the commit: the evidence is stored whatever the review does.
        services.canary_reviewer.maybe_review()
    return EventsStored(stored=outcome.stored, duplicates=outcome.duplicates)
