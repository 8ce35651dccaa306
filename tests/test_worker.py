"""Retraining off the servers: `POST /v1/retrain` queues, `prism worker` runs, locks span hosts.

Runs on SQLite by default and on PostgreSQL with `--database postgresql`, where the cluster locks
are advisory locks: a second holder on another connection (or process) is refused, and a holder
that dies releases its lock. Nothing of Prism is mocked: the app, the store, `prism worker`
subprocesses and, for the rollback test, a real fine-tune of the small demo model.
"""

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from datetime import time as clock_time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import PrismSettings
from feedback import (
    GateConfig,
    MiningConfig,
    RetrainBusyError,
    RetrainConfig,
    RetrainWorker,
    activate_version,
    is_running,
    job_lock,
    nightly_key,
    run_retrain,
)
from indexer import CatalogIndexer, IndexOptions, load_demo_catalog
from embedder import load_embedder
from prism_cli import PRISM, ROOT
from store import ActiveVersionChangedError, LockBusyError, Store
from waiting import eventually

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "worker-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FINISHED = ("succeeded", "skipped", "failed")

# Holds a cluster lock in its own process until killed: `python - URL NAME LOCKFILE`.
HOLDER = """
import sys, time
from store import Store
store = Store.open(sys.argv[1])
with store.cluster_lock(sys.argv[2], wait=False, path=sys.argv[3]):
    print("held", flush=True)
    time.sleep(600)
"""


