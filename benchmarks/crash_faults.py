"""Crash safety under SIGKILL: `prism index`, an index-version build, `prism retrain`.

Each scenario drives the real CLI (`python -m api.cli ...`, cwd = the repository) against a real
PRISM_HOME, kills it with SIGKILL at chosen points (one run per point, state piling up from one
kill to the next as it would on a host that keeps crashing), and after every kill checks through
the store and the files that:

- the active index version is the one active before the run, all its files are there and match
  their sha256, and a search returns results from it (an in-process `SearchEngine` kept across
  the whole scenario, as a running server is, so it also shows that a server never swaps to a
  half-built version);
- no `index_versions` row points at a missing or incomplete directory, and no version that was
  ever activated is incomplete ("no partial version is ever activated");
- no `model_versions` row of a Prism-written model points at a missing or incomplete directory;
- the locks (`indexes/.build.lock`, `retrain.lock`) are free again;
- the directories a dead run leaves (temp dirs, unrecorded versions) cannot be activated.

Then it reruns the same command to completion and checks that it succeeds, activates a complete
version, and leaves nothing behind: no `indexes/.tmp-*`, no index or model directory without its
SQL row, no `models/.*.tmp-*`, nothing in `models/.training/`, no half-written embedding shard,
no training run still marked running, no lock still held.

Kill points come two ways:

- stage points (exact): the CLI runs behind a small bootstrap (`_shim_main`) that writes the
  pipeline's progress stages and the calls named in the fault to a trace file and, at the one
  point named in the CRASH_FAULT environment variable, SIGKILLs its own process: part-way
  through a stage ("embed images" at 50 %), before or after a named call
  (`Store.record_index_version`), before or after a rename whose source matches a pattern
  (`.tmp-*`). With no fault set the bootstrap is exactly `python -m api.cli`: it only wraps.
- time points: what an operator's `kill -9` does. The parent SIGKILLs the process a given number
  of seconds after starting it, spread over the measured duration of an unkilled run; the trace
  says which stage that landed in. A run that finishes before its kill is recorded as such, and
  the next attempt gets a catalog with new products, so it has work to be killed in again.

Sizes are parameters; the tests run small ones, `make reliability` (benchmarks/reliability.py ->
`run_all`) bigger ones. Standalone:

    python benchmarks/crash_faults.py [--quick] [--scenario index build retrain] [--products 2000]
        [--time-kills 3] [--demo-home DIR] [--root DIR] [--out benchmarks/results/crash_faults.json]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TINY = "prism-tiny-vit:random"
FAULT_ENV = "CRASH_FAULT"
TRACE_ENV = "CRASH_FAULT_TRACE"
QUERY = "red shoe"

# The bootstrap: `python -c BOOT ARGS...` runs `prism ARGS...` with the fault hooks installed.
BOOT = f"import sys; sys.path.insert(0, {str(HERE)!r}); import crash_faults; crash_faults._shim_main()"

# ---------------------------------------------------------------- kill points, in pipeline order

# `prism index CATALOG` on a home that already serves a version.
INDEX_POINTS = [
    ("ingest", {"kind": "call", "target": "store.db:Store.upsert_products", "when": "after"}),
    ("embed-texts", {"kind": "stage", "stage": "embed texts", "at": 0.5}),
    ("embed-images", {"kind": "stage", "stage": "embed images", "at": 0.5}),
    ("cache-shard-write", {"kind": "rename", "pattern": ".part-*.tmp", "when": "before"}),
    ("faiss-build", {"kind": "stage", "stage": "build indexes", "at": 0.5}),
    ("version-write", {"kind": "rename", "pattern": ".tmp-*", "when": "before"}),
    ("before-activate", {"kind": "call", "target": "store.db:Store.record_index_version", "when": "before"}),
]

# `prism index CATALOG --model OTHER`: a new model's index version for an unchanged catalog.
BUILD_POINTS = [
    ("embed-images", {"kind": "stage", "stage": "embed images", "at": 0.5}),
    ("faiss-build-start", {"kind": "stage", "stage": "build indexes", "at": 0.0}),
    ("model-registered", {"kind": "call", "target": "store.db:Store.register_model_version", "when": "after"}),
    ("index-files-half-written", {"kind": "call", "target": "indexer.versions:file_sha256", "when": "after"}),
    ("version-write", {"kind": "rename", "pattern": ".tmp-*", "when": "before"}),
    ("before-activate", {"kind": "call", "target": "store.db:Store.record_index_version", "when": "before"}),
]

# `prism retrain` with a gate the candidate clears.
RETRAIN_POINTS = [
    ("fine-tune", {"kind": "stage", "stage": "train", "at": 0.5}),
    ("gate", {"kind": "call", "target": "feedback.retrain:gate_candidate", "when": "before"}),
    ("model-write", {"kind": "rename", "pattern": ".ft-*.tmp-*", "when": "before"}),
    ("model-unregistered", {"kind": "rename", "pattern": ".ft-*.tmp-*", "when": "after"}),
    ("re-embed", {"kind": "stage", "stage": "embed images", "at": 0.5}),
    ("index-write", {"kind": "rename", "pattern": ".tmp-*", "when": "before"}),
    ("before-activate", {"kind": "call", "target": "store.db:Store.activate_index_version", "when": "before"}),
]


def pick_points(points: list, n: int | None = None, names: list[str] | None = None) -> list:
    """The points named (in pipeline order), or n of them spread over the pipeline (first and last
    included), or all."""
    if names is not None:
        unknown = set(names) - {label for label, _ in points}
        if unknown:
            raise ValueError(f"unknown kill points {sorted(unknown)}; known: {[label for label, _ in points]}")
        return [(label, fault) for label, fault in points if label in names]
    if n is None or n >= len(points):
        return list(points)
    if n <= 1:
        return [points[-1]] if n == 1 else []
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


# ---------------------------------------------------------------- the bootstrap (child side)


class _Shim:
    """Inside the `prism` process: trace stages and calls, SIGKILL ourselves at the named point."""

    def __init__(self, fault: dict | None, trace: str | None):
        self.fault = fault or None
        self.fh = open(trace, "a", buffering=1) if trace else None
        self.lock = threading.Lock()
        self.seen = Counter()

    def emit(self, event: str, **fields) -> None:
        if self.fh is None:
            return
        with self.lock:
            self.fh.write(json.dumps({"wall": time.time(), "event": event, **fields}) + "\n")
            self.fh.flush()

    def die(self, where: str) -> None:
        self.emit("kill", where=where)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached: SIGKILL cannot be caught

    def install(self) -> None:
        self._trace_stages()
        fault = self.fault
        if fault is None:
            return
        if fault["kind"] == "call":
            self._hook_call(fault["target"], fault.get("when", "before"), int(fault.get("nth", 1)))
        elif fault["kind"] == "rename":
            self._hook_rename(fault["pattern"], fault.get("when", "before"), int(fault.get("nth", 1)))

    # stages: the indexer's Progress and the trainer's TrainProgress, wrapped wherever they are made
    def _trace_stages(self) -> None:
        import feedback.retrain
        import indexer.pipeline

        shim = self
        init = indexer.pipeline.CatalogIndexer.__init__

        def traced_init(this, *args, **kwargs):
            init(this, *args, **kwargs)
            this.progress = _TracedProgress(this.progress, shim)

        indexer.pipeline.CatalogIndexer.__init__ = traced_init
        train = feedback.retrain.train_contrastive

        def traced_train(*args, progress=None, **kwargs):
            return train(*args, progress=_TracedTrain(progress, shim), **kwargs)

        feedback.retrain.train_contrastive = traced_train

    def stage_point(self, stage: str, done: int, total: int | None, finished: bool = False) -> None:
        f = self.fault
        if f is None or f["kind"] != "stage" or f["stage"] != stage:
            return
        at = float(f.get("at", 0.0))
        if (total and done >= at * total) or (at == 0.0 and not finished) or (finished and not total):
            self.die(f"stage {stage} at {done}/{total}")

    def _hook_call(self, target: str, when: str, nth: int) -> None:
        import importlib

        module_name, _, attr_path = target.partition(":")
        owner = importlib.import_module(module_name)
        *parents, name = attr_path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = getattr(owner, name)
        shim = self

        def hooked(*args, **kwargs):
            shim.seen[target] += 1
            hit = shim.seen[target] == nth
            shim.emit("call", target=target, n=shim.seen[target])
            if hit and when == "before":
                shim.die(f"before {target}")
            result = original(*args, **kwargs)
            if hit and when == "after":
                shim.die(f"after {target}")
            return result

        setattr(owner, name, hooked)

    def _hook_rename(self, pattern: str, when: str, nth: int) -> None:
        shim = self

        def wrap(original, label):
            def hooked(src, dst, *args, **kwargs):
                name = Path(os.fsdecode(src)).name
                hit = False
                if fnmatch.fnmatch(name, pattern):
                    shim.seen[pattern] += 1
                    hit = shim.seen[pattern] == nth
                    shim.emit("rename", src=name, dst=Path(os.fsdecode(dst)).name)
                if hit and when == "before":
                    shim.die(f"before {label} {name}")
                result = original(src, dst, *args, **kwargs)
                if hit and when == "after":
                    shim.die(f"after {label} {name}")
                return result

            return hooked

        os.rename = wrap(os.rename, "rename")
        os.replace = wrap(os.replace, "replace")


class _TracedProgress:
    def __init__(self, inner, shim: _Shim):
        self.inner, self.shim = inner, shim
        self.totals: dict[str, int | None] = {}
        self.done: Counter = Counter()

    def start(self, stage: str, total: int | None) -> None:
        self.inner.start(stage, total)
        self.totals[stage], self.done[stage] = total, 0
        self.shim.emit("stage", stage=stage, total=total)
        self.shim.stage_point(stage, 0, total)

    def advance(self, stage: str, n: int = 1) -> None:
        self.inner.advance(stage, n)
        self.done[stage] += n
        self.shim.stage_point(stage, self.done[stage], self.totals.get(stage))

    def finish(self, stage: str) -> None:
        self.inner.finish(stage)
        self.shim.emit("stage-done", stage=stage, done=self.done[stage])
        self.shim.stage_point(stage, self.done[stage], self.totals.get(stage), finished=True)


class _TracedTrain:
    def __init__(self, inner, shim: _Shim):
        from feedback.train import SilentProgress

        self.inner, self.shim = inner or SilentProgress(), shim
        self.total = 0

    def start(self, total_steps: int, done_steps: int) -> None:
        self.inner.start(total_steps, done_steps)
        self.total = total_steps
        self.shim.emit("stage", stage="train", total=total_steps)
        self.shim.stage_point("train", done_steps, total_steps)

    def step(self, step: int, **kwargs) -> None:
        self.inner.step(step, **kwargs)
        self.shim.stage_point("train", step, self.total)

    def epoch(self, epoch: int, **kwargs) -> None:
        self.inner.epoch(epoch, **kwargs)

    def finish(self) -> None:
        self.inner.finish()
        self.shim.emit("stage-done", stage="train")


def _shim_main() -> None:
    fault = json.loads(os.environ.get(FAULT_ENV) or "null")
    shim = _Shim(fault, os.environ.get(TRACE_ENV) or None)
    shim.emit("boot")
    shim.install()
    from api.cli import main

    sys.argv[0] = "prism"
    main()


# ---------------------------------------------------------------- running the CLI (parent side)


def run_prism(args: list[str], env: dict, *, fault: dict | None = None, trace: Path | None = None,
              timeout: float = 1200) -> dict:
    """Run `prism ARGS` (through the bootstrap); with a fault, expect it to die by SIGKILL there.

    `fault` is a stage/call/rename point (the process kills itself there) or {"kind": "time",
    "seconds": s} (this process kills it s seconds after starting it)."""
    env = {k: v for k, v in env.items() if k not in (FAULT_ENV, TRACE_ENV)}
    if fault is not None and fault["kind"] != "time":
        env[FAULT_ENV] = json.dumps(fault)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.unlink(missing_ok=True)
        env[TRACE_ENV] = str(trace)
    started_wall, started = time.time(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", BOOT, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at = None
    try:
        if fault is not None and fault["kind"] == "time":
            try:
                out, err = proc.communicate(timeout=float(fault["seconds"]))
            except subprocess.TimeoutExpired:
                killed_at = time.perf_counter() - started
                os.kill(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
        else:
            out, err = proc.communicate(timeout=timeout)
    except BaseException:  # a timeout, Ctrl-C, a failing caller: never leave the child running
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    events = _read_trace(trace)
    kill = next((e for e in events if e["event"] == "kill"), None)
    if kill is not None:
        killed_at = kill["wall"] - started_wall
    return {
        "args": args,
        "returncode": proc.returncode,
        "killed": proc.returncode == -signal.SIGKILL,
        "killed_at_s": None if killed_at is None else round(killed_at, 2),
        "where": kill["where"] if kill else None,
        "stage": _stage_at_end(events),
        "wall_s": round(time.perf_counter() - started, 2),
        "stdout": out,
        "stderr": err,
    }


def _read_trace(trace: Path | None) -> list[dict]:
    if trace is None or not trace.exists():
        return []
    events = []
    for line in trace.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return events


def _stage_at_end(events: list[dict]) -> str:
    """The stage the process was in when it ended (or 'startup' before any stage began)."""
    current = "startup"
    for e in events:
        if e["event"] == "stage":
            current = e["stage"]
        elif e["event"] == "stage-done":
            current = f"after {e['stage']}"
    return current


def _json_out(run: dict) -> dict | None:
    text = run["stdout"].strip()
    if run["returncode"] != 0 or not text:
        return None
    try:
        return json.loads(text[text.index("{"):])
    except ValueError:
        return None


# ---------------------------------------------------------------- what a home looks like


def held_locks(home: Path, store=None) -> list[str]:
    """The locks some live process holds: lock files (flock), relative to home, and on PostgreSQL
    (with `store`) the cluster-wide advisory locks, as `advisory:NAME`."""
    import fcntl

    held = []
    if store is not None and store.engine.dialect.name == "postgresql":
        from store import LockBusyError

        for name in ("index-build", "retrain-job"):
            try:
                with store.cluster_lock(name, wait=False):
                    pass
            except LockBusyError:
                held.append(f"advisory:{name}")
    for path in (Path(home) / "indexes" / ".build.lock", Path(home) / "retrain.lock",
                 Path(home) / "embeddings" / ".writers.lock"):
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held.append(str(path.relative_to(home)))
        finally:
            os.close(fd)
    return held


def find_leftovers(home: Path, store) -> list[str]:
    """What a dead run can leave behind and nothing may keep: temp dirs and files, unrecorded versions."""
    home = Path(home)
    out: list[str] = []
    recorded = {v.index_version for v in store.list_index_versions()}
    registered = {m.model_version for m in store.list_model_versions()}
    indexes = home / "indexes"
    if indexes.is_dir():
        for p in sorted(indexes.iterdir()):
            if p.name.startswith((".tmp-", ".pending-")):
                out.append(f"indexes/{p.name}")
            elif p.is_dir() and p.name not in recorded:
                out.append(f"indexes/{p.name} (no index_versions row)")
    models = home / "models"
    if models.is_dir():
        for p in sorted(models.iterdir()):
            if p.name == ".training":
                out += [f"models/.training/{q.name}" for q in sorted(p.iterdir())]
            elif p.name.startswith(".pending-") or (p.name.startswith(".") and ".tmp-" in p.name):
                out.append(f"models/{p.name}")
            elif p.is_dir() and (p / "model.json").is_file() and p.name not in registered:
                out.append(f"models/{p.name} (no model_versions row)")
    for p in sorted(home.glob("embeddings/*/.*.tmp")):
        out.append(str(p.relative_to(home)))
    for p in sorted(home.glob("downloads/.*.part")):
        out.append(str(p.relative_to(home)))
    seen = set(out)
    for p in home.rglob("*"):
        if p.name.endswith((".partial", ".tmp")) or fnmatch.fnmatch(p.name, "*.tmp-*"):
            rel = str(p.relative_to(home))
            if not any(rel == s.split(" ")[0] or rel.startswith(s.split(" ")[0] + "/") for s in seen):
                out.append(rel)
    return out


class HomeInspector:
    """Looks at one PRISM_HOME between runs, through the store, the files and a search engine that
    stays up for the whole scenario as a server would."""

    def __init__(self, home: Path, db_url: str, *, query: str = QUERY):
        import warnings

        from search import SearchEngine
        from store import Store

        self.home = Path(home)
        self.store = Store.open(db_url)
        self.query = query
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.engine = SearchEngine(self.store, indexes_dir=self.home / "indexes", models_dir=self.home / "models", device="cpu")
        self.ever_active: set[str] = set()

    def close(self) -> None:
        self.engine.close()
        self.store.close()

    def active(self) -> str | None:
        v = self.store.active_index_version()
        return v.index_version if v else None

    def inspect(self) -> dict:
        import warnings

        from indexer import index_version_path, load_index_version

        active = self.store.active_index_version()
        if active is not None:
            self.ever_active.add(active.index_version)
        broken, activated_broken = [], []
        for v in self.store.list_index_versions():
            if v.activated_at is not None or v.is_active:
                self.ever_active.add(v.index_version)
            try:
                load_index_version(index_version_path(self.home / "indexes", v.path), verify=True)
            except Exception as exc:
                broken.append(f"{v.index_version}: {exc}")
                if v.index_version in self.ever_active:
                    activated_broken.append(v.index_version)
        broken_models = []
        for m in self.store.list_model_versions():
            folder = self.home / "models" / m.model_version
            if not (folder.exists() or m.info.get("checkpoint")):
                continue  # a spec Prism did not write (e.g. ARCH:random): nothing on disk to check
            checkpoint = folder / m.info.get("checkpoint", "checkpoint.pt")
            if not (folder / "model.json").is_file() or not checkpoint.is_file():
                broken_models.append(m.model_version)
        out = {
            "active": active.index_version if active else None,
            "active_model": active.model_version if active else None,
            "broken_index_versions": broken,
            "activated_broken": activated_broken,
            "broken_model_versions": broken_models,
            "leftovers": find_leftovers(self.home, self.store),
            "locks_held": held_locks(self.home, self.store),
            "running_training_runs": sum(1 for r in self.store.list_training_runs() if r.status == "running"),
        }
        served = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if out["active"] is not None:
                    # A server running across the kill loads a newly active version in the
                    # background and swaps it in once loaded: wait for that (or give up on it).
                    self.engine.wait_until_serving(out["active"], timeout_s=180)
                for target in ("image", "text"):
                    result = self.engine.search(text=self.query, target=target, k=5)
                    served[target] = (len(result.hits), result.index_version)
            out["served_ok"] = all(n > 0 and v == out["active"] for n, v in served.values())
            out["served_version"] = served["image"][1]
            out["hits"] = served["image"][0]
        except Exception as exc:
            out["served_ok"], out["served_error"] = False, f"{type(exc).__name__}: {exc}"
        return out


def _refused_activations(env: dict, names: list[str]) -> dict:
    """`prism models activate NAME` for each name that must not be activatable: True when refused."""
    out = {}
    for name in names:
        run = run_prism(["models", "activate", name], env)
        out[name] = run["returncode"] != 0 and "Traceback" not in run["stderr"]
    return out


def _unactivatable_names(before: dict, after: dict) -> list[str]:
    """Names of the directories the last dead run left (temp dirs, versions without a SQL row)."""
    names = []
    for entry in after["leftovers"]:
        path = entry.split(" ")[0]
        if entry not in before["leftovers"] and path.startswith(("indexes/", "models/")) and path.count("/") == 1:
            name = path.split("/", 1)[1]
            if not name.startswith(".pending-"):  # a marker file, not a version
                names.append(name)
    return names


class _Scenario:
    """Bookkeeping shared by the scenarios: kill, inspect, compare; the result dict."""

    def __init__(self, name: str, home: Path, workdir: Path, env: dict, db_url: str, **info):
        self.name, self.home, self.workdir, self.env, self.db_url = name, Path(home), Path(workdir), env, db_url
        self.inspector = HomeInspector(self.home, db_url)
        self.started = time.perf_counter()
        self.result: dict = {"scenario": name, "database": "postgresql" if db_url.startswith("postgres") else "sqlite",
                             **info, "kill_points": [], "failures": []}
        self.n = 0
        self._last_state: dict | None = None

    def fail(self, message: str) -> None:
        self.result["failures"].append(message)

    def result_kills(self) -> int:
        return sum(1 for k in self.result["kill_points"] if k["killed"])

    def attempt(self, label: str, fault: dict, args: list[str], expected_active: str | None,
                *, must_kill: bool = True, refuse: bool = True) -> dict:
        """One killed run and what it left: the point's entry in result['kill_points']."""
        self.n += 1
        before = self._last_state or self.inspector.inspect()
        run = run_prism(args, self.env, fault=fault, trace=self.workdir / "traces" / f"{self.name}-{self.n}.jsonl")
        state = self.inspector.inspect()
        self._last_state = state
        entry = {
            "point": label, "how": "time" if fault["kind"] == "time" else "stage", "fault": fault,
            "killed": run["killed"], "returncode": run["returncode"], "killed_at_s": run["killed_at_s"],
            "stage": run["stage"], "where": run["where"], "run_s": run["wall_s"],
            "active_after_kill": state["active"], "served_ok": state["served_ok"], "hits": state.get("hits", 0),
            "broken_index_versions": state["broken_index_versions"], "activated_broken": state["activated_broken"],
            "broken_model_versions": state["broken_model_versions"], "leftovers": state["leftovers"],
            "locks_held": state["locks_held"],
        }
        if run["killed"]:
            entry["active_unchanged"] = state["active"] == expected_active
            if not entry["active_unchanged"]:
                self.fail(f"{label}: active version {state['active']} after the kill, expected {expected_active}")
            if refuse:
                names = _unactivatable_names(before, state)
                entry["refused_activation"] = _refused_activations(self.env, names)
                for name, refused in entry["refused_activation"].items():
                    if not refused:
                        self.fail(f"{label}: `prism models activate {name}` (a dead run's leftover) was accepted")
        elif must_kill:
            self.fail(f"{label}: the run ended before its kill point (exit {run['returncode']}): "
                      f"{run['stdout'][-800:]} {run['stderr'][-800:]}")
        elif run["returncode"] != 0:
            self.fail(f"{label}: the run finished before its kill but failed: {run['stderr'][-800:]}")
        if not state["served_ok"]:
            self.fail(f"{label}: search failed after the kill: {state.get('served_error', state)}")
        for key in ("broken_index_versions", "activated_broken", "broken_model_versions", "locks_held"):
            if state[key]:
                self.fail(f"{label}: {key}: {state[key]}")
        entry["stderr_tail"] = "" if run["killed"] or run["returncode"] == 0 else run["stderr"][-1500:]
        self.result["kill_points"].append(entry)
        return entry

    def finish(self, rerun: dict, state: dict, *, expect_new_version: bool = True) -> dict:
        r = self.result
        kills = [k for k in r["kill_points"] if k["killed"]]
        r["kills"] = len(kills)
        r["kill_points_s"] = [k["killed_at_s"] for k in kills]
        r["kill_stages"] = [k["stage"] for k in kills]
        r["served_ok_after_kill"] = all(k["served_ok"] for k in r["kill_points"])
        r["active_after_kill"] = sorted({k["active_after_kill"] for k in kills if k["active_after_kill"]})
        r["partial_versions_activated"] = len(
            {v for k in r["kill_points"] for v in k["activated_broken"]} | set(state["activated_broken"]))
        r["rows_pointing_to_partial"] = len(
            {b for k in r["kill_points"] for b in k["broken_index_versions"] + k["broken_model_versions"]}
            | set(state["broken_index_versions"] + state["broken_model_versions"]))
        r["leftovers_before_rerun"] = r["kill_points"][-1]["leftovers"] if r["kill_points"] else []
        r["rerun_ok"] = rerun["returncode"] == 0
        r["rerun_s"] = rerun["wall_s"]
        r["active_after_rerun"] = state["active"]
        r["served_ok_after_rerun"] = state["served_ok"]
        r["leftovers_after_rerun"] = state["leftovers"]
        r["locks_held_after_rerun"] = state["locks_held"]
        r["running_training_runs_after_rerun"] = state["running_training_runs"]
        r["ever_active"] = sorted(self.inspector.ever_active)
        if not r["rerun_ok"]:
            self.fail(f"the rerun failed (exit {rerun['returncode']}): {rerun['stderr'][-1500:]}")
        if expect_new_version and state["active"] == r.get("active_before"):
            self.fail("the rerun did not activate a new version")
        if not state["served_ok"]:
            self.fail(f"search failed after the rerun: {state.get('served_error', state)}")
        for key in ("broken_index_versions", "broken_model_versions", "leftovers", "locks_held"):
            if state[key]:
                self.fail(f"after the rerun: {key}: {state[key]}")
        if state["running_training_runs"]:
            self.fail(f"after the rerun: {state['running_training_runs']} training run(s) still marked running")
        r["seconds"] = round(time.perf_counter() - self.started, 1)
        r["ok"] = not r["failures"]
        self.inspector.close()
        return r


