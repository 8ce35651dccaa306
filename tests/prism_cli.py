"""Run the `prism` CLI as a user would, for the end-to-end CLI tests.

By default a command runs inside the test process, through the same entry point as the `prism`
script (`api.cli.main`), with the environment, argv, working directory, stdout and stderr it
would have in a subprocess of its own. What that saves is the interpreter start and the imports
of torch, open_clip and transformers (5-7 s a command on 2 cores), paid once per test session
instead of once per command: the suite runs a few hundred commands.

`fresh_process=True` runs a real subprocess. Use it where the process itself is under test: its
start-up cost or imports, signals, exit on a crash, or state a long-lived test process must not
share (Ray, a server).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

PRISM = [sys.executable, "-m", "api.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run_prism(args, env, check=True, timeout=400, *, fresh_process=False):
    args = [str(a) for a in args]
    if fresh_process:
        proc = subprocess.run(PRISM + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    else:
        proc = _run_in_process(args, env)
    if check and proc.returncode != 0:
        raise AssertionError(f"prism {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_in_process(args: list[str], env: dict) -> subprocess.CompletedProcess:
    from api.cli import main

    out, err = _Stream(), _Stream()
    code = 0
    with _process_state(env, args, err):
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = _exit_code(exc.code, err)
            except KeyboardInterrupt:
                raise
            except BaseException:  # what a subprocess would print before exiting 1
                traceback.print_exc(file=err)
                code = 1
    return subprocess.CompletedProcess(PRISM + args, code, out.getvalue(), err.getvalue())


class _Stream(io.StringIO):
    """A pipe as the CLI sees one: text, not a terminal, with the encoding a pipe would have."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # as io.StringIO says, but some callers only catch OSError
        raise io.UnsupportedOperation("fileno")


def _exit_code(code, err: io.StringIO) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=err)  # sys.exit("message") prints it and exits 1
    return 1


def _fresh_process_warning_filters() -> None:
    """Python's own defaults, which a new interpreter starts with; resetting them also forgets
    which warnings were already shown, so each command shows its warnings as a fresh process does."""
    warnings.resetwarnings()
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")


@contextlib.contextmanager
def _process_state(env: dict, args: list[str], err: io.StringIO):
    """The parts of a process a command reads or changes: environment, argv, working directory,
    warning filters, the root logger's stderr handler, torch's thread count. Restored after."""
    import torch

    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_threads = torch.get_num_threads()
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    os.environ.clear()
    os.environ.update({k: str(v) for k, v in env.items()})
    sys.argv = [str(ROOT / "api" / "cli.py"), *args]
    os.chdir(ROOT)
    # A subprocess's logging.basicConfig would find no handler and write to its stderr.
    root.handlers = [h for h in root.handlers if type(h).__module__.startswith("_pytest")]
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            _fresh_process_warning_filters()
            yield
    finally:
        root.handlers, root.level = saved_handlers, saved_level
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
