"""Query micro-batching: text queries that arrive together are encoded as one batch.

A text encoder's cost is dominated by per-call overhead at batch 1 (a dozen small matmuls per
layer), so encoding 32 queries at once costs a few times one query, not 32 times. Servers get
concurrent queries; this turns them into batches without making a lone query wait:

- the dispatcher takes the first waiting query, then keeps collecting while other queries are
  *expected* (inside the engine, on their way to the batcher), until `max_batch` are collected or
  `window_s` has passed since the first one;
- with nothing else in flight a query is dispatched at once: a lone query never waits;
- while a batch runs on the model thread, new arrivals queue up and form the next batch.

Each query keeps its own follow-up (ANN search over its own filters); one failure fails only
that query.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class BatchConfig:
    enabled: bool = True
    window_s: float = 0.002
    max_batch: int = 32


@dataclass
class BatchStats:
    """What the last batch a query rode in looked like (for timings and metrics)."""

    size: int
    queued_ms: float
    encode_ms: float


@dataclass
class _Job:
    embedder: Any
    text: str
    then: Callable[[np.ndarray], Any]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)


class TextQueryBatcher:
    def __init__(self, config: BatchConfig, run: Callable[[Callable[[], Any]], Any] | None = None):
        """`run(fn)` executes fn where model work belongs (the server's model thread); None: here."""
        self.config = config
        self._run = run or (lambda fn: fn())
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._expected = 0  # announced queries not yet taken into a batch
        self._lock = threading.Lock()
        self._closed = False
        self._batches = 0
        self._queries = 0
        self._thread = threading.Thread(target=self._loop, name="prism-query-batcher", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- callers

    @contextmanager
    def expecting(self):
        """Announce a text query from its start (SQL, filters) so that forming batches wait for it;
        yields a `submit(embedder, text, then)` function. Leaving without submitting withdraws it."""
        with self._lock:
            self._expected += 1
        state = {"submitted": False}

        def submit(embedder, text: str, then: Callable[[np.ndarray], Any]) -> tuple[Any, BatchStats]:
            state["submitted"] = True
            return self._submit(embedder, text, then)

        try:
            yield submit
        finally:
            if not state["submitted"]:
                with self._lock:
                    self._expected -= 1

    def _submit(self, embedder, text: str, then: Callable[[np.ndarray], Any]) -> tuple[Any, BatchStats]:
        """Encode `text` with `embedder` (batched with concurrent queries), then `then(vector)`
        on the model thread; returns its result and the batch's stats. Blocks until done."""
        job = _Job(embedder, text, then)
        if self._closed:
            with self._lock:
                self._expected -= 1
            raise RuntimeError("the query batcher is closed")
        self._queue.put(job)
        return job.future.result()

    def stats(self) -> dict[str, int]:
        """Batches dispatched and queries in them, since start."""
        return {"batches": self._batches, "queries": self._queries}

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)

    # ---------------------------------------------------------------- dispatcher

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = self._collect(first)
            self._batches += 1
            self._queries += len(jobs)
            try:
                self._run(lambda: self._process(jobs))
            except BaseException as exc:  # the model thread itself failed: fail the batch, keep serving
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _taken(self) -> None:
        with self._lock:
            self._expected -= 1

    def _collect(self, first: _Job) -> list[_Job]:
        self._taken()
        jobs = [first]
        deadline = first.arrived + self.config.window_s
        while len(jobs) < self.config.max_batch:
            try:  # whatever is queued already joins, window or not
                job = self._queue.get_nowait()
            except queue.Empty:
                with self._lock:
                    others_coming = self._expected > 0
                remaining = deadline - time.perf_counter()
                if not others_coming or remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                self._queue.put(None)  # close after this batch
                break
            self._taken()
            jobs.append(job)
        return jobs

    def _process(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        groups: dict[int, list[_Job]] = {}
        for job in jobs:  # a version swap mid-batch: each query keeps the model it started with
            groups.setdefault(id(job.embedder), []).append(job)
        for group in groups.values():
            t0 = time.perf_counter()
            try:
                vectors = group[0].embedder.encode_texts([job.text for job in group])
            except Exception as exc:
                for job in group:
                    job.future.set_exception(exc)
                continue
            encode_ms = (time.perf_counter() - t0) * 1000.0
            for job, vector in zip(group, vectors):
                stats = BatchStats(len(jobs), (started - job.arrived) * 1000.0, encode_ms)
                try:
                    job.future.set_result((job.then(vector[None, :]), stats))
                except Exception as exc:
                    job.future.set_exception(exc)
