"""The search log and the events that refer to it: impressions and clicks.

Every served query writes one search_log row (its query_id is valid for events once
`record_search` returns; servers queue the row to a `SearchLogWriter`, which writes rows in groups
off the request path and flushes on demand for the events that name them: feedback/search_log.py). Clients report what they showed and what was opened as events that
name that query_id, the product and the 1-based position it was served at. A batch is checked
as a whole against the log and stored in one transaction, or not at all.

An event_id is the client's promise that two sends are one event: a resend with the same content
is a retry (counted as a duplicate), a resend with other content is a conflict, and the whole
batch is refused so that no part of it is silently dropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from feedback.search_log import SearchLogWriter
from search import SearchResult
from store import EventIdReusedError, EventInput, Store, UnknownSearchError

EVENT_TYPES = ("impression", "click")


class EventBatchError(ValueError):
    """Some events in a batch are invalid; `problems` names each one. Nothing was stored."""

    def __init__(self, problems: list[dict]):
        self.problems = problems
        super().__init__(f"{len(problems)} invalid event(s); nothing was stored")


class EventConflictError(ValueError):
    """Events reuse event_ids already used (stored, or earlier in the batch) by events with other
    content; `conflicts` names each (index, event_id, error). Nothing of the batch was stored."""

    def __init__(self, conflicts: list[dict]):
        self.conflicts = conflicts
        self.event_ids = list(dict.fromkeys(c["event_id"] for c in conflicts))
        shown = ", ".join(repr(i) for i in self.event_ids[:10])
        if len(self.event_ids) > 10:
            shown += f" and {len(self.event_ids) - 10} more"
        super().__init__(
            f"event_id(s) {shown} already used by events with other content; nothing of this batch was stored "
            "(an identical resend counts as a duplicate; a different event needs a new event_id)"
        )


@dataclass(frozen=True)
class EventsOutcome:
    stored: int
    duplicates: int


def record_search(store: Store, result: SearchResult, search_log: SearchLogWriter | None = None) -> None:
    """Write `result`'s search_log row (or queue it to `search_log`); its query_id is valid for
    events once this returns."""
    row = search_log_row(result)
    if search_log is None:
        store.log_searches([row])
    else:
        search_log.add(row)


def search_log_row(result: SearchResult) -> dict:
    """`result` as a search_log row, stamped with the time of the search (rows may be written later)."""
    q = result.query
    filters = {
        key: value
        for key, value in (
            ("category", list(q.filters.categories)),
            ("brand", list(q.filters.brands)),
            ("price_min", q.filters.price_min),
            ("price_max", q.filters.price_max),
            ("attributes", {c.name: {"min": c.low, "max": c.high} if c.numeric else list(c.values)
                            for c in q.filters.attributes}),
            ("in_stock", q.filters.in_stock),
        )
        if value not in (None, [], {})
    }
    return dict(
        query_id=result.query_id,
        query_text=q.text,
        image_hash=q.image_hash,
        query_product_id=q.similar_to,
        target=q.target.value,
        filters=filters,
        k=q.k,
        offset=q.offset,
        model_version=result.model_version,
        index_version=result.index_version,
        result_ids=[hit.product.product_id for hit in result.hits],
        took_ms=result.took_ms,
        ts=datetime.now(timezone.utc),
        canary_id=result.canary_id,
        arms=result.arms,
    )


def record_events(
    store: Store,
    events: Sequence[EventInput],
    *,
    now: datetime | None = None,
    max_clock_skew: timedelta = timedelta(minutes=5),
    search_log: SearchLogWriter | None = None,
) -> EventsOutcome:
    """Validate a batch against the search log and store it atomically; a retried event_id counts once.

    Raises `EventBatchError` for invalid events and `EventConflictError` for an event_id reused
    with other content (type, query_id, product_id, position or ts); either way nothing is stored.

    An event must name a logged query_id, a product that query served, the position it was served
    at, a known type, and a time neither in the future nor before the search (both give or take
    `max_clock_skew`, for client clocks).

    `search_log`: the server's grouped writer. Rows it still holds for these query_ids are written
    first (flush on demand), and ids found nowhere are looked up again for `peer_wait_s`: another
    worker process may have answered the search and not written its group yet.
    """
    now = now or datetime.now(timezone.utc)
    query_ids = list(dict.fromkeys(e.query_id for e in events))
    if search_log is not None:
        search_log.ensure_written(query_ids)
    searches = store.searches_by_ids(query_ids)
    if search_log is not None and search_log.grouped and len(searches) < len(query_ids):
        deadline = time.monotonic() + search_log.peer_wait_s
        while len(searches) < len(query_ids) and time.monotonic() < deadline:
            time.sleep(min(search_log.flush_s, max(0.0, deadline - time.monotonic())))
            searches.update(store.searches_by_ids([q for q in query_ids if q not in searches]))
    problems = []
    for index, event in enumerate(events):
        error = _problem(event, searches.get(event.query_id), now, max_clock_skew)
        if error:
            problems.append({"index": index, "event_id": event.event_id, "error": error})
    if problems:
        raise EventBatchError(problems)
    try:
        stored, duplicates = store.add_events(events)
    except EventIdReusedError as exc:
        raise EventConflictError(
            [{"index": index, "event_id": event_id, "error": error} for index, event_id, error in exc.conflicts]
        ) from None
    except UnknownSearchError as exc:  # pruned by the retention job after the check above
        raise EventBatchError([
            {"index": index, "event_id": e.event_id,
             "error": f"unknown query_id {e.query_id!r} (no longer in the search log)"}
            for index, e in enumerate(events) if e.query_id in exc.query_ids
        ]) from None
    return EventsOutcome(stored, duplicates)


def _problem(event: EventInput, search, now: datetime, skew: timedelta) -> str | None:
    if event.type not in EVENT_TYPES:
        return f"type must be one of {', '.join(EVENT_TYPES)}, not {event.type!r}"
    if not event.event_id:
        return "event_id must not be empty"
    if search is None:
        return f"unknown query_id {event.query_id!r}"
    ts = event.ts if event.ts.tzinfo else event.ts.replace(tzinfo=timezone.utc)
    if ts > now + skew:
        return f"ts {ts.isoformat()} is in the future"
    if ts < search.ts - skew:
        return f"ts {ts.isoformat()} is before the search it refers to ({search.ts.isoformat()})"
    served = {pid: search.offset + i + 1 for i, pid in enumerate(search.result_ids)}
    if event.product_id not in served:
        return f"product {event.product_id!r} was not among the results of query {event.query_id!r}"
    if event.position != served[event.product_id]:
        return f"product {event.product_id!r} was served at position {served[event.product_id]}, not {event.position}"
    return None
