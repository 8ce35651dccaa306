"""One way to start, wait for and stop the real service (`prism serve` as a subprocess) in
benchmarks and tests, instead of each keeping its own launcher and readiness poll.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrismServer:
    """`prism serve` in its own process group, so SIGKILL takes the whole service (all workers) down at once.

    Its stdout and stderr go to a file, never a pipe: nobody reads a pipe while the server runs,
    and a chatty server would block once the pipe buffer (64 KiB) is full. The file is `log` when
    given (appended to), else a temp file removed by stop(). Errors quote the tail of that output.
    """

    def __init__(self, env: dict[str, str], *, workers: int = 1, port: int | None = None, log: Path | None = None,
                 log_level: str = "warning", root: Path | None = None):
        self.env = dict(env)
        # `prism serve --workers N` makes a fresh metrics directory of its own (and removes it on
        # exit) only when PROMETHEUS_MULTIPROC_DIR is unset (api/cli.py). An inherited one would
        # mix this server's counters with whatever else wrote there (another server, an earlier
        # run, the copy killed with SIGKILL), and would put even one worker in multiprocess mode.
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.workers = workers
        self.port = port or free_port()
        self.log_level = log_level
        # Another source tree to serve from (a benchmark's baseline: the code before a change).
        self.root = root or ROOT
        self.log = log
        self._temp_log: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_path(self) -> Path | None:
        """Where the server's output goes: `log`, or the temp file while one exists."""
        return self.log or self._temp_log

    def start(self, timeout_s: float = 180.0) -> "PrismServer":
        """Start the service (again, after kill(), on the same port) and wait until /readyz answers 200."""
        if self.proc is not None and self.proc.poll() is None:
            # The readiness poll would get its 200 from the running one, and stop() would lose it.
            raise RuntimeError(f"prism serve is already running (pid {self.proc.pid}); stop() or kill() it first")
        if self.log is None and self._temp_log is None:
            fd, name = tempfile.mkstemp(prefix="prism-serve-", suffix=".log")
            os.close(fd)
            self._temp_log = Path(name)
        with open(self.output_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", str(self.workers), "--log-level", self.log_level],
                cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_ready(timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, index_version: str | None = None, timeout_s: float = 300.0) -> dict:
        """The /readyz JSON once it answers 200 (and serves `index_version`, when given).

        RuntimeError, with the tail of the server's output, if the server exits or time runs out."""
        import httpx

        if self.proc is None:
            raise RuntimeError("prism serve was not started")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                r = httpx.get(self.url + "/readyz", timeout=5)
                if r.status_code == 200:
                    body = r.json()
                    if index_version is None or body.get("index_version") == index_version:
                        return body
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"prism serve exited with {self.proc.returncode}{self._output_note()}")
            if time.monotonic() > deadline:
                what = f"serving index version {index_version}" if index_version else "ready"
                raise RuntimeError(f"prism serve was not {what} within {timeout_s:.0f} s{self._output_note()}")
            time.sleep(0.25)

    def output_tail(self, n: int = 3000) -> str:
        """The last `n` characters (bytes, decoded) of the server's output so far."""
        path = self.output_path
        if path is None or not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read().decode(errors="replace")

    def _output_note(self) -> str:
        where = f" (all of it in {self.log})" if self.log else ""
        return f"; its output ends{where}:\n{self.output_tail()}"

    def _signal_group(self, sig: int) -> None:
        # The whole group, even when the supervisor is gone: its workers may still hold the port.
        # A group id is not reused while any member lives, and `proc` is dropped once the group
        # has been stopped, so this never signals a later process that got the same id.
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to every process of the service: no shutdown handler, no flush, no goodbye."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM to the service (SIGKILL after 30 s), then remove the temp output file, if any."""
        if self.proc is not None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
                self.proc = None
            except subprocess.TimeoutExpired:
                self.kill()
        if self._temp_log is not None:
            self._temp_log.unlink(missing_ok=True)
            self._temp_log = None

    def __enter__(self) -> "PrismServer":
        """start() with its default timeout, unless already running: `with PrismServer(env).start(timeout_s=60) as s:`."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
