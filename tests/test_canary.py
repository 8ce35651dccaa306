"""Interleaved canaries: team-draft interleaving, per-arm credit through the real API, the decision
rule promoting a winner and stopping a loser, and the refusals. SQLite and PostgreSQL alike."""

import random
from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from embedder import create_base_model, load_embedder, prism_config_path
from feedback import (
    CanaryPolicy, CanaryStats, decide, review_canary, sequential_p, sign_test_p, start_canary, stop_canary, tally,
    write_model_version,
)
from indexer import CatalogIndexer, IndexOptions
from prism_cli import run_prism
from search.interleave import canary_draw, search_draw, team_draft
from store import ActiveVersionChangedError, CanaryConflictError, CanarySearch, Store
from waiting import eventually

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "canary-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CANDIDATE = "ft-canary"
# 26 searches: unanimous clicks reach the sequential test's p < 0.05 after 20 to 22 of them.
QUERIES = tuple(f"{colour} {thing}" for colour in ("red", "blue") for thing in (
    "shoe", "bag", "lamp", "chair", "watch", "cup", "hat", "ring", "belt", "vase", "pan", "scarf", "kite"))


# ---------------------------------------------------------------- interleaving and the test


@pytest.mark.no_database
def test_team_draft_takes_each_item_once_from_either_list_and_deeper_drafts_extend_shallower_ones():
    rng = random.Random(7)
    for trial in range(500):
        pool = list(range(rng.randint(0, 30)))
        a = rng.sample(pool, rng.randint(0, len(pool)))
        b = rng.sample(pool, rng.randint(0, len(pool)))
        depth = rng.randint(0, 40)
        seed = rng.getrandbits(64)
        merged = team_draft(a, b, depth, seed)
        items = [item for item, _ in merged]
        assert len(items) == len(set(items)), (a, b, merged)  # no duplicates
        assert len(merged) == min(depth, len(set(a) | set(b)))  # fills the depth while either list has items
        for item, arm in merged:
            assert item in (a, b)[arm]  # every item from the list of the arm it is credited to
        # Each arm drafts its own ranking in order: the items credited to it are ranked where it ranks
        # them, each the highest of its list not taken before it.
        for arm, ranking in ((0, a), (1, b)):
            for i, (item, credited) in enumerate(merged):
                if credited == arm:
                    taken = set(items[:i])
                    assert item == next(x for x in ranking if x not in taken)
        # Prefix property: a shallower draft with the same seed is a prefix of a deeper one, and the
        # rankings need only be as deep as the draft.
        deeper = team_draft(a, b, depth + rng.randint(1, 10), seed)
        assert deeper[: len(merged)] == merged
        assert team_draft(a[:depth], b[:depth], depth, seed) == merged
        # Team sizes never differ by more than one while both lists still have items to give.
        if set(a) <= set(items) or set(b) <= set(items):
            continue
        counts = [sum(1 for _, arm in merged if arm == x) for x in (0, 1)]
        assert abs(counts[0] - counts[1]) <= 1


@pytest.mark.no_database
def test_the_coin_gives_either_arm_the_top_position_half_the_time_and_draws_are_reproducible():
    firsts = [team_draft([1, 2, 3], [4, 5, 6], 1, canary_draw(1, f"q{i}")[1])[0][1] for i in range(2000)]
    assert 900 < sum(firsts) < 1100
    assert canary_draw(3, "red shoe") == canary_draw(3, "red shoe") != canary_draw(4, "red shoe")
    share = sum(canary_draw(3, f"q{i}")[0] < 0.25 for i in range(4000)) / 4000
    assert 0.22 < share < 0.28
    # A visit is drawn as a whole; its query's flips are its own, and the same on every page.
    visit = [search_draw(3, query_id=f"id{i}", session="s1", query=q) for i, q in enumerate(["a", "a", "b"])]
    assert visit[0] == visit[1] and visit[0][0] == visit[2][0] and visit[0][1] != visit[2][1]
    assert search_draw(3, query_id="x", session="s2", query="a")[1] != visit[0][1]
    # Without a session every search is drawn on its own, whatever it asks.
    assert search_draw(3, query_id="x", session=None, query="a") != search_draw(3, query_id="y", session=None, query="a")


