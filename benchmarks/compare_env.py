"""The separate environment for the alternatives Prism is benchmarked against (clip-retrieval).

clip-retrieval pins its own stack (and old setuptools), so it never goes into Prism's .venv: it
lives in benchmarks/.envs/compare (git-ignored), created on first use and stamped when the install
and an import check succeed. Usage:

    python benchmarks/compare_env.py            # create / check it, print the python and versions
    python benchmarks/compare_env.py --force    # reinstall

    from compare_env import ensure_compare_env  # from another benchmark script
    python = ensure_compare_env()               # Path to the venv's python

Standard library only: it runs with whatever python starts it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV_DIR = HERE / ".envs" / "compare"
STAMP = ENV_DIR / ".prism-compare-installed"

# clip-retrieval 2.45.0 imports pkg_resources, which setuptools 81 removed. autofaiss 2.18 builds
# OPQ with faiss.OPQMatrix(d, M=...), keyword arguments that faiss-cpu 1.14 no longer accepts.
REQUIREMENTS = ["setuptools<81", "clip-retrieval==2.45.0", "autofaiss", "faiss-cpu<1.14"]
CHECK_IMPORTS = ["clip_retrieval", "autofaiss", "faiss", "open_clip", "torch"]
VERSION_PACKAGES = ["clip-retrieval", "autofaiss", "faiss-cpu", "open_clip_torch", "torch", "torchvision", "setuptools"]

_CHECK = f"""
import importlib, json, importlib.metadata as md
for m in {CHECK_IMPORTS!r}:
    importlib.import_module(m)
out = {{}}
for p in {VERSION_PACKAGES!r}:
    try:
        out[p] = md.version(p)
    except md.PackageNotFoundError:
        out[p] = None
print(json.dumps(out))
"""


class CompareEnvError(RuntimeError):
    pass


def env_python(env_dir: Path = ENV_DIR) -> Path:
    return env_dir / "bin" / "python"


def env_bin(name: str, env_dir: Path = ENV_DIR) -> Path:
    return env_dir / "bin" / name


def _log(msg: str) -> None:
    print(f"[compare-env] {msg}", file=sys.stderr, flush=True)


def _base_python() -> str:
    for candidate in ("python3.11",):
        found = shutil.which(candidate)
        if found:
            return found
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    raise CompareEnvError("python3.11 not found on PATH: clip-retrieval's environment needs Python 3.11")


def _run(cmd: list[str], what: str) -> None:
    _log(f"{what}: {' '.join(cmd)}")
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise CompareEnvError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")


def check_env(env_dir: Path = ENV_DIR) -> dict:
    """Import clip_retrieval, autofaiss, faiss, open_clip, torch in the env; return package versions."""
    proc = subprocess.run([str(env_python(env_dir)), "-c", _CHECK], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompareEnvError(f"import check failed in {env_dir}:\n{proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_compare_env(force: bool = False, env_dir: Path = ENV_DIR) -> Path:
    """Create and install the compare venv if it is not stamped yet; return its python."""
    stamp = env_dir / STAMP.name
    python = env_python(env_dir)
    if not force and stamp.exists() and python.exists():
        if json.loads(stamp.read_text()).get("requirements") == REQUIREMENTS:
            return python
        _log("requirements changed since the install: updating")
    if force and env_dir.exists():
        _log(f"removing {env_dir}")
        shutil.rmtree(env_dir)
    stamp.unlink(missing_ok=True)
    if not python.exists():
        env_dir.parent.mkdir(parents=True, exist_ok=True)
        _run([_base_python(), "-m", "venv", str(env_dir)], "create venv")
    _log("installing (torch comes from the local wheel store; ~6 GB, several minutes)")
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *REQUIREMENTS], "pip install")
    versions = check_env(env_dir)
    stamp.write_text(json.dumps({"requirements": REQUIREMENTS, "versions": versions}, indent=2) + "\n")
    _log(f"ready: {python}  {versions}")
    return python


def compare_env_versions(env_dir: Path = ENV_DIR) -> dict:
    """The package versions installed in the env now (it may have changed since it was stamped)."""
    return check_env(env_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="delete and reinstall the environment")
    args = parser.parse_args()
    try:
        python = ensure_compare_env(force=args.force)
        versions = check_env()
    except CompareEnvError as exc:
        sys.exit(f"compare env: {exc}")
    print(python)
    print(json.dumps(versions, indent=2))


if __name__ == "__main__":
    main()
