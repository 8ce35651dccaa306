"""Search-log rows written in groups, off the request path.

A served search used to commit its search_log row before answering: one transaction per query,
on SQLite one file sync under the single-writer lock, on the request's critical path. Servers now
hand the row to a `SearchLogWriter`, which commits the rows of many searches in one transaction
(`Store.log_searches`): every `flush_ms`, or as soon as `max_rows` are waiting.

What stays promised:
- A query_id is accepted by POST /v1/events as soon as its search answered. `record_events`
  first calls `ensure_written` with the batch's query_ids: a group holding any of them is written
  at once and waited for (flush on demand). Waiting for the one group is cheaper and simpler than
  letting the events path read rows from the queue: the check against the log stays a plain SQL
  read, and an event's foreign key always finds its search committed. With several worker
  processes an event can reach a worker other than the one that answered its search; that
  worker cannot flush its peer's queue, so query_ids it finds neither queued nor stored are
  looked up again for up to `peer_wait_s` (two flush intervals and a margin) before being refused.
- Graceful shutdown (SIGTERM, the app's lifespan end) writes every queued row: `close` flushes.
- SIGKILL (or a power cut) loses the rows still queued: searches answered at most `flush_ms`
  (plus the time one group's write takes) before the kill. Their events are then refused as
  naming an unknown query_id; an event that was acknowledged is never lost, because its search
  row was committed before it. `flush_ms = 0` writes each row in the request, as before.
- Bounded: at most `max_queued` rows wait; a request that finds the queue full waits for room
  (the database is the bottleneck then, and the request waited on it before anyway).
- A group that cannot be written (the database is down) is retried with backoff; after the last
  try its rows are written one by one and those that still fail are dropped and logged (a search
  whose row could not be written answered HTTP 500 before; now its answer went out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable

from store import Store

log = logging.getLogger(__name__)

# Waits between tries of a group that failed to write (seconds); then row by row.
RETRY_DELAYS_S = (0.05, 0.25, 1.0)


class SearchLogWriter:
    def __init__(self, store: Store, *, flush_ms: float = 20.0, max_rows: int = 256, max_queued: int = 10_000):
        if flush_ms < 0 or max_rows < 1 or max_queued < 1:
            raise ValueError("flush_ms must be >= 0, max_rows and max_queued >= 1")
        self.store = store
        self.flush_s = flush_ms / 1000.0
        self.max_rows = max_rows
        self.max_queued = max(max_queued, max_rows)
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, float, dict]] = deque()  # (number, time queued, row)
        self._pending: dict[str, int] = {}  # query_id -> its row's number, until written (or given up)
        self._added = 0  # rows numbered so far
        self._done = 0  # rows 1.._done are written (or were given up on)
        self._urgent = 0  # write through this row number without waiting for the interval
        self._closing = False
        self.groups = 0
        self.rows_written = 0
        self.rows_failed = 0
        self._thread: threading.Thread | None = None
        if self.grouped:
            self._thread = threading.Thread(target=self._loop, name="prism-search-log", daemon=True)
            self._thread.start()

    @property
    def grouped(self) -> bool:
        """False with flush_ms = 0: every row is written in the request that served the search."""
        return self.flush_s > 0

    @property
    def peer_wait_s(self) -> float:
        """How long a query_id found nowhere is looked for again: another worker process commits
        the rows it answered within one interval and one group's write."""
        return 2 * self.flush_s + 0.1 if self.grouped else 0.0

    # ---------------------------------------------------------------- callers

    def add(self, row: dict) -> None:
        """Queue one search_log row (with its `ts`: the time of the search, not of the write)."""
        if not self.grouped:
            self.store.log_searches([row])
            return
        with self._cond:
            if self._closing:
                raise RuntimeError("the search log writer is closed")
            while len(self._queue) >= self.max_queued:
                self._urgent = max(self._urgent, self._added)
                self._cond.notify_all()
                self._cond.wait()
            self._added += 1
            self._queue.append((self._added, time.monotonic(), row))
            self._pending[row["query_id"]] = self._added
            if len(self._queue) >= self.max_rows or len(self._queue) == 1:
                self._cond.notify_all()  # a full group, or the first row: the writer's deadline starts

    def ensure_written(self, query_ids: Iterable[str], timeout_s: float = 30.0) -> bool:
        """Write now the queued rows of these query_ids (and those before them) and wait until they
        are committed; ids not queued here return at once. False if `timeout_s` passed first."""
        if not self.grouped:
            return True
        with self._cond:
            numbers = [self._pending[q] for q in query_ids if q in self._pending]
            if not numbers:
                return True
            target = max(numbers)
            self._urgent = max(self._urgent, target)
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout=timeout_s)

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Write every row queued so far and wait for it."""
        if not self.grouped:
            return True
        with self._cond:
            target = self._added
            self._urgent = max(self._urgent, target)
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout=timeout_s)

    def close(self, timeout_s: float = 60.0) -> None:
        """Write every queued row, then stop (graceful shutdown)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("the search log writer did not finish within %.0f s; %d rows unwritten",
                          timeout_s, len(self._queue))

    def stats(self) -> dict:
        with self._cond:
            return {
                "grouped": self.grouped,
                "flush_ms": self.flush_s * 1000.0,
                "queued": len(self._queue),
                "groups": self.groups,
                "rows_written": self.rows_written,
                "rows_failed": self.rows_failed,
            }

    # ---------------------------------------------------------------- writer thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._queue:
                        if (self._closing or len(self._queue) >= self.max_rows or self._urgent > self._done):
                            break
                        remaining = self._queue[0][1] + self.flush_s - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    elif self._closing:
                        return
                    else:
                        self._cond.wait()
                group = [self._queue.popleft() for _ in range(min(self.max_rows, len(self._queue)))]
            self._write([row for _, _, row in group])
            with self._cond:
                for _, _, row in group:
                    self._pending.pop(row["query_id"], None)
                self._done = group[-1][0]
                self._cond.notify_all()  # waiters on ensure_written, and adders waiting for room

    def _write(self, rows: list[dict]) -> None:
        for delay in (*RETRY_DELAYS_S, None):
            try:
                self.store.log_searches(rows)
            except Exception as exc:
                if delay is None:
                    break
                log.warning("cannot write %d search_log rows (%s); retrying in %.2f s", len(rows), exc, delay)
                time.sleep(delay)
                continue
            self.groups += 1
            self.rows_written += len(rows)
            return
        # One bad row must not take its group with it; a database that stays down loses them all.
        for row in rows:
            try:
                self.store.log_searches([row])
                self.rows_written += 1
            except Exception as exc:
                self.rows_failed += 1
                log.error("search_log row %s not written: %s", row.get("query_id"), exc)
        self.groups += 1