@pytest.mark.no_database
def test_sign_test_and_decision_rule():
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(7, 7) == 1.0
    assert sign_test_p(0, 10) == pytest.approx(2 / 1024)
    assert sign_test_p(60, 40) == pytest.approx(0.056887933, rel=1e-6)  # scipy.stats.binomtest(60, 100)
    assert sign_test_p(5000, 5200) == pytest.approx(sign_test_p(5200, 5000))  # large counts, no overflow

    def searches(candidate_wins, serving_wins, ties=0):
        out = []
        for n, (arms, clicks) in enumerate([(["candidate", "serving"], {1})] * candidate_wins
                                           + [(["candidate", "serving"], {2})] * serving_wins
                                           + [(["candidate", "serving"], {1, 2})] * ties):
            out.append(CanarySearch(f"q{n}", 0, arms, frozenset({1, 2}), frozenset(clicks)))
        return out

    stats = tally(searches(9, 1, ties=2))
    assert (stats.candidate.wins, stats.serving.wins, stats.ties, stats.decided) == (9, 1, 2, 10)
    assert (stats.candidate.clicks, stats.serving.clicks) == (11, 3)
    assert (stats.candidate.impressions, stats.serving.impressions) == (12, 12)
    policy = CanaryPolicy(min_queries=10, max_queries=40, alpha=0.05, sequential=False)
    assert decide(stats, policy)[0] == "promote"
    # The sequential p-value asks for more evidence, however often it is looked at.
    assert sequential_p(9, 1) > 0.05 and decide(stats, CanaryPolicy(min_queries=10, max_queries=40))[0] is None
    assert decide(tally(searches(30, 5)), CanaryPolicy(min_queries=10, max_queries=400))[0] == "promote"
    assert sequential_p(0, 0) == 1.0 and sequential_p(500, 500) == 1.0 and sequential_p(5000, 5600) < 1e-4 and sequential_p(50000, 50000) == 1.0
    assert decide(tally(searches(1, 9)), policy)[0] == "stop"
    assert decide(tally(searches(3, 5)), policy)[0] is None  # too few
    assert decide(tally(searches(6, 5)), policy)[0] is None  # not significant
    assert decide(tally(searches(20, 20)), policy)[0] == "stop"  # the maximum, undecided
    # a page of results: positions are 1-based over the whole ranking
    paged = tally([CanarySearch("p2", 10, ["serving", "candidate"], frozenset({11, 12}), frozenset({12}))])
    assert (paged.candidate.clicks, paged.candidate.wins, paged.serving.impressions) == (1, 1, 1)
    assert CanaryStats().p_value == 1.0


# ---------------------------------------------------------------- through the API


@pytest.fixture
def canary_home(build_serving_home):
    """A served small catalog (tiny model) and a candidate: another model version with its own index."""
    settings = build_serving_home("canary", admin_token=TOKEN, canary_review_interval_s=0, canary_min_queries=8,
                                  canary_max_queries=60)
    model, _, _ = create_base_model("prism-tiny-vit", seed=1)
    store = Store.open(settings.db_url)
    try:
        write_model_version(settings.models_dir, CANDIDATE, model, arch="prism-tiny-vit",
                            config_file=prism_config_path("prism-tiny-vit"), info={}, store=store)
        tuned = load_embedder(CANDIDATE, device="cpu", models_dir=settings.models_dir)
        summary = CatalogIndexer(home=settings.home, store=store, embedder=tuned,
                                 options=IndexOptions(batch_size=32, activate=False)).run(None)
    finally:
        store.close()
    return settings, summary.index_version


def _events(body, arm_of, click_arm=None):
    """Impressions of every hit, and a click on the first hit `click_arm` contributed (none once the
    canary has ended and the search is not interleaved)."""
    now = datetime.now(timezone.utc).isoformat()
    out = [{"event_id": f"i-{body['query_id']}-{h['rank']}", "type": "impression", "query_id": body["query_id"],
            "product_id": h["product_id"], "position": h["rank"], "ts": now} for h in body["results"]]
    for h in body["results"]:
        if click_arm is not None and arm_of.get(h["rank"]) == click_arm:
            out.append({"event_id": f"c-{body['query_id']}", "type": "click", "query_id": body["query_id"],
                        "product_id": h["product_id"], "position": h["rank"], "ts": now})
            break
    return out