def _start_worker(env, *args) -> subprocess.Popen:
    """A `prism worker` subprocess, returned once it says it is waiting for runs."""
    proc = subprocess.Popen(PRISM + ["worker", "--poll", "0.2", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = []
    while not said or "waiting for queued retrain runs" not in said[-1]:
        said.append(proc.stderr.readline())
        assert said[-1], f"prism worker exited {proc.wait(timeout=30)} before it was ready: {''.join(said)[-2000:]}"
    return proc


def _stop(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ---------------------------------------------------------------- cluster locks


def test_a_cluster_lock_excludes_other_holders_and_dies_with_its_holder(store, tmp_path, databases):
    url = databases.url(tmp_path)
    other = Store.open(url)
    lock_file = tmp_path / "x.lock"
    try:
        with store.cluster_lock("x", wait=False, path=lock_file):
            with pytest.raises(LockBusyError):  # another connection (pool), another Store: refused
                with other.cluster_lock("x", wait=False, path=lock_file):
                    pass
            with other.cluster_lock("y", wait=False, path=tmp_path / "y.lock"):
                pass  # another name is another lock
            if databases.postgres:
                # Really a PostgreSQL advisory lock, held by a session of its own.
                with other.engine.connect() as c:
                    held = c.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
                    assert held.scalar() >= 1

            # wait=True blocks until the holder lets go
            got = threading.Event()

            def waiter():
                with other.cluster_lock("x", wait=True, path=lock_file):
                    got.set()

            thread = threading.Thread(target=waiter)
            thread.start()
            assert not got.wait(0.5)
        assert eventually(got.is_set, timeout_s=30)
        thread.join(timeout=30)

        # A holder in another process: refused while it lives, named in the refusal, free once it is killed.
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, "x", str(lock_file)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "held"
            with pytest.raises(LockBusyError) as busy:
                with store.cluster_lock("x", wait=False, path=lock_file):
                    pass
            assert str(proc.pid) in busy.value.holder
        finally:
            proc.kill()
            proc.wait(timeout=30)

        def free() -> bool:
            try:
                with store.cluster_lock("x", wait=False, path=lock_file):
                    return True
            except LockBusyError:
                return False

        assert eventually(free, timeout_s=30), "a killed holder's lock was never released"
    finally:
        other.close()


def test_the_retrain_job_lock_spans_every_store_of_the_database(store, tmp_path, databases):
    other = Store.open(databases.url(tmp_path))
    try:
        with job_lock(store, tmp_path):
            assert is_running(other, tmp_path)
            with pytest.raises(RetrainBusyError, match="under way"):
                with job_lock(other, tmp_path):
                    pass
        assert not is_running(other, tmp_path)
    finally:
        other.close()


# ---------------------------------------------------------------- the queue


def test_two_workers_never_claim_the_same_run(store, tmp_path, databases):
    stores = [Store.open(databases.url(tmp_path)) for _ in range(4)]
    try:
        for round_ in range(10):
            run, queued = store.enqueue_training_run(requested_by="http")
            assert queued
            again, queued_again = store.enqueue_training_run(requested_by="http")
            assert (again.id, queued_again) == (run.id, False)  # a queued run serves the second request too
            start = threading.Barrier(len(stores))
            claims: list = [None] * len(stores)

            def claim(i):
                start.wait()
                claims[i] = stores[i].claim_training_run(worker=f"w{i}")

            threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            taken = [c for c in claims if c is not None]
            assert [c.id for c in taken] == [run.id], f"round {round_}: {claims}"
            assert taken[0].status == "running" and taken[0].started_at is not None
            assert store.get_training_run(run.id).worker == taken[0].worker
            store.finish_training_run(run.id, status="skipped", decision="none", metrics={})
        assert store.claim_training_run(worker="late") is None
    finally:
        for s in stores:
            s.close()


def test_the_nightly_run_is_queued_once_however_many_workers_fire_it(store, tmp_path, databases):
    clock = [datetime(2026, 12, 1, 2, 57)]

    def now():  # a minute per look: 03:00 comes after a few
        clock[0] += timedelta(minutes=1)
        return clock[0]

    due = datetime(2026, 12, 1, 3, 0)
    first = RetrainWorker(store, home=tmp_path, nightly_at=clock_time(3, 0), poll_s=0.01, now=now, name="w1")
    # Nothing serves in this home, so the run it queues and claims fails at once, with the reason.
    assert first.run(max_runs=1) == 1
    runs = store.list_training_runs()
    assert len(runs) == 1 and runs[0].request_key == nightly_key(due) and runs[0].requested_by == "nightly"
    assert (runs[0].status, runs[0].worker) == ("failed", "w1") and "no index version" in runs[0].metrics["error"]

    # a second worker firing the same night, later: nothing more is queued
    other = Store.open(databases.url(tmp_path))
    try:
        run, queued = other.enqueue_training_run(requested_by="nightly", request_key=nightly_key(due))
        assert (run.id, queued) == (runs[0].id, False)
        # a run queued over HTTP takes the next night's key over: the night is not run twice
        http, _ = store.enqueue_training_run(requested_by="http")
        tomorrow = nightly_key(due + timedelta(days=1))
        taken_over, queued = other.enqueue_training_run(requested_by="nightly", request_key=tomorrow)
        assert (taken_over.id, taken_over.request_key, queued) == (http.id, tomorrow, False)
        assert store.get_training_run(http.id).request_key == tomorrow
        assert [r.id for r in store.list_training_runs()] == [http.id, run.id]
    finally:
        other.close()


def _downgrade(store: Store, revision: str) -> None:
    import store as store_package
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(store_package.__file__).parent / "migrations"))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_migration_0005_keeps_older_runs_and_goes_back_without_queued_ones(tmp_path, databases):
    from sqlalchemy import text

    from store import migrate

    url = databases.url(tmp_path)
    old = Store.open(url, apply_migrations=False)
    migrate(old.engine, "0004")
    with old.engine.begin() as c:  # a run as releases before 0005 wrote it
        c.execute(text("INSERT INTO training_runs (started_at, finished_at, status, data_window, metrics, decision) "
                       "VALUES (:t, :t, 'succeeded', '{}', '{}', 'rejected')"), {"t": datetime(2026, 11, 1, tzinfo=timezone.utc)})
    old.close()
    store = Store.open(url)
    try:
        (run,) = store.list_training_runs()
        assert run.requested_at == run.started_at == datetime(2026, 11, 1, tzinfo=timezone.utc)
        store.enqueue_training_run(requested_by="http")
        _downgrade(store, "0004")
        with store.engine.connect() as c:
            assert c.execute(text("SELECT status FROM training_runs")).scalars().all() == ["succeeded"]
        migrate(store.engine)
    finally:
        store.close()


# ---------------------------------------------------------------- compare-and-set promotion


def test_activation_compares_and_sets_the_version_it_started_from(store):
    store.register_model_version("m", spec="m", dim=4)
    for v in ("A", "B", "C"):
        store.record_index_version(v, model_version="m", path=v, manifest={}, activate=v == "A")
    with pytest.raises(ActiveVersionChangedError) as changed:
        store.activate_index_version("C", expected_active="B")
    assert (changed.value.expected, changed.value.active) == ("B", "A")
    assert store.active_index_version().index_version == "A"  # nothing changed
    assert store.activate_index_version("C", expected_active="A").index_version == "C"
    assert [v.index_version for v in store.list_index_versions() if v.is_active] == ["C"]
    assert store.activate_index_version("B").is_active  # without expected_active: as before


# ---------------------------------------------------------------- `prism worker` end to end


@pytest.fixture(scope="module")
def tiny_home(build_serving_home):
    return build_serving_home("worker-home", admin_token=TOKEN)


def test_a_run_queued_over_http_is_run_by_one_prism_worker(tiny_home, databases):
    settings = tiny_home
    env = databases.env(settings.home, PRISM_MODEL="prism-tiny-vit:random", PRISM_THREADS="1")
    with TestClient(create_app(settings)) as client:
        serving = client.app.state.services.store.active_index_version().index_version
        assert client.post("/v1/retrain").status_code == 401
        queued = client.post("/v1/retrain", headers=ADMIN)
        assert queued.status_code == 202 and queued.json()["status"] == "queued"
        run_id = queued.json()["run_id"]
        again = client.post("/v1/retrain", headers=ADMIN).json()
        assert again["run_id"] == run_id and "already queued" in again["detail"]
        status = client.get("/v1/retrain").json()
        assert status["queued"] == 1 and status["runs"][0]["status"] == "queued"
        assert status["runs"][0]["started_at"] is None and status["runs"][0]["requested_by"] == "http"

        workers = [_start_worker(env), _start_worker(env)]
        try:
            def finished():
                runs = client.get("/v1/retrain").json()["runs"]
                mine = [r for r in runs if r["id"] == run_id]
                return mine[0] if mine and mine[0]["status"] in FINISHED else None

            run = eventually(finished, timeout_s=120)
            assert run is not None, [w.poll() for w in workers]
            # nothing clicked in this home: the run reads the events and stops there
            assert (run["status"], run["decision"]) == ("skipped", "none"), run
            assert run["worker"] in {f"{socket.gethostname()}:{w.pid}" for w in workers}
            assert run["serving_index_version"] == serving
            status = client.get("/v1/retrain").json()
            assert status["queued"] == 0 and not status["running"]
        finally:
            results = [_stop(w) for w in workers]
        for code, _, err in results:
            assert code == 0 and "Traceback" not in err, err[-2000:]
    assert sum(f"run {run_id}: skipped" in out for _, out, _ in results) == 1


def test_prism_worker_refuses_a_bad_nightly_time(tiny_home, databases):
    proc = subprocess.run(PRISM + ["worker", "--nightly-at", "25:99"], env=databases.env(tiny_home.home), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "HH:MM" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- with a real fine-tune (the small demo)


@pytest.fixture
def demo_home(small_demo_home, tmp_path, databases):
    """A private copy of the small demo's home, a second index version of the demo model serving
    (the first one is what an operator rolls back to), and shoppers' clicks."""
    source, _, _ = small_demo_home
    home = tmp_path / "home"
    databases.copy_home(source, home)
    settings = PrismSettings(home=home, device="cpu", admin_token=TOKEN, database_url=databases.url(home))
    store = Store.open(settings.db_url)
    try:
        embedder = load_embedder("demo", device="cpu", models_dir=home / "models")
        CatalogIndexer(home=home, store=store, embedder=embedder, options=IndexOptions(batch_size=64)).run(None)
    finally:
        store.close()
    with TestClient(create_app(settings)) as client:
        _shop(client, home)
    return settings


def _shop(client, home: Path) -> None:
    """Shoppers search demo titles and click the product the title names wherever it is shown."""
    now = datetime.now(timezone.utc).isoformat()
    events = []
    for _ in range(3):
        for p in load_demo_catalog(home / "demo").products[:40]:
            body = client.get("/v1/search", params={"q": p.title.lower(), "k": 10}).json()
            for hit in body["results"]:
                for kind in ("impression", "click") if hit["product_id"] == p.product_id else ("impression",):
                    events.append({"event_id": f"{kind}-{body['query_id']}-{hit['product_id']}", "type": kind,
                                   "query_id": body["query_id"], "product_id": hit["product_id"],
                                   "position": hit["rank"], "ts": now})
    for start in range(0, len(events), 1000):
        assert client.post("/v1/events", json=events[start:start + 1000]).status_code == 200


class _RollbackAtFirstStep:
    """Training progress that, at the run's first step, does what an operator's
    `prism models activate OLD` does: the run must not undo it."""

    def __init__(self, store: Store, version: str):
        self.store, self.version, self.done = store, version, False

    def start(self, total_steps, done_steps):
        pass

    def step(self, step, *, loss, images_per_s, temperature):
        if not self.done:
            activate_version(self.store, self.version)
            self.done = True

    def epoch(self, epoch, *, mean_loss):
        pass

    def finish(self):
        pass


def test_a_rollback_during_a_run_is_not_undone_by_its_promotion(demo_home):
    store = Store.open(demo_home.db_url)
    try:
        versions = store.list_index_versions()
        old, started_from = versions[0].index_version, store.active_index_version().index_version
        assert old != started_from
        promote_anything = RetrainConfig(
            min_pairs=5, mining=MiningConfig(min_clicks=1), train=dataclasses.replace(RetrainConfig().train, epochs=2),
            gate=GateConfig(holdout_fraction=0.3, min_mrr_gain=-1.0, max_catalog_recall_drop=1.0),
        )
        rollback = _RollbackAtFirstStep(store, old)
        outcome = run_retrain(store, home=demo_home.home, config=promote_anything, device="cpu", progress=rollback)
        assert rollback.done
        assert (outcome.status, outcome.decision) == ("succeeded", "superseded"), outcome.reason
        assert old in outcome.reason and started_from in outcome.reason
        assert store.active_index_version().index_version == old  # the operator's rollback stands
        run = store.list_training_runs()[0]
        assert (run.decision, run.serving_index_version) == ("superseded", started_from)
        assert outcome.candidate_model_version.endswith(f"-{outcome.run_id}")  # unique across hosts
        assert store.get_model_version(outcome.candidate_model_version) is None  # never written

        # Without a rollback the same run promotes: the gate was never what stopped it.
        promoted = run_retrain(store, home=demo_home.home, config=promote_anything, device="cpu")
        assert promoted.decision == "promoted"
        assert store.active_index_version().index_version == promoted.index_version
    finally:
        store.close()


def test_sigterm_abandons_a_run_in_training_and_the_worker_exits_0(demo_home, databases):
    home = demo_home.home
    env = databases.env(home, PRISM_RETRAIN_EPOCHS="500", PRISM_RETRAIN_MIN_CLICKS="1", PRISM_RETRAIN_MIN_PAIRS="5",
                        PRISM_THREADS="1")
    store = Store.open(demo_home.db_url)
    try:
        serving = store.active_index_version().index_version
        run, _ = store.enqueue_training_run(requested_by="http")
        proc = _start_worker(env)
        try:
            assert eventually(lambda: list((home / "models" / ".training").glob("ft-*/last.pt")) or proc.poll() is not None,
                              timeout_s=180), "the run never wrote a checkpoint"
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert store.get_training_run(run.id).status == "running"
        finally:
            code, out, err = _stop(proc, timeout=120)
        assert code == 0 and "Traceback" not in err, err[-2000:]
        finished = store.get_training_run(run.id)
        assert finished.status == "failed" and "stopped during training" in finished.metrics["error"]
        assert store.active_index_version().index_version == serving
        assert not is_running(store, home)
    finally:
        store.close()