def _base_env(home: Path, env: dict | None, db_url: str | None, **extra) -> tuple[dict, str]:
    Path(home).mkdir(parents=True, exist_ok=True)
    env = {**(env if env is not None else os.environ), "PRISM_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PRISM_DEVICE": "cpu", "PYTHONWARNINGS": "ignore", **{k: str(v) for k, v in extra.items()}}
    if db_url:  # what the CLI runs and this process's store must both use
        env["PRISM_DATABASE_URL"] = db_url
    db_url = db_url or env.get("PRISM_DATABASE_URL") or f"sqlite:///{Path(home).resolve() / 'prism.db'}"
    return env, db_url


def _check_setup(run: dict, what: str) -> None:
    if run["returncode"] != 0:
        raise RuntimeError(f"{what} failed (exit {run['returncode']}):\n{run['stderr'][-3000:]}")


# ---------------------------------------------------------------- (a) prism index


def index_scenario(home: Path, workdir: Path, *, products: int = 300, kills: int | None = None,
                   points: list[str] | None = None, time_kills: int = 0, env: dict | None = None,
                   db_url: str | None = None, model: str = TINY, batch_size: int = 16,
                   flat_threshold: int | None = None) -> dict:
    """SIGKILL `prism index CATALOG` at stage points (`points` by name, or `kills` of
    them spread over the pipeline, or all) and `time_kills` time points.

    The home first serves `products // 2` products (an unkilled `prism index`, also the reference
    duration for time kills); every killed run indexes a catalog with `products - products // 2`
    more. The rerun indexes the newest catalog to completion."""
    from sample_catalog import make_catalog

    workdir = Path(workdir)
    extra = {"PRISM_MODEL": model, "PRISM_BATCH_SIZE": batch_size}
    if flat_threshold is not None:
        extra["PRISM_FLAT_THRESHOLD"] = flat_threshold
    env, db_url = _base_env(home, env, db_url, **extra)
    base, step = products // 2, products - products // 2

    def catalog(generation: int) -> Path:
        return make_catalog(workdir / "catalog", base + generation * step, name=f"catalog-g{generation}")

    setup = run_prism(["index", str(catalog(0)), "--json"], env, trace=workdir / "traces" / "index-setup.jsonl")
    _check_setup(setup, "indexing the first catalog")
    sc = _Scenario("index", home, workdir, env, db_url, products=products, model=model)
    active_before = sc.inspector.active()
    sc.result.update(active_before=active_before, reference_run_s=setup["wall_s"])
    generation, expected = 1, active_before
    plan = [(f"time {i + 1}/{time_kills}",
             {"kind": "time", "seconds": round(setup["wall_s"] * (i + 1) / (time_kills + 1), 2)})
            for i in range(time_kills)]
    plan += pick_points(INDEX_POINTS, kills, points)
    for label, fault in plan:
        entry = sc.attempt(label, fault, ["index", str(catalog(generation)), "--json"], expected,
                           must_kill=fault["kind"] != "time")
        entry["catalog_products"] = base + generation * step
        if not entry["killed"]:  # it finished: the next attempt gets new products to be killed in
            expected = entry["active_after_kill"]
            generation += 1
    final = catalog(generation)
    rerun = run_prism(["index", str(final), "--json"], env, trace=workdir / "traces" / "index-rerun.jsonl")
    state = sc.inspector.inspect()
    summary = _json_out(rerun) or {}
    sc.result["rerun_summary"] = {k: summary.get(k) for k in ("products_indexed", "images_embedded", "images_cached",
                                                              "texts_embedded", "texts_cached", "index_version")}
    if summary.get("index_version") != state["active"]:
        sc.fail(f"the rerun's version {summary.get('index_version')} is not the active one ({state['active']})")
    if summary.get("products_indexed") != base + generation * step:
        sc.fail(f"the rerun indexed {summary.get('products_indexed')} products, not {base + generation * step}")
    return sc.finish(rerun, state)