def _arms(store, query_id) -> dict[int, str]:
    # The search-log row is written off the request, a group at a time (feedback/search_log.py).
    row = eventually(lambda: store.get_search(query_id))
    assert row is not None, f"search {query_id} was never logged"
    return {row["offset"] + i + 1: arm for i, arm in enumerate(row["arms"] or [])}


def _shop_for(client, store, arm: str, queries) -> int:
    """Search each query and click the first product `arm` contributed; returns clicks sent."""
    clicks = 0
    for q in queries:
        body = client.get("/v1/search", params={"q": q, "k": 10}).json()
        arms = _arms(store, body["query_id"])
        events = _events(body, arms, arm)
        clicks += sum(e["type"] == "click" for e in events)
        r = client.post("/v1/events", json=events)
        assert r.status_code == 200, r.text
    return clicks


def test_clicks_are_credited_to_the_arm_that_served_them_and_a_losing_candidate_is_stopped(canary_home):
    settings, candidate_index = canary_home
    with TestClient(create_app(settings)) as client:
        store = client.app.state.services.store
        serving = store.active_index_version()
        assert client.get("/v1/models").json()["canary"] is None
        started = client.post(f"/v1/models/{CANDIDATE}/canary", json={"fraction": 1.0}, headers=ADMIN)
        assert started.status_code == 201, started.text
        canary = started.json()
        assert (canary["status"], canary["candidate_index_version"], canary["serving_index_version"]) == (
            "running", candidate_index, serving.index_version)
        assert eventually(lambda: client.get("/v1/models").json()["canary"]["loaded"]), "the candidate never loaded"

        # One search: its positions come from both rankings, each recorded with its arm, and the
        # interleaving is the team draft of what each version ranks alone.
        body = client.get("/v1/search", params={"q": "red shoe", "k": 10}).json()
        assert body["model_version"] == serving.model_version  # the page sees the serving version
        arms = _arms(store, body["query_id"])
        assert sorted(arms) == [h["rank"] for h in body["results"]] and set(arms.values()) == {"serving", "candidate"}
        assert eventually(lambda: store.get_search(body["query_id"]))["canary_id"] == canary["id"]
        # With the page's session, every page of a query is cut from one interleaved list.
        visit = {"q": "red shoe", "k": 10, "session": "tab-1"}
        first = client.get("/v1/search", params=visit).json()
        page2 = client.get("/v1/search", params={**visit, "offset": 10}).json()
        shown = [h["product_id"] for h in first["results"] + page2["results"]]
        assert len(shown) == len(set(shown)) == 20, "page 2 repeats an item of page 1"
        both = client.get("/v1/search", params={**visit, "k": 20}).json()
        assert [h["product_id"] for h in both["results"]] == shown
        assert _arms(store, both["query_id"]) == {**_arms(store, first["query_id"]), **_arms(store, page2["query_id"])}
        bad = client.get("/v1/search", params={"q": "red shoe", "session": "no spaces"})
        assert bad.status_code == 422 and "session" in bad.text

        candidate_hit = next(h for h in body["results"] if arms[h["rank"]] == "candidate")
        events = _events(body, arms) + [{"event_id": "c-1", "type": "click", "query_id": body["query_id"],
                                         "product_id": candidate_hit["product_id"], "position": candidate_hit["rank"],
                                         "ts": datetime.now(timezone.utc).isoformat()}]
        assert client.post("/v1/events", json=events).status_code == 200
        live = client.get("/v1/models").json()["canary"]
        assert (live["candidate"]["clicks"], live["serving"]["clicks"]) == (1, 0)
        assert (live["candidate"]["wins"], live["serving"]["wins"], live["decided"]) == (1, 0, 1)
        assert live["candidate"]["impressions"] == sum(a == "candidate" for a in arms.values())
        assert live["serving"]["impressions"] == sum(a == "serving" for a in arms.values())
        metrics = client.get("/metrics").text
        assert 'prism_canary_clicks_total{arm="candidate"} 1.0' in metrics and "prism_canary_p_value 1.0" in metrics

        # Shoppers who click what the serving ranking contributed: the candidate loses at sequential
        # p < 0.05 (after 8 searches with a winner, the test's minimum), and the review stops it.
        _shop_for(client, store, "serving", QUERIES)
        ended = client.get("/v1/models").json()["canary"]
        assert ended["status"] == "stopped" and ended["finished_by"] == "review", ended
        assert ended["serving"]["wins"] >= 20 and ended["p_value"] < 0.05 and "loses" in ended["reason"]
        assert store.active_index_version().index_version == serving.index_version
        logged = store.list_training_runs()[0]
        assert logged.decision == "canary-stopped" and logged.candidate_model_version == CANDIDATE
        assert logged.metrics["canary"]["id"] == canary["id"] and logged.metrics["canary"]["serving"]["wins"] >= 20
        assert logged.metrics["canary"]["p_sequential"] < 0.05
        assert store.list_training_runs()[1].decision == "canary"  # its start
        # The servers stop interleaving: later searches carry no arms.
        def uninterleaved() -> bool:
            query_id = client.get("/v1/search", params={"q": "blue bag"}).json()["query_id"]
            row = eventually(lambda: store.get_search(query_id))
            return row is not None and row["arms"] is None

        assert eventually(uninterleaved)
        assert "prism_canary_running 0.0" in client.get("/metrics").text


