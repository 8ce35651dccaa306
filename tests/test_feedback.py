"""The click loop end to end on a small demo: events, mining, fine-tune, gate, promotion, rollback.

Nothing of Prism is mocked: the HTTP API, the store, the trainer and the indexer all run for real
on the 150-product demo that `prism demo --no-serve --limit 150 --epochs 60` builds.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from datetime import time as clock_time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import PrismSettings
from embedder import create_base_model, load_embedder, wrap_open_clip
from feedback import (
    DEMO_ARCH,
    ClickQuery,
    GateConfig,
    MiningConfig,
    RetrainBusyError,
    RetrainConfig,
    TrainConfig,
    click_queries,
    gate_candidate,
    is_running,
    job_lock,
    mine_pairs,
    next_run,
    run_nightly,
    run_retrain,
    split_by_time,
    train_contrastive,
)
from feedback.demo import pair_data
from feedback.versions import version_size
from indexer import load_demo_catalog
from prism_cli import PRISM, ROOT, run_prism
from store import LoggedEvent, SearchContext, Store
from waiting import eventually

TOKEN = "feedback-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def home(small_demo_home, tmp_path, databases):
    """A private copy of the small demo's PRISM_HOME (database, models, indexes)."""
    source, _, _ = small_demo_home
    target = tmp_path / "home"
    databases.copy_home(source, target, ignore=shutil.ignore_patterns("demo-copy"))
    return target


def _settings(home: Path, databases, **extra) -> PrismSettings:
    return PrismSettings(home=home, device="cpu", admin_token=TOKEN, database_url=databases.url(home), **extra)


def _event(kind, query_id, hit, **over):
    return {"event_id": f"{kind}-{query_id}-{hit['product_id']}", "type": kind, "query_id": query_id,
            "product_id": hit["product_id"], "position": hit["rank"],
            "ts": datetime.now(timezone.utc).isoformat(), **over}


def _shop(client, home: Path, rounds: int = 3, queries: int = 40) -> int:
    """Shoppers search demo titles and click the product the title names wherever it is shown."""
    catalog = load_demo_catalog(home / "demo")
    clicks = 0
    for _ in range(rounds):
        batch = []
        for p in catalog.products[:queries]:
            body = client.get("/v1/search", params={"q": p.title.lower(), "k": 10}).json()
            batch += [_event("impression", body["query_id"], h) for h in body["results"]]
            wanted = [h for h in body["results"] if h["product_id"] == p.product_id]
            batch += [_event("click", body["query_id"], h) for h in wanted]
            clicks += len(wanted)
        assert client.post("/v1/events", json=batch).status_code == 200
    return clicks


# ---------------------------------------------------------------- events