# ---------------------------------------------------------------- (b) an index-version build


def build_scenario(home: Path, workdir: Path, *, products: int = 300, kills: int | None = None,
                   points: list[str] | None = None, env: dict | None = None, db_url: str | None = None,
                   batch_size: int = 16,
                   flat_threshold: int | None = None) -> dict:
    """SIGKILL the build of a new index version for a second model (`prism index CATALOG --model B`).

    The catalog is indexed and served with model A (tiny ViT, random); model B is the same
    architecture with other weights, so the run only ingests nothing new, embeds with B and
    builds. After every kill `prism models activate B` must be refused (B has no complete index
    version), and after the rerun A and B's versions must both roll back and forward."""
    from embed_throughput import save_random_checkpoint
    from sample_catalog import make_catalog

    workdir = Path(workdir)
    extra = {"PRISM_MODEL": TINY, "PRISM_BATCH_SIZE": batch_size}
    if flat_threshold is not None:
        extra["PRISM_FLAT_THRESHOLD"] = flat_threshold
    env, db_url = _base_env(home, env, db_url, **extra)
    catalog = make_catalog(workdir / "catalog", products, name="catalog-build")
    setup = run_prism(["index", str(catalog), "--json"], env, trace=workdir / "traces" / "build-setup.jsonl")
    _check_setup(setup, "indexing with model A")
    model_a = (_json_out(setup) or {}).get("model_version")
    checkpoint = workdir / "model-b.pt"
    _other_weights(checkpoint, save_random_checkpoint)
    spec_b = f"prism-tiny-vit:{checkpoint}"
    sc = _Scenario("build", home, workdir, env, db_url, products=products, model_a=model_a, model_b_spec=spec_b)
    active_before = sc.inspector.active()
    sc.result.update(active_before=active_before, reference_run_s=setup["wall_s"])
    args = ["index", str(catalog), "--model", spec_b, "--json"]
    model_b = None
    for label, fault in pick_points(BUILD_POINTS, kills, points):
        entry = sc.attempt(label, fault, args, active_before)
        if model_b is None:
            model_b = next((m.model_version for m in sc.inspector.store.list_model_versions()
                            if m.model_version != model_a), None)
        if model_b is not None and entry["killed"]:
            refused = _refused_activations(env, [model_b])[model_b]
            entry["activate_model_b_refused"] = refused
            if not refused:
                sc.fail(f"{label}: `prism models activate {model_b}` was accepted with no complete version of it")
            if sc.inspector.active() != active_before:
                sc.fail(f"{label}: refusing to activate {model_b} changed the active version")
    rerun = run_prism(args, env, trace=workdir / "traces" / "build-rerun.jsonl")
    state = sc.inspector.inspect()
    summary = _json_out(rerun) or {}
    model_b = summary.get("model_version", model_b)
    sc.result["model_b"] = model_b
    if state["active"] != summary.get("index_version") or state["active_model"] != model_b:
        sc.fail(f"after the rerun {state['active']} ({state['active_model']}) is active, not the rerun's version")
    # Both versions stay usable: roll back to A, then forward to B.
    rolls = {}
    for name, want in ((model_a, active_before), (model_b, summary.get("index_version"))):
        run = run_prism(["models", "activate", name], env)
        after = sc.inspector.inspect()
        rolls[name] = {"ok": run["returncode"] == 0 and after["active"] == want and after["served_ok"],
                       "active": after["active"]}
        if not rolls[name]["ok"]:
            sc.fail(f"`prism models activate {name}` after the rerun: {run['stderr'][-500:]} {after}")
    sc.result["rollback_and_forward"] = rolls
    return sc.finish(rerun, state)