def test_a_winning_candidate_is_promoted_through_the_activation_compare_and_set(canary_home):
    settings, candidate_index = canary_home
    with TestClient(create_app(settings)) as client:
        store = client.app.state.services.store
        serving = store.active_index_version()
        started = client.post(f"/v1/models/{candidate_index}/canary", json={"fraction": 1.0}, headers=ADMIN)
        assert started.status_code == 201, started.text
        assert eventually(lambda: client.get("/v1/models").json()["canary"]["loaded"])
        _shop_for(client, store, "candidate", QUERIES)
        ended = client.get("/v1/models").json()["canary"]
        assert ended["status"] == "promoted" and "wins" in ended["reason"], ended
        assert store.active_index_version().index_version == candidate_index
        assert store.list_training_runs()[0].decision == "promoted"
        assert eventually(lambda: client.get("/v1/search", params={"q": "red shoe"}).json()["model_version"] == CANDIDATE)
        # The old serving version is a version like any other: a canary of it can start now.
        back = client.post(f"/v1/models/{serving.index_version}/canary", json={"fraction": 0.5}, headers=ADMIN)
        assert back.status_code == 201 and back.json()["serving_index_version"] == candidate_index


def test_bad_canary_requests_are_refused_with_a_reason(canary_home):
    settings, candidate_index = canary_home
    with TestClient(create_app(settings)) as client:
        store = client.app.state.services.store
        serving = store.active_index_version()
        assert client.post(f"/v1/models/{CANDIDATE}/canary", json={"fraction": 0.5}).status_code == 401
        unknown = client.post("/v1/models/no-such-version/canary", json={"fraction": 0.5}, headers=ADMIN)
        assert unknown.status_code == 404 and "no-such-version" in unknown.json()["detail"]
        # true is not read as 1 (a canary on every search)
        for fraction in (0, -0.1, 1.5, "half", True):
            bad = client.post(f"/v1/models/{CANDIDATE}/canary", json={"fraction": fraction}, headers=ADMIN)
            assert bad.status_code == 422 and "fraction" in str(bad.json()["detail"]), bad.text
        assert store.running_canary() is None
        assert client.post(f"/v1/models/{CANDIDATE}/canary", json={}, headers=ADMIN).status_code == 422
        itself = client.post(f"/v1/models/{serving.index_version}/canary", json={"fraction": 0.5}, headers=ADMIN)
        assert itself.status_code == 409 and "serves now" in itself.json()["detail"]
        none = client.delete(f"/v1/models/{CANDIDATE}/canary", headers=ADMIN)
        assert none.status_code == 409 and "no canary is running" in none.json()["detail"]

        assert client.post(f"/v1/models/{CANDIDATE}/canary", json={"fraction": 0.5}, headers=ADMIN).status_code == 201
        twice = client.post(f"/v1/models/{CANDIDATE}/canary", json={"fraction": 0.5}, headers=ADMIN)
        assert twice.status_code == 409 and "is running" in twice.json()["detail"]
        other = client.delete(f"/v1/models/{serving.model_version}/canary", headers=ADMIN)
        assert other.status_code == 409 and candidate_index in other.json()["detail"]
        stopped = client.delete(f"/v1/models/{CANDIDATE}/canary", headers=ADMIN)
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        assert stopped.json()["finished_by"] == "http"
        assert store.list_training_runs()[0].decision == "canary-stopped"
        assert store.active_index_version().index_version == serving.index_version