def test_events_are_checked_against_the_log_stored_once_and_durable(home, databases):
    with TestClient(create_app(_settings(home, databases))) as client:
        body = client.get("/v1/search", params={"q": "red apple", "k": 5}).json()
        qid, hits = body["query_id"], body["results"]
        batch = [_event("impression", qid, h) for h in hits] + [_event("click", qid, hits[1])]
        first = client.post("/v1/events", json=batch)
        assert first.status_code == 200 and first.json() == {"stored": 6, "duplicates": 0}
        retry = client.post("/v1/events", json=batch)  # a client retrying after a lost answer
        assert retry.status_code == 200 and retry.json() == {"stored": 0, "duplicates": 6}

        future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
        bad = [
            _event("click", qid, hits[0], event_id="ok-1"),
            _event("click", "no-such-query", hits[0], event_id="bad-1"),
            _event("click", qid, {**hits[0], "product_id": "NOT-SERVED"}, event_id="bad-2"),
            _event("click", qid, {**hits[0], "rank": 4}, event_id="bad-3"),
            _event("click", qid, hits[0], event_id="bad-4", ts=future),
        ]
        r = client.post("/v1/events", json=bad)
        assert r.status_code == 422
        problems = {p["index"]: p["error"] for p in r.json()["problems"]}
        assert set(problems) == {1, 2, 3, 4}
        assert "unknown query_id" in problems[1] and "not among the results" in problems[2]
        assert "served at position 1, not 4" in problems[3] and "future" in problems[4]
        assert "nothing was stored" in r.json()["detail"]

        for body, words in (
            ([], "at least 1"),
            ([{**batch[0], "type": "view"}], "type"),
            ([{**batch[0], "ts": "2026-11-23T10:00:00"}], "timezone"),
            ([{**batch[0], "position": 0}], "position"),
            ({"events": batch}, "list"),
            ([_event("click", qid, hits[0], event_id=f"e{i}") for i in range(1001)], "at most 1000"),
        ):
            r = client.post("/v1/events", json=body)
            assert r.status_code == 422 and words in r.json()["detail"], r.text
        r = client.post("/v1/events", content=b"[{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.json()["detail"]

    reopened = Store.open(databases.url(home))
    assert reopened.count_events() == {"impression": 5, "click": 1}  # only the first batch, once
    reopened.close()


def test_a_reused_event_id_with_other_content_refuses_the_whole_batch(home, databases):
    with TestClient(create_app(_settings(home, databases))) as client:
        store = client.app.state.services.store
        body = client.get("/v1/search", params={"q": "red apple", "k": 5}).json()
        qid, hits = body["query_id"], body["results"]
        shown, opened = _event("impression", qid, hits[0]), _event("click", qid, hits[1])
        assert client.post("/v1/events", json=[shown, opened]).json() == {"stored": 2, "duplicates": 0}

        later = (datetime.now(timezone.utc) + timedelta(seconds=30)).isoformat()
        fresh = _event("click", qid, hits[2], event_id="fresh-1")
        batch = [fresh, {**shown, "type": "click"}, {**opened, "ts": later}, opened]
        r = client.post("/v1/events", json=batch)
        assert r.status_code == 409, r.text
        answer = r.json()
        assert shown["event_id"] in answer["detail"] and opened["event_id"] in answer["detail"]
        assert "nothing of this batch was stored" in answer["detail"]
        problems = {p["index"]: p for p in answer["problems"]}
        assert set(problems) == {1, 2}  # [3] is an identical resend: a duplicate, not a conflict
        assert "type: 'impression' stored, 'click' sent" in problems[1]["error"]
        assert "ts:" in problems[2]["error"] and problems[2]["event_id"] == opened["event_id"]
        # atomic: the valid event of the refused batch is not stored, the stored ones are unchanged
        assert store.stored_event_ids(["fresh-1"]) == set()
        assert store.count_events() == {"impression": 1, "click": 1}
        assert client.post("/v1/events", json=[fresh, opened]).json() == {"stored": 1, "duplicates": 1}

        # inside one batch: the second use of an id with other content is the conflict
        twice = [_event("impression", qid, hits[3], event_id="twice"), _event("click", qid, hits[3], event_id="twice")]
        r = client.post("/v1/events", json=twice)
        assert r.status_code == 409 and [p["index"] for p in r.json()["problems"]] == [1]
        assert "event [0] of this batch" in r.json()["problems"][0]["error"]
        assert store.stored_event_ids(["twice"]) == set()
        r = client.post("/v1/events", json=[twice[0], twice[0]])
        assert r.json() == {"stored": 1, "duplicates": 1}
        assert 'prism_events_total{outcome="conflict"} 3.0' in client.get("/metrics").text


def test_concurrent_sends_of_one_event_id_store_one_and_refuse_the_others(store):
    """Sends racing on one new event_id: the first commit wins; each other one is a retry if the
    same, a conflict if not, never a unique-constraint error (a 500)."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from store import EventInput
    from store import EventIdReusedError

    store.log_search(query_id="q", query_text="x", image_hash=None, query_product_id=None, target="image",
                     filters={}, k=8, offset=0, model_version="m", index_version="i",
                     result_ids=list("ABCDEFGH"), took_ms=1.0)
    start = Barrier(8)

    def send(position: int):
        start.wait()
        try:
            product = "ABCDEFGH"[position // 2]
            return store.add_events([EventInput("raced", "click", "q", product, position // 2 + 1, T0)])
        except EventIdReusedError as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))  # two senders per content
    assert sum(a == (1, 0) for a in answers) == 1
    assert sum(a == (0, 1) for a in answers) == 1  # the winner's twin: a retry
    assert sum(isinstance(a, EventIdReusedError) for a in answers) == 6
    assert store.count_events() == {"click": 1}


def test_an_event_time_with_an_offset_is_stored_as_its_instant(home, databases):
    """SQLite keeps a datetime's wall clock and drops its offset: 12:00+02:00 read back as 12:00 UTC,
    two hours late, and the same event resent in UTC looked like another event."""
    with TestClient(create_app(_settings(home, databases))) as client:
        store = client.app.state.services.store
        body = client.get("/v1/search", params={"q": "dog", "k": 3}).json()
        now = datetime.now(timezone.utc).replace(microsecond=0)
        local = now.astimezone(timezone(timedelta(hours=2)))
        event = _event("click", body["query_id"], body["results"][0], ts=local.isoformat())
        assert client.post("/v1/events", json=[event]).json() == {"stored": 1, "duplicates": 0}
        [stored] = [e for e in store.events_between(None, None) if e.event_id == event["event_id"]]
        assert stored.ts == now
        resent = {**event, "ts": now.isoformat().replace("+00:00", "Z")}
        assert client.post("/v1/events", json=[resent]).json() == {"stored": 0, "duplicates": 1}


def test_a_corrupted_model_checkpoint_is_a_503_that_names_it_not_garbage(home, databases):
    checkpoint = home / "models" / "demo" / "checkpoint.pt"
    data = bytearray(checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = bytes(b ^ 0xFF for b in data[middle:middle + 256])
    checkpoint.write_bytes(bytes(data))
    with TestClient(create_app(_settings(home, databases))) as client:
        assert client.get("/readyz").status_code == 503
        r = client.get("/v1/search", params={"q": "dog", "k": 3})
        assert r.status_code == 503 and "checkpoint.pt" in r.json()["detail"] and "sha256" in r.json()["detail"]
    proc = run_prism(["search", "dog", "-k", "3"], databases.env(home), check=False)
    assert proc.returncode != 0 and "sha256" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- mining


def _search(qid, *, text=None, product=None, ts=T0, results=("A", "B", "C", "D", "E")):
    return SearchContext(qid, text, None if (text or product) else "f00d", product, "image", 0, list(results), "m", ts)


def _logged(kind, search, product_id, n=0):
    position = search.result_ids.index(product_id) + 1
    return LoggedEvent(f"{search.query_id}-{kind}-{product_id}-{n}", kind, search.query_id, product_id, position,
                       search.ts + timedelta(seconds=5), search)


def _shown(search):
    return [_logged("impression", search, pid) for pid in search.result_ids]


def test_mining_weights_clicks_by_position_and_filters_noise():
    q1 = _search("q1", text="Red  Apple")
    q2 = _search("q2", text="red apple", ts=T0 + timedelta(minutes=1))
    q3 = _search("q3", text="red apple", ts=T0 + timedelta(minutes=2))
    bot = _search("bot", text="red apple")
    more = _search("more", product="A")
    upload = _search("upload")
    events = (
        _shown(q1) + [_logged("click", q1, "C"), _logged("click", q1, "C", n=1)]  # a double click counts once
        + _shown(q2) + [_logged("click", q2, "A")]
        + _shown(q3) + [_logged("click", q3, "C")]
        + [_logged("click", bot, pid) for pid in bot.result_ids]  # clicks everything: a bot
        + _shown(more) + [_logged("click", more, "B"), _logged("click", more, "A")]
        + [_logged("click", upload, "A")]
    )
    mined = mine_pairs(events, MiningConfig(min_clicks=1, max_clicks_per_query=3))
    pairs = {(p.kind, p.query, p.product_id): p for p in mined.pairs}
    assert set(pairs) == {("text", "red apple", "C"), ("text", "red apple", "A"), ("product", "A", "B")}
    c = pairs[("text", "red apple", "C")]
    assert c.clicks == 2 and c.weight == pytest.approx(3 + 3)  # clicked at position 3 twice: 1/p(3) = 3
    assert c.hard_negatives == ("A", "B")  # shown above C and skipped
    assert pairs[("text", "red apple", "A")].weight == 1 and pairs[("text", "red apple", "A")].hard_negatives == ()
    assert mined.stats["duplicate_events"] == 1 and mined.stats["bot_queries_dropped"] == 1
    assert mined.stats["image_upload_clicks_skipped"] == 1

    strict = mine_pairs(events, MiningConfig(min_clicks=2, max_clicks_per_query=3, max_weight=2.0))
    assert [(p.product_id, p.weight) for p in strict.pairs] == [("C", 4.0)]  # weights clipped at 2
    assert strict.stats["pairs_below_min_clicks"] == 2

    popular = [_search(f"p{i}", text="lamp") for i in range(40)]
    stray = [_logged("click", q, "A") for q in popular] + [_logged("click", popular[0], "E"), _logged("click", popular[1], "E")]
    shares = mine_pairs(stray, MiningConfig(min_clicks=2, min_click_share=0.05))
    assert [p.product_id for p in shares.pairs] == ["A"] and shares.stats["pairs_below_min_click_share"] == 1

    train, later, cut = split_by_time(events, holdout_fraction=0.1)
    assert cut == q3.ts and {e.query_id for e in later} == {"q3"}
    assert [(q.query, sorted(q.relevant)) for q in click_queries(mine_pairs(later, MiningConfig(min_clicks=1)).pairs)] == [
        ("red apple", ["C"])]


# ---------------------------------------------------------------- gate


def test_clicks_on_identifier_queries_do_not_become_training_pairs(tmp_path, databases):
    """A pasted SKU or GTIN finds its product through the identifier table, whatever the model
    says: its clicks teach the text tower nothing it needs, so retraining leaves them out."""
    from feedback.pairs import ClickPair
    from feedback.retrain import _without_identifier_queries
    from store import LexicalConfig, ProductInput, Store

    store = Store.open(databases.url(tmp_path), lexical=LexicalConfig(id_attributes=("sku",)))
    try:
        store.upsert_products([ProductInput("P1", "red kettle", attributes={"sku": "KT-100"}),
                               ProductInput("P2", "blue kettle")])
        pairs = [ClickPair("text", "kt-100", "P1", 3, 3.0), ClickPair("text", "p2", "P2", 2, 2.0),
                 ClickPair("text", "red kettle", "P1", 2, 2.0), ClickPair("product", "P2", "P1", 1, 1.0)]
        kept = _without_identifier_queries(pairs, store)
        assert [(p.kind, p.query) for p in kept] == [("text", "red kettle"), ("product", "P2")]
    finally:
        store.close()


def test_the_gate_accepts_a_better_model_and_rejects_a_worse_one(small_demo_home, tmp_path, databases):
    source, _, _ = small_demo_home
    store = Store.open(databases.url(source))
    products = {p.product_id: p for p in store.live_products()}
    store.close()
    catalog = load_demo_catalog(source / "demo")
    items = catalog.split("train")[:96]
    start = create_base_model(DEMO_ARCH, seed=1)
    untrained = wrap_open_clip(*start, name="untrained")
    model, preprocess, tokenizer = create_base_model(DEMO_ARCH, seed=1)
    config = TrainConfig(epochs=10, batch_size=32, lr=3e-3, warmup_steps=5, lock_text=True, seed=0)
    train_contrastive(model, tokenizer, pair_data(items, catalog.root), config, workdir=tmp_path / "work")
    trained = wrap_open_clip(model, preprocess, tokenizer, name="trained")
    later = [ClickQuery("text", p.title.lower(), frozenset({p.product_id})) for p in items]
    gate = RetrainConfig(gate=GateConfig(min_mrr_gain=0.01, max_catalog_recall_drop=0.01))

    better = gate_candidate(untrained, trained, later, products, gate,
                            trained_on=frozenset(("text", q.query) for q in later[:10]))
    assert better["promote"] and better["mrr_gain"] > 0.05 and better["lift"]["ci_low"] > 0, better["why"]
    assert better["candidate"]["later_clicks"]["queries"] == len(items) and better["gallery"] == len(products)
    assert {k: v["queries"] for k, v in better["slices"].items()} == {
        "all": len(items), "seen_in_training": 10, "new": len(items) - 10}
    worse = gate_candidate(trained, untrained, later, products, gate)
    assert not worse["promote"] and "lower bound is not above" in worse["why"] and worse["lift"]["ci_high"] < 0
    guarded = gate_candidate(untrained, trained, later, products,
                             dataclasses.replace(gate, gate=GateConfig(min_mrr_gain=0.01, max_catalog_recall_drop=-1)))
    assert not guarded["promote"] and "catalog recall@1 dropped" in guarded["why"]


# ---------------------------------------------------------------- promotion, rollback


def _small_retrain(**gate) -> RetrainConfig:
    base = RetrainConfig(min_pairs=5, mining=MiningConfig(min_clicks=1))
    return dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=2),
                               gate=GateConfig(holdout_fraction=0.3, **gate))


def test_retrain_promotes_a_winner_and_activation_rolls_back_and_forward(home, databases):
    settings = _settings(home, databases)
    with TestClient(create_app(settings)) as client:
        assert _shop(client, home) > 20
        store = client.app.state.services.store
        before = store.active_index_version()

        # a bar no candidate can clear: the run is recorded, nothing changes
        rejected = run_retrain(store, home=home, config=_small_retrain(min_mrr_gain=1.0), device="cpu")
        assert (rejected.status, rejected.decision) == ("succeeded", "rejected")
        assert store.active_index_version().index_version == before.index_version
        assert not (home / "models" / rejected.candidate_model_version).exists()

        # any candidate that does not lose clicks MRR by more than 1.0 passes: promotion end to end
        outcome = run_retrain(store, home=home, config=_small_retrain(min_mrr_gain=-1.0, max_catalog_recall_drop=1.0),
                              device="cpu")
        assert (outcome.status, outcome.decision) == ("succeeded", "promoted")
        candidate = outcome.candidate_model_version
        assert store.active_index_version().index_version == outcome.index_version
        assert store.get_model_version(candidate).parent == "demo"
        # an adapter version (PRISM_RETRAIN_ADAPTERS is on by default): the adapters on MiniLM's
        # trunk and the trained heads, pointing at demo, a fraction of demo's size on disk
        models = home / "models"
        meta = json.loads((models / candidate / "model.json").read_text())
        assert meta["base_model"]["version"] == "demo" and meta["adapter"]["towers"] == ["text"]
        assert (models / candidate / "adapter_model.safetensors").is_file()
        assert not (models / candidate / "checkpoint.pt").exists()
        assert version_size(models, candidate) < 0.4 * version_size(models, "demo")
        assert outcome.metrics["training"]["stats"]["adapter_parameters"] > 0
        # the image tower has no adapters: frozen whole (its features computed once, not every step),
        # so the candidate embeds every image exactly as demo does
        assert outcome.metrics["training"]["stats"]["image_features_cached"]
        image = next(p.image_uri for p in store.live_products() if p.image_uri)
        served, tuned = (load_embedder(v, models_dir=models, device="cpu").encode_images([image])[0]
                         for v in ("demo", candidate))
        assert float(served @ tuned) > 0.9999
        mining = outcome.metrics["mining"]
        assert mining["pairs"] >= 5 and outcome.metrics["training_items"]["catalog_items"] > 0
        assert outcome.metrics["gate"]["candidate"]["later_clicks"]["queries"] > 0

        # The running server loads the promoted version in the background and then swaps.
        assert eventually(lambda: client.get("/v1/search", params={"q": "dog", "k": 3}).json()["model_version"] == candidate)
        runs = client.get("/v1/retrain").json()
        assert not runs["running"] and [r["decision"] for r in runs["runs"][:2]] == ["promoted", "rejected"]

        assert client.post("/v1/models/demo/activate").status_code == 401
        back = client.post("/v1/models/demo/activate", headers=ADMIN)
        assert back.status_code == 200 and back.json()["index_version"] == before.index_version and back.json()["serving"]
        assert client.get("/v1/search", params={"q": "dog", "k": 3}).json()["model_version"] == "demo"
        missing = client.post("/v1/models/no-such-version/activate", headers=ADMIN)
        assert missing.status_code == 404 and "no-such-version" in missing.json()["detail"]

    env = databases.env(home)
    forward = run_prism(["models", "activate", candidate], env)
    assert outcome.index_version in forward.stdout
    unknown = run_prism(["models", "activate", "nope"], env, check=False)
    assert unknown.returncode == 2 and "no model or index version" in unknown.stderr and "Traceback" not in unknown.stderr


def test_a_retrain_can_end_in_a_canary_instead_of_a_promotion(home, databases):
    settings = _settings(home, databases, retrain_promotion="canary")
    assert settings.retrain_config().promotion == "canary"
    config = dataclasses.replace(_small_retrain(min_mrr_gain=-1.0, max_catalog_recall_drop=1.0), promotion="canary",
                                 canary_fraction=0.5, canary=settings.canary_policy())
    with TestClient(create_app(settings)) as client:
        assert _shop(client, home) > 20
        store = client.app.state.services.store
        serving = store.active_index_version()
        outcome = run_retrain(store, home=home, config=config, device="cpu")
        assert (outcome.status, outcome.decision) == ("succeeded", "canary"), outcome.reason
        canary = store.running_canary()
        assert canary.candidate_index_version == outcome.index_version and canary.training_run_id == outcome.run_id
        assert (canary.serving_index_version, canary.fraction, canary.started_by) == (serving.index_version, 0.5, "retrain")
        assert store.active_index_version().index_version == serving.index_version  # a canary decides, not the run
        run = client.get("/v1/retrain").json()["runs"][0]
        assert run["decision"] == "canary" and run["metrics"]["canary"]["id"] == canary.id
        assert eventually(lambda: client.get("/v1/models").json()["canary"]["loaded"])
        # A second run while the canary runs trains nothing: its candidate could not be served.
        again = run_retrain(store, home=home, config=config, device="cpu")
        assert (again.status, again.decision) == ("skipped", "none") and "still running" in again.reason
        assert store.running_canary().id == canary.id
        # Nightly builds do not push the running canary's candidate out of retention.
        assert canary.candidate_index_version not in {v.index_version for v in store.retention_candidates(1)}


def test_a_run_killed_half_way_leaves_serving_intact_and_runs_never_overlap(home, databases):
    settings = _settings(home, databases)
    with TestClient(create_app(settings)) as client:
        _shop(client, home)
        store = client.app.state.services.store
        serving = store.active_index_version().index_version

        with job_lock(store, home):  # another run holds the lock
            assert is_running(store, home)
            with pytest.raises(RetrainBusyError):
                run_retrain(store, home=home, config=_small_retrain(), device="cpu")
            # The server never trains: a request is queued for a `prism worker` (tests/test_worker.py).
            queued = client.post("/v1/retrain", headers=ADMIN)
            assert queued.status_code == 202 and store.get_training_run(queued.json()["run_id"]).status == "queued"

        env = databases.env(home, PRISM_RETRAIN_EPOCHS="500", PRISM_RETRAIN_MIN_CLICKS="1", PRISM_RETRAIN_MIN_PAIRS="5",
                            PRISM_RETRAIN_MIN_MRR_GAIN="0")
        proc = subprocess.Popen(PRISM + ["retrain"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while not list((home / "models" / ".training").glob("ft-*/last.pt")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the retrain run never wrote a checkpoint"
            time.sleep(0.2)
        assert is_running(store, home)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

        assert not is_running(store, home)  # the dead run's lock went with its process
        assert store.active_index_version().index_version == serving
        assert client.get("/v1/search", params={"q": "dog", "k": 3}).status_code == 200
        assert store.list_training_runs()[0].status == "running"  # it died without a word

        outcome = run_retrain(store, home=home, config=_small_retrain(min_mrr_gain=5.0), device="cpu")
        assert outcome.decision == "rejected"
        runs = store.list_training_runs()
        assert runs[1].status == "failed" and "killed" in runs[1].metrics["error"]
        assert store.active_index_version().index_version == serving


def test_retrain_skips_without_enough_clicks_and_the_cli_says_so(home, databases):
    env = databases.env(home)
    proc = run_prism(["retrain"], env)
    assert "skipped" in proc.stdout and "fewer than min_pairs" in proc.stdout
    bad = run_prism(["retrain", "--nightly", "--at", "25:99"], env, check=False)
    assert bad.returncode == 2 and "HH:MM" in bad.stderr


def test_nightly_runs_at_the_set_time_and_survives_a_failed_run():
    now = datetime(2026, 11, 23, 22, 30)
    assert next_run(clock_time(3, 0), now) == datetime(2026, 11, 24, 3, 0)
    assert next_run(clock_time(23, 0), now) == datetime(2026, 11, 23, 23, 0)

    clock = [now]
    calls = []

    def job():
        calls.append(clock[0])
        if len(calls) == 1:
            raise RuntimeError("first run fails")

    def sleep(seconds):
        clock[0] += timedelta(seconds=seconds)

    run_nightly(job, clock_time(3, 0), now=lambda: clock[0], sleep=sleep, runs=2)
    assert [c.strftime("%d %H:%M") for c in calls] == ["24 03:00", "25 03:00"]


def test_retrain_settings_default_to_the_job_config_and_reach_it(monkeypatch):
    # api/settings repeats RetrainConfig's defaults (so the CLI need not import torch to show them).
    for name in [n for n in os.environ if n.startswith("PRISM_RETRAIN_")]:
        monkeypatch.delenv(name)
    assert PrismSettings(home=Path("unused")).retrain_config() == RetrainConfig()
    tuned = PrismSettings(home=Path("unused"), retrain_catalog_mix=0.5, retrain_min_clicks=3, retrain_epochs=7)
    config = tuned.retrain_config()
    assert (config.catalog_mix, config.mining.min_clicks, config.train.epochs) == (0.5, 3, 7)
