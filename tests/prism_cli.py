"""Run the `prism` CLI in a subprocess, as a user would, for the end-to-end CLI tests."""

import subprocess
import sys
from pathlib import Path

PRISM = [sys.executable, "-m", "api.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run_prism(args, env, check=True, timeout=400):
    proc = subprocess.run(PRISM + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"prism {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
