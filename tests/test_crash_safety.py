"""Crash safety: SIGKILL during `prism index`, an index-version build and `prism retrain`.

The scenarios are benchmarks/crash_faults.py (`make reliability` runs them bigger); here they
run small. Each kills the real CLI at named points, one run per point, and checks after every
kill that the version active before keeps serving, that nothing incomplete is recorded or
activatable, and after a rerun that it completes, activates a complete version and leaves
nothing behind. Below them, the cleanup rules they rely on, one by one.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import crash_faults as cf


def _assert_crash_safe(r: dict, points: list[str]) -> None:
    summary = {k: r.get(k) for k in ("kill_points_s", "kill_stages", "leftovers_before_rerun", "failures")}
    assert r["failures"] == [], summary
    assert [k["point"] for k in r["kill_points"]] == points
    assert all(k["killed"] for k in r["kill_points"]), summary
    assert r["kills"] == len(points)
    # the version active before every kill is the one active after it, and it answered searches
    assert r["active_after_kill"] == [r["active_before"]]
    assert r["served_ok_after_kill"] and all(k["hits"] > 0 for k in r["kill_points"])
    assert r["partial_versions_activated"] == 0 and r["rows_pointing_to_partial"] == 0
    for k in r["kill_points"]:
        assert k["locks_held"] == [] and k["activated_broken"] == [], k
        assert all(k.get("refused_activation", {}).values()), k  # a dead run's directory is never activatable
    # the rerun completes, activates a complete version, and nothing is left behind
    assert r["rerun_ok"] and r["served_ok_after_rerun"]
    assert r["active_after_rerun"] not in (None, r["active_before"])
    assert r["leftovers_after_rerun"] == [] and r["locks_held_after_rerun"] == []


def _left(r: dict, point: str) -> list[str]:
    return next(k["leftovers"] for k in r["kill_points"] if k["point"] == point)


INDEX_POINTS = ["ingest", "embed-images", "cache-shard-write", "version-write", "before-activate"]


def test_prism_index_killed_at_each_stage_keeps_serving_and_a_rerun_completes_and_cleans_up(tmp_path, databases):
    home = tmp_path / "home"
    r = cf.index_scenario(home, tmp_path / "work", products=120, points=INDEX_POINTS,
                          env=databases.env(home), db_url=databases.url(home))
    _assert_crash_safe(r, INDEX_POINTS)
    # "ingest" kills right after the first chunk of rows reached SQL, while the catalog is still read
    assert [k["stage"] for k in r["kill_points"]][:2] == ["read catalog", "embed images"]
    # the kills did leave debris, which the next run removed: a half-written embedding shard,
    # a temp version dir, a version renamed into place whose SQL row never came
    assert any("/.part-" in p for p in _left(r, "cache-shard-write"))
    assert any(p.startswith("indexes/.tmp-") for p in _left(r, "version-write"))
    assert any(p.endswith("(no index_versions row)") for p in _left(r, "before-activate"))
    assert r["rerun_summary"]["products_indexed"] == 120


BUILD_POINTS = ["model-registered", "index-files-half-written", "before-activate"]


def test_a_new_models_index_build_killed_is_never_activated_and_both_versions_roll_back_and_forward(
    tmp_path, databases
):
    home = tmp_path / "home"
    r = cf.build_scenario(home, tmp_path / "work", products=80, points=BUILD_POINTS,
                          env=databases.env(home), db_url=databases.url(home))
    _assert_crash_safe(r, BUILD_POINTS)
    # model B is registered from the first kill on, but has no complete index version to serve
    assert all(k["activate_model_b_refused"] for k in r["kill_points"])
    assert any(p.startswith("indexes/.tmp-") for p in _left(r, "index-files-half-written"))
    assert all(roll["ok"] for roll in r["rollback_and_forward"].values())


RETRAIN_POINTS = ["fine-tune", "model-unregistered", "index-write"]


def test_prism_retrain_killed_mid_run_keeps_serving_and_the_next_run_promotes(small_demo_home, tmp_path, databases):
    source, _, _ = small_demo_home
    home = tmp_path / "home"
    databases.copy_home(source, home)
    r = cf.retrain_scenario(home, tmp_path / "work", points=RETRAIN_POINTS, epochs=3,
                            env=databases.env(home, PRISM_THREADS="2"), db_url=databases.url(home))
    _assert_crash_safe(r, RETRAIN_POINTS)
    assert r["promoted"], r["rerun_outcome"]
    assert r["rerun_outcome"]["index_version"] == r["active_after_rerun"]
    assert r["runs_marked_failed"] == len(RETRAIN_POINTS) and r["running_training_runs_after_rerun"] == 0
    assert any(p.startswith("models/.training/") for p in _left(r, "fine-tune"))
    assert any(p.endswith("(no model_versions row)") for p in _left(r, "model-unregistered"))


# ---------------------------------------------------------------- the cleanup rules


def test_a_build_removes_a_dead_builds_unrecorded_version_but_nothing_it_did_not_write(tmp_path):
    from indexer.versions import build_lock, mark_recorded

    indexes = tmp_path / "indexes"
    for name in ("20260101-000000-aaaaaa", "20260101-000000-bbbbbb", "20260101-000000-cccccc"):
        (indexes / name).mkdir(parents=True)
        (indexes / name / "manifest.json").write_text("{}")
    (indexes / ".pending-20260101-000000-aaaaaa").touch()  # died before its SQL row
    (indexes / ".pending-20260101-000000-bbbbbb").touch()  # died after it: only the marker is stale
    (indexes / ".tmp-20260101-000000-dddddd").mkdir()
    recorded = {"20260101-000000-bbbbbb"}  # cccccc: no marker, e.g. recorded in another database
    with build_lock(indexes, is_recorded=recorded.__contains__):
        pass
    assert sorted(p.name for p in indexes.iterdir()) == [".build.lock", "20260101-000000-bbbbbb",
                                                         "20260101-000000-cccccc"]
    mark_recorded(indexes, "20260101-000000-bbbbbb")  # idempotent


def test_half_written_shards_are_removed_only_when_no_other_run_is_writing(tmp_path):
    from indexer.pipeline import embedding_writer

    shard = tmp_path / "embeddings" / "m" / ".part-0123.parquet.tmp"
    shard.parent.mkdir(parents=True)
    shard.touch()
    other = os.open(tmp_path / "embeddings" / ".writers.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(other, fcntl.LOCK_SH)  # a live run of this home is writing: the shard may be its own
        with embedding_writer(tmp_path):
            assert shard.exists()
    finally:
        os.close(other)
    with embedding_writer(tmp_path):  # alone: the shard is a dead run's
        assert not shard.exists()


def test_a_lock_whose_holder_was_killed_is_free_at_once(tmp_path):
    from indexer.versions import build_lock

    indexes = tmp_path / "indexes"
    indexes.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(600)", str(indexes / ".build.lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cf.held_locks(tmp_path) == ["indexes/.build.lock"]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    started = time.monotonic()
    with build_lock(indexes):
        pass
    assert time.monotonic() - started < 5 and cf.held_locks(tmp_path) == []


def test_a_dead_retrain_runs_unregistered_candidate_is_removed_and_a_registered_one_kept(tmp_path, store):
    from feedback.versions import ModelVersionExistsError, pending_candidate, remove_unrecorded_candidates

    models = tmp_path / "models"
    with pytest.raises(RuntimeError):
        with pending_candidate(models, "ft-1"):  # the run dies after the rename, before registering
            (models / "ft-1").mkdir()
            (models / ".ft-1.tmp-x").mkdir()
            raise RuntimeError("killed")
    with pending_candidate(models, "ft-2"):  # a run that finished: no marker
        (models / "ft-2").mkdir()
    (models / ".pending-ft-3").touch()  # registered, then died before removing its marker
    (models / "ft-3").mkdir()
    store.register_model_version("ft-3", spec="ft-3", dim=4)
    (models / "ft-4").mkdir()  # nobody's marker: not the retrain job's to remove
    with pytest.raises(ModelVersionExistsError):
        with pending_candidate(models, "ft-4"):  # nor may a run mark it as its own
            pass
    assert remove_unrecorded_candidates(models, store) == ["ft-1"]
    assert sorted(p.name for p in Path(models).iterdir()) == ["ft-2", "ft-3", "ft-4"]
