"""Waiting on what happens in the background (a version swap, a worker's run): poll the
condition until it holds or a deadline passes, never sample it once."""

import time


def eventually(condition, timeout_s: float = 120.0, interval_s: float = 0.1):
    """The first truthy value of `condition()` within `timeout_s`; None if it never held."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval_s)
