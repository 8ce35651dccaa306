"""When the retrain job runs, and the lock that keeps two runs from overlapping."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from datetime import time as clock_time
from pathlib import Path

from store import LockBusyError, Store

log = logging.getLogger(__name__)

LOCK_FILE = "retrain.lock"
JOB_LOCK = "retrain-job"


def this_process() -> str:
    """How runs and locks name the process that holds them: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RetrainBusyError(RuntimeError):
    """Another retrain run holds the job lock."""


@contextlib.contextmanager
def job_lock(store: Store, home: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock for the length of a run, over every process that uses the
    home's database: CLI runs, cron and `prism worker`s on any host.

    `Store.cluster_lock`: a PostgreSQL advisory lock (ends with its holder's session), or on
    SQLite an flock on PRISM_HOME/retrain.lock (the kernel drops it when its holder dies), so a
    killed run never leaves a stale lock.
    """
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(store.cluster_lock(JOB_LOCK, wait=False, path=Path(home) / LOCK_FILE))
        except LockBusyError as exc:
            raise RetrainBusyError(f"a retrain run is already under way ({exc.holder}); try again when it ends") from None
        yield


def is_running(store: Store, home: Path) -> bool:
    try:
        with job_lock(store, home):
            return False
    except RetrainBusyError:
        return True


def next_run(at: clock_time, now: datetime) -> datetime:
    """The next time of day `at` after `now` (in now's time zone, local if naive)."""
    candidate = now.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + timedelta(days=1)


def run_nightly(
    job: Callable[[], object],
    at: clock_time,
    *,
    now: Callable[[], datetime] = datetime.now,
    sleep: Callable[[float], None] = time.sleep,
    runs: int | None = None,
) -> None:
    """Run `job` every day at `at` (local time), forever or `runs` times; a failed run is logged, not fatal."""
    done = 0
    while runs is None or done < runs:
        due = next_run(at, now())
        log.info("next retrain run at %s", due.isoformat(timespec="minutes"))
        while (left := (due - now()).total_seconds()) > 0:
            sleep(min(left, 60.0))
        try:
            job()
        except RetrainBusyError as exc:
            log.warning("skipped tonight's run: %s", exc)
        except Exception:
            log.exception("retrain run failed; the serving version is unchanged")
        done += 1