def _other_weights(path: Path, save_random_checkpoint) -> None:
    """prism-tiny-vit with weights other than ARCH:random's: a second model version."""
    import torch

    if path.exists():
        return
    save_random_checkpoint("prism-tiny-vit", path)
    state = torch.load(path, map_location="cpu")
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, path)


# ---------------------------------------------------------------- (c) prism retrain


def make_clicks(home: Path, db_url: str, *, rounds: int = 3, queries: int = 40, k: int = 10) -> int:
    """Shoppers search product titles and click the product each title names wherever it is shown."""
    import warnings

    from feedback import record_events, record_search
    from search import SearchEngine
    from store import EventInput, Store

    store = Store.open(db_url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = SearchEngine(store, indexes_dir=Path(home) / "indexes", models_dir=Path(home) / "models", device="cpu")
        products = sorted(store.live_products(), key=lambda p: p.product_id)[:queries]
        clicks = 0
        for _ in range(rounds):
            batch = []
            for p in products:
                result = engine.search(text=p.title.lower(), target="image", k=k)
                record_search(store, result)
                now = datetime.now(timezone.utc)
                for hit in result.hits:
                    pid = hit.product.product_id
                    kinds = ["impression", "click"] if pid == p.product_id else ["impression"]
                    for kind in kinds:
                        batch.append(EventInput(f"{kind}-{result.query_id}-{pid}", kind, result.query_id, pid, hit.rank, now))
                    clicks += len(kinds) - 1
            record_events(store, batch)
        engine.close()
        return clicks
    finally:
        store.close()


def retrain_scenario(home: Path, workdir: Path, *, kills: int | None = None, points: list[str] | None = None,
                     epochs: int = 3, env: dict | None = None, db_url: str | None = None, click_rounds: int = 3,
                     click_queries: int = 40) -> dict:
    """SIGKILL `prism retrain` during the fine-tune, the gate, the model write, the re-embed, the
    index build and just before activation; the home must already serve a version of a model
    Prism can fine-tune (the demo). Clicks are made first (searches of product titles)."""
    workdir = Path(workdir)
    # MIN_MRR_GAIN -1: every candidate passes the gate, so the kill points after it are reached.
    env, db_url = _base_env(home, env, db_url, PRISM_RETRAIN_EPOCHS=epochs, PRISM_RETRAIN_MIN_CLICKS=1,
                            PRISM_RETRAIN_MIN_PAIRS=5, PRISM_RETRAIN_MIN_MRR_GAIN=-1,
                            PRISM_RETRAIN_MAX_CATALOG_RECALL_DROP=1, PRISM_RETRAIN_HOLDOUT_FRACTION=0.3)
    clicks = make_clicks(home, db_url, rounds=click_rounds, queries=click_queries)
    sc = _Scenario("retrain", home, workdir, env, db_url, clicks=clicks, epochs=epochs)
    active_before = sc.inspector.active()
    sc.result["active_before"] = active_before
    if active_before is None:
        raise RuntimeError(f"{home} serves no index version: retrain needs one")
    gate_rejected = False
    for label, fault in pick_points(RETRAIN_POINTS, kills, points):
        post_gate = label not in ("fine-tune", "gate")
        entry = sc.attempt(label, fault, ["retrain", "--json"], active_before,
                           must_kill=not (post_gate and gate_rejected))
        if not entry["killed"] and entry["returncode"] == 0:
            gate_rejected = True  # the run finished: the gate rejected its candidate (a promotion is killed)
            entry["note"] = "finished before the kill point: the gate rejected the candidate"
            if entry["active_after_kill"] != active_before:
                sc.fail(f"{label}: a rejected candidate changed the active version")
    rerun = run_prism(["retrain", "--json"], env, trace=workdir / "traces" / "retrain-rerun.jsonl")
    state = sc.inspector.inspect()
    outcome = _json_out(rerun) or {}
    gate = outcome.get("metrics", {}).get("gate", {})
    sc.result["rerun_outcome"] = {
        **{k: outcome.get(k) for k in ("status", "decision", "candidate_model_version", "index_version", "reason")},
        "gate": {k: gate.get(k) for k in ("mrr_gain", "catalog_recall_drop", "why")},
    }
    promoted = outcome.get("decision") == "promoted"
    sc.result["promoted"] = promoted
    runs = sc.inspector.store.list_training_runs()
    sc.result["training_runs"] = Counter(f"{r.status}/{r.decision}" for r in runs)
    abandoned = [r for r in runs if r.status == "failed" and "killed" in str(r.metrics.get("error", ""))]
    sc.result["runs_marked_failed"] = len(abandoned)
    if len(abandoned) < sc.result_kills():
        sc.fail(f"{sc.result_kills()} runs were killed, {len(abandoned)} are recorded as failed")
    if promoted and state["active"] != outcome.get("index_version"):
        sc.fail(f"the rerun promoted {outcome.get('index_version')} but {state['active']} is active")
    if not promoted and state["active"] != active_before:
        sc.fail("the rerun did not promote but the active version changed")
    return sc.finish(rerun, state, expect_new_version=promoted)


# ---------------------------------------------------------------- all of it, for make reliability


def run_all(root: Path, *, full: bool = True, scenarios=("index", "build", "retrain"), products: int | None = None,
            time_kills: int | None = None, epochs: int | None = None, database_url=None, copy_home=None,
            demo_home: Path | None = None, log=print) -> dict:
    """The scenarios with every kill point, at `make reliability` size (full) or a quick one.

    `database_url`: home -> SQLAlchemy URL (e.g. a fresh PostgreSQL database), None for SQLite
    files in the homes. `copy_home(src, dst)`: copies a home with its database (default: the
    directory, which holds a SQLite database). `demo_home`: a home serving the demo to copy for
    the retrain scenario; made with `prism demo --no-serve` when not given."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    products = products or (2000 if full else 300)
    time_kills = (3 if full else 1) if time_kills is None else time_kills
    epochs = epochs or (5 if full else 3)
    # A SQLite home is one directory; its index paths are home-relative, so a copy serves its own files.
    copy_home = copy_home or shutil.copytree
    out: dict = {"sizes": {"products": products, "time_kills": time_kills, "retrain_epochs": epochs}}

    def url(home: Path) -> str | None:
        return database_url(home) if database_url else None

    if "index" in scenarios:
        log(f"crash: prism index, {products} products ...")
        home = root / "index-home"
        out["index"] = index_scenario(home, root / "index-work", products=products, time_kills=time_kills,
                                      batch_size=32, db_url=url(home))
        log(json.dumps(_brief(out["index"])))
    if "build" in scenarios:
        log(f"crash: index-version build for a second model, {products} products ...")
        home = root / "build-home"
        out["build"] = build_scenario(home, root / "build-work", products=products, batch_size=32,
                                      flat_threshold=0 if products >= 1000 else None, db_url=url(home))
        log(json.dumps(_brief(out["build"])))
    if "retrain" in scenarios:
        source = demo_home
        if source is None:
            source = root / "demo-home"
            limit = "300" if full else "150"
            log(f"crash: prism demo --no-serve --limit {limit} (the home retrain runs on) ...")
            env, _ = _base_env(source, None, url(source))
            _check_setup(run_prism(["demo", "--no-serve", "--limit", limit, "--epochs", "60"], env), "prism demo")
        home = root / "retrain-home"
        if home.exists():
            shutil.rmtree(home)
        copy_home(source, home)
        log(f"crash: prism retrain, {epochs} epochs ...")
        out["retrain"] = retrain_scenario(home, root / "retrain-work", epochs=epochs, db_url=url(home))
        log(json.dumps(_brief(out["retrain"])))
    out["ok"] = all(out[s]["ok"] for s in scenarios)
    return out


def _brief(r: dict) -> dict:
    keys = ("scenario", "kills", "kill_stages", "kill_points_s", "active_before", "active_after_kill",
            "served_ok_after_kill", "partial_versions_activated", "rows_pointing_to_partial", "leftovers_before_rerun",
            "rerun_ok", "active_after_rerun", "leftovers_after_rerun", "seconds", "ok", "failures")
    return {k: r.get(k) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", nargs="+", choices=("index", "build", "retrain"),
                        default=["index", "build", "retrain"])
    parser.add_argument("--quick", action="store_true", help="small sizes (300 products, 1 time kill)")
    parser.add_argument("--products", type=int, default=None)
    parser.add_argument("--time-kills", type=int, default=None, help="index scenario: kills at measured times")
    parser.add_argument("--epochs", type=int, default=None, help="retrain fine-tune epochs")
    parser.add_argument("--demo-home", type=Path, default=None, help="a home serving the demo, copied for retrain")
    parser.add_argument("--root", type=Path, default=None, help="where homes go (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "crash_faults.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="prism-crash-") as tmp:
        results = run_all(args.root or Path(tmp), full=not args.quick, scenarios=tuple(args.scenario),
                          products=args.products, time_kills=args.time_kills, epochs=args.epochs,
                          demo_home=args.demo_home)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")
    sys.exit(0 if results["ok"] else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
