"""`prism worker`: runs the queued retrain runs, and queues the nightly one, outside the servers.

Serving processes never train: `POST /v1/retrain` only queues a `training_runs` row. Any number
of workers, on any hosts sharing the database, poll the queue; one at a time takes the job lock
and claims the oldest queued run (compare-and-set queued -> running), so a run is never run
twice. With a nightly time, every worker queues that night's run under one key ("nightly:" and
the time in UTC), so two workers firing together, or one after the other, queue it once.

Stopping (SIGTERM, Ctrl-C): a worker that is training abandons the run at the next training
step (recorded as failed, with the reason; the serving version is untouched); one past training
(gate, index build, promotion: minutes at most) finishes it. Then it exits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from datetime import time as clock_time
from pathlib import Path

from feedback.retrain import RetrainConfig, RetrainOutcome, run_queued_retrain
from feedback.schedule import RetrainBusyError, next_run, this_process
from feedback.train import SilentProgress, TrainProgress
from indexer import IndexOptions
from store import Store

log = logging.getLogger(__name__)


class WorkerStopped(Exception):
    """The worker was asked to stop while a run was training: the run is abandoned."""


class _StopAtNextStep:
    """Training progress that ends the training at the next step once the worker is stopping."""

    def __init__(self, inner: TrainProgress, stopping: threading.Event):
        self.inner, self.stopping = inner, stopping

    def start(self, total_steps: int, done_steps: int) -> None:
        self.inner.start(total_steps, done_steps)

    def step(self, step: int, *, loss: float, images_per_s: float, temperature: float) -> None:
        if self.stopping.is_set():
            raise WorkerStopped("the worker was stopped during training; queue the run again (POST /v1/retrain)")
        self.inner.step(step, loss=loss, images_per_s=images_per_s, temperature=temperature)

    def epoch(self, epoch: int, *, mean_loss: float) -> None:
        self.inner.epoch(epoch, mean_loss=mean_loss)

    def finish(self) -> None:
        self.inner.finish()


def nightly_key(due: datetime) -> str:
    """The queue key of the nightly run due at `due` (naive: local time): the same on every host."""
    return f"nightly:{due.astimezone(timezone.utc):%Y-%m-%dT%H:%MZ}"


class RetrainWorker:
    """The loop of `prism worker`. `stop()` (from a signal handler too) ends it as described above."""

    def __init__(
        self,
        store: Store,
        *,
        home: Path,
        config: RetrainConfig = RetrainConfig(),
        index_options: IndexOptions = IndexOptions(),
        device: str = "cpu",
        poll_s: float = 2.0,
        nightly_at: clock_time | None = None,
        name: str | None = None,
        now: Callable[[], datetime] = datetime.now,
        progress: TrainProgress | None = None,
        on_outcome: Callable[[RetrainOutcome], None] | None = None,
        stopping: threading.Event | None = None,
    ):
        self.store, self.home = store, Path(home)
        self.config, self.index_options, self.device = config, index_options, device
        self.poll_s, self.nightly_at, self.now = poll_s, nightly_at, now
        self.name = name or this_process()
        self.progress = progress or SilentProgress()
        self.on_outcome = on_outcome
        # Given by a caller that must take stop requests before the worker exists (signals at start-up).
        self._stopping = stopping or threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, *, max_runs: int | None = None) -> int:
        """Work until stopped (or `max_runs` runs are done); returns how many runs it ran."""
        done = 0
        due = next_run(self.nightly_at, self.now()) if self.nightly_at is not None else None
        if due is not None:
            log.info("worker %s: nightly retrain at %s", self.name, due.isoformat(timespec="minutes"))
        while not self.stopping and (max_runs is None or done < max_runs):
            if due is not None and self.now() >= due:
                self._queue_nightly(due)
                due = next_run(self.nightly_at, self.now())
            outcome = self._run_one()
            if outcome is not None:
                done += 1
                continue  # the queue may hold more: look again at once
            wait = self.poll_s if due is None else min(self.poll_s, max((due - self.now()).total_seconds(), 0.0))
            self._stopping.wait(wait)
        return done

    def _queue_nightly(self, due: datetime) -> None:
        try:
            run, queued = self.store.enqueue_training_run(requested_by="nightly", request_key=nightly_key(due))
        except Exception:
            log.exception("cannot queue the nightly retrain run due at %s", due.isoformat(timespec="minutes"))
            return
        log.info("nightly retrain due at %s: %s", due.isoformat(timespec="minutes"),
                 f"queued as run {run.id}" if queued else f"run {run.id} (queued already, by another worker or request)")

    def _run_one(self) -> RetrainOutcome | None:
        """Run the oldest queued run, if any and if no run holds the job lock."""
        if not self.store.count_training_runs("queued"):
            return None  # the common case, one indexed count: no lock, no clean-up
        try:
            outcome = run_queued_retrain(
                self.store, home=self.home, worker=self.name, config=self.config, index_options=self.index_options,
                device=self.device, progress=_StopAtNextStep(self.progress, self._stopping),
            )
        except RetrainBusyError as exc:
            log.debug("queued run waits: %s", exc)
            return None
        except WorkerStopped as exc:
            log.warning("%s", exc)
            return None
        except Exception:
            log.exception("retrain run failed; the serving version is unchanged")
            return None
        if outcome is not None:
            log.info("retrain run %d: %s, %s%s", outcome.run_id, outcome.status, outcome.decision,
                     f" ({outcome.reason})" if outcome.reason else "")
            if self.on_outcome is not None:
                self.on_outcome(outcome)
        return outcome
