"""When the retrain job runs, and the lock that keeps two runs from overlapping."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from datetime import time as clock_time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "retrain.lock"


class RetrainBusyError(RuntimeError):
    """Another retrain run holds the job lock."""


@contextlib.contextmanager
def job_lock(home: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on PRISM_HOME/retrain.lock for the length of a run.

    The kernel drops an flock when its holder dies, so a killed run never leaves a stale lock.
    It covers every process on this host that shares PRISM_HOME (CLI, cron, servers).
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise RetrainBusyError(f"a retrain run is already under way (pid {holder}); try again when it ends") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_running(home: Path) -> bool:
    try:
        with job_lock(home):
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
