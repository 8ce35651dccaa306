"""Query micro-batching: queries that arrive together are encoded as one batch, text and image alike.

An encoder's cost is dominated by per-call overhead at batch 1 (a dozen small matmuls per layer),
so encoding 32 queries at once costs a few times one query, not 32 times. Servers get concurrent
queries; this turns them into batches without making a lone query wait:

- the dispatcher takes the first waiting query, then keeps collecting while other queries are
  *expected* (inside the engine, on their way to the batcher), until `max_batch` are collected or
  `window_s` has passed since the first one;
- with nothing else in flight a query is dispatched at once: a lone query never waits;
- while a batch runs on the model thread, new arrivals queue up and form the next batch.

Each query keeps its own follow-up (ANN search over its own filters); one failure fails only
that query (a batch whose encode fails is encoded again query by query). Texts and images form
separate groups within a batch (two towers); image queries arrive decoded (the request thread
decodes, the model thread preprocesses and encodes).

Every query that reaches the model thread goes through here (`SearchEngine.search`), so the path
is one: with batching off, for an int8 encoder (whose vectors would depend on their batch-mates)
or for a query whose vector is known already (cached, or a product's own), the job runs at once
on the model thread, alone.
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


QUERY_KINDS = ("text", "image")


@dataclass
class _Job:
    embedder: Any
    payload: Any  # the text, or the decoded image
    then: Callable[[np.ndarray], Any]
    kind: str = "text"
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)


class QueryBatcher:
    def __init__(self, config: BatchConfig, run: Callable[[Callable[[], Any]], Any] | None = None):
        """`run(fn)` executes fn where model work belongs (the server's model thread); None: here.
        With `config.enabled` false no dispatcher runs: every job runs at once, alone."""
        self.config = config
        self._run = run or (lambda fn: fn())
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._expected = 0  # announced queries not yet taken into a batch
        self._lock = threading.Lock()
        self._closed = False
        self._batches = 0
        self._queries = 0
        self._thread = None
        if config.enabled:
            self._thread = threading.Thread(target=self._loop, name="prism-query-batcher", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    # ---------------------------------------------------------------- callers

    @contextmanager
    def expecting(self, announce: bool = True):
        """Announce a query from its start (SQL, filters, image decoding) so that forming batches
        wait for it; yields a `submit(embedder, payload, then, kind="text", alone=False)` function.
        Leaving without submitting (or submitting alone) withdraws it. `announce=False`: a query
        that will not join a batch (its vector is known, or it runs alone) holds up none."""
        announce = announce and self.enabled
        if announce:
            with self._lock:
                self._expected += 1
        state = {"announced": announce}

        def withdraw() -> None:
            if state["announced"]:
                state["announced"] = False
                with self._lock:
                    self._expected -= 1

        def submit(embedder, payload, then: Callable[[np.ndarray], Any], kind: str = "text",
                   alone: bool = False) -> tuple[Any, BatchStats]:
            if alone or not self.enabled:
                withdraw()
                return self._alone(_Job(embedder, payload, then, kind))
            state["announced"] = False  # the dispatcher takes it from the expected count
            return self._submit(_Job(embedder, payload, then, kind), announced=announce)

        try:
            yield submit
        finally:
            withdraw()

    def run(self, fn: Callable[[], Any]) -> Any:
        """`fn` where model work belongs, now (a query whose vector is known: only its ANN search)."""
        return self._run(fn)

    def _alone(self, job: _Job) -> tuple[Any, BatchStats]:
        """Encode and follow up one query at once, outside any batch."""
        def process():
            started = time.perf_counter()
            vector = _encode(job.embedder, job.kind, [job.payload])
            encode_ms = (time.perf_counter() - started) * 1000.0
            return job.then(vector), BatchStats(1, (started - job.arrived) * 1000.0, encode_ms)

        return self._run(process)

    def _submit(self, job: _Job, *, announced: bool) -> tuple[Any, BatchStats]:
        """Encode the job's payload (batched with concurrent queries), then `then(vector)` on the
        model thread; returns its result and the batch's stats. Blocks until done."""
        if job.kind not in QUERY_KINDS:
            raise ValueError(f"unknown query kind {job.kind!r}")
        with self._lock:
            if not announced:
                self._expected += 1  # the dispatcher's `_taken` counts every job it takes
            if self._closed:
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
        groups: dict[tuple[int, str], list[_Job]] = {}
        for job in jobs:  # a version swap mid-batch: each query keeps the model it started with
            groups.setdefault((id(job.embedder), job.kind), []).append(job)
        for (_, kind), group in groups.items():
            t0 = time.perf_counter()
            try:
                encoded = list(zip(group, _encode(group[0].embedder, kind, [job.payload for job in group])))
            except Exception as exc:
                if len(group) == 1:
                    group[0].future.set_exception(exc)
                    continue
                # One query's input (an image preprocessing cannot take) must not fail its batch-mates.
                encoded = []
                for job in group:
                    try:
                        encoded.append((job, _encode(job.embedder, kind, [job.payload])[0]))
                    except Exception as own:
                        job.future.set_exception(own)
            encode_ms = (time.perf_counter() - t0) * 1000.0
            for job, vector in encoded:
                stats = BatchStats(len(jobs), (started - job.arrived) * 1000.0, encode_ms)
                try:
                    job.future.set_result((job.then(vector[None, :]), stats))
                except Exception as exc:
                    job.future.set_exception(exc)


def _encode(embedder, kind: str, payloads: list) -> np.ndarray:
    return embedder.encode_texts(payloads) if kind == "text" else embedder.encode_images(payloads)


# The name of the text-only batcher this grew from.
TextQueryBatcher = QueryBatcher