def test_canary_state_changes_are_compare_and_set(canary_home):
    settings, candidate_index = canary_home
    store = Store.open(settings.db_url)
    try:
        serving = store.active_index_version()
        canary = start_canary(store, CANDIDATE, 0.2, policy=CanaryPolicy(min_queries=1), started_by="test")
        with pytest.raises(CanaryConflictError):
            start_canary(store, candidate_index, 0.2, started_by="test")
        # An operator activates another version meanwhile: promotion must not undo it.
        store.activate_index_version(candidate_index)
        with pytest.raises(ActiveVersionChangedError):
            store.finish_canary(canary.id, status="promoted", finished_by="test", reason="", result={}, promote=True)
        assert store.running_canary().id == canary.id  # nothing written
        store.activate_index_version(serving.index_version)
        store.finish_canary(canary.id, status="stopped", finished_by="test", reason="first", result={})
        with pytest.raises(CanaryConflictError):  # a second worker ending it too
            store.finish_canary(canary.id, status="promoted", finished_by="test", reason="", result={}, promote=True)
        assert store.get_canary(canary.id).reason == "first"
        assert store.active_index_version().index_version == serving.index_version
        # A canary whose serving side was replaced is ended as superseded by the review.
        again = start_canary(store, CANDIDATE, 0.2, started_by="test")
        store.activate_index_version(candidate_index)
        review = review_canary(store)
        assert review.action == "superseded" and store.get_canary(again.id).status == "superseded"
        assert store.list_training_runs()[0].decision == "superseded"
        # A stop aimed at a canary that ended meanwhile (its route checked it, then another began)
        # must not end the one that runs now.
        store.activate_index_version(serving.index_version)
        checked = start_canary(store, CANDIDATE, 0.2, started_by="test")
        stop_canary(store, by="test")
        running = start_canary(store, CANDIDATE, 0.2, started_by="test")
        with pytest.raises(CanaryConflictError):
            stop_canary(store, by="test", canary=checked)
        assert store.running_canary().id == running.id
    finally:
        store.close()


def test_the_cli_starts_shows_and_stops_a_canary_and_refuses_bad_input(canary_home, databases):
    settings, candidate_index = canary_home
    env = databases.env(settings.home)
    started = run_prism(["models", "canary", CANDIDATE, "--fraction", "0.25"], env)
    assert "canary 1: running" in started.stdout and candidate_index in started.stdout and "25.0%" in started.stdout
    busy = run_prism(["models", "canary", CANDIDATE, "--fraction", "0.25"], env, check=False)
    assert busy.returncode == 2 and "is running" in busy.stderr and "Traceback" not in busy.stderr
    stopped = run_prism(["models", "canary", "--stop", "--json"], env)
    assert '"status": "stopped"' in stopped.stdout
    for args, words in ((["nope", "--fraction", "0.5"], "no model or index version"),
                        ([CANDIDATE, "--fraction", "1.5"], "(0, 1]"),
                        ([CANDIDATE], "--fraction"),
                        (["--stop"], "no canary is running")):
        bad = run_prism(["models", "canary", *args], env, check=False)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)

