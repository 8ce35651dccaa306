"""The retrain gate's evidence and decision: later-window clicks judge, a bootstrap interval decides."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from feedback import (
    GateConfig,
    MiningConfig,
    RetrainConfig,
    bootstrap_lift,
    click_queries,
    gate_decision,
    gate_evidence,
    mine_pairs,
)
from store import LoggedEvent, SearchContext

pytestmark = pytest.mark.no_database
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def _search(qid, text, minute, results=("A", "B", "C", "D", "E")):
    return SearchContext(qid, text, None, None, "image", 0, list(results), "m", T0 + timedelta(minutes=minute))


def _events(search, *clicked):
    shown = [LoggedEvent(f"{search.query_id}-i-{pid}", "impression", search.query_id, pid, n + 1,
                         search.ts + timedelta(seconds=1), search) for n, pid in enumerate(search.result_ids)]
    clicks = [LoggedEvent(f"{search.query_id}-c-{pid}", "click", search.query_id, pid,
                          search.result_ids.index(pid) + 1, search.ts + timedelta(seconds=5), search) for pid in clicked]
    return shown + clicks


def test_later_queries_are_judged_by_later_clicks_only():
    # Training window: "red apple" is clicked on C six times (deep, so heavily weighted), "pear"
    # on B. Later window: "red apple" is clicked on A twice, "plum" on D. Counting the training
    # clicks would make C relevant for the later "red apple" and add their weight to it.
    events = []
    for i in range(6):
        events += _events(_search(f"t{i}", "Red apple", i), "C")
    events += _events(_search("t-pear", "pear", 6), "B")
    events += _events(_search("l0", "red apple", 20), "A")
    events += _events(_search("l1", "red  apple", 21), "A")
    events += _events(_search("l2", "plum", 22), "D")
    config = RetrainConfig(gate=GateConfig(holdout_fraction=0.3), mining=MiningConfig(min_clicks=1))

    # The construction matters: judged by the whole window, the later query would count C too.
    whole = {q.query: q.relevant for q in click_queries(mine_pairs(events, config.mining).pairs)}
    assert whole["red apple"] == {"A", "C"}

    train, later, cut = gate_evidence(events, config)
    assert cut == T0 + timedelta(minutes=20)
    assert {e.query_id for e in train} == {f"t{i}" for i in range(6)} | {"t-pear"}
    judged = {q.query: (q.relevant, q.weight) for q in later}
    assert judged == {"red apple": (frozenset({"A"}), 2.0), "plum": (frozenset({"D"}), 4.0)}


def test_bootstrap_lift_is_seeded_and_brackets_the_weighted_mean():
    rng = np.random.default_rng(3)
    serving = rng.uniform(0, 1, 200)
    candidate = np.clip(serving + 0.1 + rng.normal(0, 0.05, 200), 0, 1)
    weights = rng.uniform(1, 5, 200)
    a = bootstrap_lift(serving, candidate, weights, level=0.95, resamples=1000, seed=0)
    assert a == bootstrap_lift(serving, candidate, weights, level=0.95, resamples=1000, seed=0)
    assert a["lift"] == pytest.approx(np.average(candidate - serving, weights=weights), abs=1e-4)
    assert 0 < a["ci_low"] < a["lift"] < a["ci_high"] and a["queries"] == 200
    wider = bootstrap_lift(serving, candidate, weights, level=0.99, resamples=1000, seed=0)
    assert wider["ci_low"] <= a["ci_low"] and wider["ci_high"] >= a["ci_high"]


CATALOG = {"recall@1": 0.80, "recall@10": 0.95}


def test_a_lift_whose_interval_reaches_zero_is_rejected():
    gate = GateConfig()
    # A few queries, one big win and mostly small losses: positive on average, not with confidence.
    serving = np.array([0.1, 1.0, 1.0, 1.0, 0.5, 0.5])
    candidate = np.array([1.0, 0.9, 0.95, 1.0, 0.45, 0.5])
    lift = bootstrap_lift(serving, candidate, np.ones(6), level=gate.ci_level, resamples=gate.bootstrap_resamples, seed=0)
    assert lift["lift"] > 0 and lift["ci_low"] <= 0
    promote, why, _ = gate_decision(lift, CATALOG, CATALOG, gate)
    assert not promote and "lower bound is not above" in why and "over 6 queries" in why

    # The same kind of win on many queries is confident, and promoted.
    many = bootstrap_lift(np.tile(serving, 40), np.tile(candidate, 40), np.ones(240), level=gate.ci_level,
                          resamples=gate.bootstrap_resamples, seed=0)
    assert many["ci_low"] > 0
    assert gate_decision(many, CATALOG, CATALOG, gate)[0]
    # No later queries: nothing shows the candidate is better.
    empty = bootstrap_lift(np.zeros(0), np.zeros(0), np.zeros(0), level=0.95, resamples=100, seed=0)
    assert not gate_decision(empty, CATALOG, CATALOG, gate)[0]


def test_catalog_title_recall_at_1_may_drop_by_one_point_at_most():
    gate = GateConfig()
    lift = {"queries": 100, "lift": 0.2, "ci_low": 0.1, "ci_high": 0.3, "level": 0.95, "resamples": 1000}
    assert gate_decision(lift, CATALOG, {**CATALOG, "recall@1": 0.79}, gate)[0]  # exactly one point
    promote, why, drop = gate_decision(lift, CATALOG, {**CATALOG, "recall@1": 0.785}, gate)
    assert not promote and drop == pytest.approx(0.015) and "catalog recall@1 dropped by 0.0150" in why
    # recall@10 is not the rule: a better recall@10 does not excuse a lost recall@1
    assert not gate_decision(lift, CATALOG, {"recall@1": 0.70, "recall@10": 1.0}, gate)[0]
