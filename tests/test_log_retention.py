"""Searches and events are kept for PRISM_LOG_RETENTION_DAYS, never less than the retrain reads:
every retrain run deletes older ones, a bounded batch per transaction, and records how many."""

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import event

from api.settings import PrismSettings
from feedback import RetrainConfig, run_retrain
from store import EventInput, Store
from store import UnknownSearchError

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def _log(store: Store, query_id: str, age: timedelta, *, events: int = 2) -> None:
    ts = NOW - age
    store.log_search(query_id=query_id, query_text=f"query {query_id}", image_hash=None, query_product_id=None,
                     target="image", filters={}, k=5, offset=0, model_version="m", index_version="i",
                     result_ids=["A", "B", "C"], took_ms=1.0, ts=ts)
    store.add_events([EventInput(f"{query_id}-{n}", "impression", query_id, "ABC"[n], n + 1, ts + timedelta(seconds=5))
                      for n in range(events)])


def _left(store: Store, query_ids) -> set[str]:
    return set(store.searches_by_ids(query_ids))


def test_old_searches_and_their_events_go_in_bounded_transactions(store):
    old = [f"old-{i}" for i in range(7)]
    young = ["young-1", "young-2"]
    for i, qid in enumerate(old):
        _log(store, qid, timedelta(days=100, minutes=i))
    for qid in young:
        _log(store, qid, timedelta(days=10))
    # an event a day old of a search older than the window goes with its search
    store.add_events([EventInput("late", "click", "old-0", "A", 1, NOW - timedelta(days=1))])

    commits = []

    def committed(_connection):
        commits.append(1)

    event.listen(store.engine, "commit", committed)
    try:
        pruned = store.prune_search_log(NOW - timedelta(days=90), batch=3)
    finally:
        event.remove(store.engine, "commit", committed)
    assert pruned == (7, 15)
    assert len(commits) == 3  # 3 + 3 + 1 searches, one transaction each
    assert _left(store, old + young) == set(young)
    assert store.count_events() == {"impression": 4}
    assert store.stored_event_ids(["late", "old-0-0", "young-1-0"]) == {"young-1-0"}
    assert store.prune_search_log(NOW - timedelta(days=90)) == (0, 0)
    with pytest.raises(ValueError):
        store.prune_search_log(NOW, batch=0)


def test_an_event_for_a_search_pruned_meanwhile_is_refused_and_nothing_of_its_batch_stored(store):
    _log(store, "kept", timedelta(days=1), events=0)
    batch = [EventInput("a", "click", "kept", "A", 1, NOW), EventInput("b", "click", "gone", "A", 1, NOW)]
    with pytest.raises(UnknownSearchError) as refused:
        store.add_events(batch)  # as if "gone" was pruned after the batch was checked against the log
    assert refused.value.query_ids == {"gone"}
    assert store.stored_event_ids(["a", "b"]) == set()


@pytest.fixture
def serving(build_serving_home):
    settings = build_serving_home("log-retention")
    store = Store.open(settings.db_url)
    yield settings, store
    store.close()


def test_the_retrain_job_prunes_and_records_how_many(serving):
    settings, store = serving
    for qid, days in (("d100", 100), ("d95", 95), ("d60", 60), ("d1", 1)):
        _log(store, qid, timedelta(days=days))
    outcome = run_retrain(store, home=settings.home, config=settings.retrain_config(), now=NOW, device="cpu")
    assert outcome.status == "skipped"  # no clicks to learn from; retention runs all the same
    retention = outcome.metrics["retention"]
    assert (retention["searches_pruned"], retention["events_pruned"], retention["days"]) == (2, 4, 90)
    assert store.list_training_runs()[0].metrics["retention"] == retention
    assert _left(store, ["d100", "d95", "d60", "d1"]) == {"d60", "d1"}


def test_a_retention_shorter_than_the_retrain_window_is_raised_to_it_and_says_so(serving, caplog):
    settings, store = serving
    for qid, days in (("d40", 40), ("d20", 20), ("d3", 3)):
        _log(store, qid, timedelta(days=days))
    config = RetrainConfig(log_retention_days=5, window_days=30)
    with caplog.at_level(logging.WARNING, logger="feedback.retrain"):
        outcome = run_retrain(store, home=settings.home, config=config, now=NOW, device="cpu")
    assert _left(store, ["d40", "d20", "d3"]) == {"d20", "d3"}  # the job reads 30 days: d20 stays
    assert outcome.metrics["retention"]["days"] == 30 and outcome.metrics["retention"]["configured_days"] == 5
    assert any("PRISM_LOG_RETENTION_DAYS=5 is shorter than the 30 days" in r.getMessage() for r in caplog.records)


def test_the_retention_setting_defaults_to_90_days_and_reaches_the_job(monkeypatch):
    monkeypatch.delenv("PRISM_LOG_RETENTION_DAYS", raising=False)
    assert PrismSettings(home=Path("unused")).retrain_config().log_retention_days == 90
    monkeypatch.setenv("PRISM_LOG_RETENTION_DAYS", "45")
    assert PrismSettings(home=Path("unused")).retrain_config().log_retention_days == 45
    monkeypatch.setenv("PRISM_LOG_RETENTION_DAYS", "0")
    with pytest.raises(ValidationError):
        PrismSettings(home=Path("unused"))
