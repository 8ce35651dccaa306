"""One nightly retrain with LoRA adapters against one without, on a copy of a demo home each.

Shoppers type each product's Chinese name (the demo's `title_zh`, which the indexed text does
not contain) and click it; the earlier searches train, the later ones judge (the retrain gate's
own split). Each variant runs `run_retrain` on its own copy of the same home with the same
events, the gate set to always promote (so its candidate is written and measured), and reports:
wall time of the run, training seconds, the gate's MRR on later Chinese clicks and catalog
recall@10 (serving -> candidate), and the candidate's size on disk against its base.

    python -m prism demo --no-serve --limit 300 --epochs 40   # PRISM_HOME=DIR, once
    python benchmarks/adapter_retrain.py --home DIR [--epochs 10] [--variants full,r8] [--products N]

Small on purpose (2 shared cores): figures in docs/feedback.md say what size they were run at.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "full": None,  # the fine-tune of the weights themselves (before adapters)
    "r8": {"rank": 8, "alpha": 16.0, "lr": 1e-3},
    # the image tower (no adapters) trains whole, as before PRISM_RETRAIN_ADAPTER_FREEZE_UNADAPTED
    "r8-image-trains": {"rank": 8, "alpha": 16.0, "lr": 1e-3, "freeze_unadapted": False},
    "r8-lr3e-4": {"rank": 8, "alpha": 16.0, "lr": 3e-4},
    "r16": {"rank": 16, "alpha": 32.0, "lr": 1e-3},
    "r4": {"rank": 4, "alpha": 8.0, "lr": 1e-3},
}


def log_traffic(store, products, *, seed: int, now: datetime, limit: int | None = None) -> dict:
    """Searches by Chinese name with a click on the named product; 3 earlier per query, 1 later.
    `limit`: only a seeded sample of that many named products is searched for (a full demo home)."""
    from store import EventInput

    rng = random.Random(seed)
    ids = [p.product_id for p in products]
    with_zh = [p for p in products if p.attributes.get("title_zh")]
    if limit is not None and limit < len(with_zh):
        with_zh = random.Random(f"{seed}:sample").sample(with_zh, limit)
    searches = clicks = 0
    for n, p in enumerate(with_zh):
        for k in range(4):
            ts = now - (timedelta(days=2, minutes=-n) if k < 3 else timedelta(hours=2, minutes=-n))
            position = min(24, int(rng.paretovariate(1.2)))
            shown = rng.sample([i for i in ids if i != p.product_id], 23)
            shown.insert(position - 1, p.product_id)
            qid = uuid.uuid4().hex
            store.log_search(query_id=qid, query_text=p.attributes["title_zh"], image_hash=None,
                             query_product_id=None, target="image", filters={}, k=24, offset=0,
                             model_version="demo", index_version="x", result_ids=shown, took_ms=1.0, ts=ts)
            events = [EventInput(f"{qid}-i-{j}", "impression", qid, pid, j + 1, ts + timedelta(seconds=2))
                      for j, pid in enumerate(shown)]
            events.append(EventInput(f"{qid}-c", "click", qid, p.product_id, position, ts + timedelta(seconds=9)))
            store.add_events(events)
            searches += 1
            clicks += 1
    return {"searches": searches, "clicks": clicks, "queries": len(with_zh)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--variants", default="full,r8")
    ap.add_argument("--products", type=int, default=None,
                    help="search for this many products' Chinese names (default: every one with a title_zh)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from api.settings import PrismSettings
    from embedder import AdapterSettings
    from feedback import GateConfig, run_retrain
    from feedback.versions import version_size
    from store import Store

    work = args.work or args.home.parent / f"{args.home.name}-adapter-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    now = datetime.now(timezone.utc)
    seeded = work / "seeded"
    shutil.copytree(args.home, seeded)
    store = Store.open(f"sqlite:///{seeded / 'prism.db'}")
    traffic = log_traffic(store, store.live_products(), seed=0, now=now, limit=args.products)
    traffic["catalog_products"] = len(store.live_products())
    store.close()
    results = {"traffic": traffic, "epochs": args.epochs, "variants": {}}
    for name in args.variants.split(","):
        v = VARIANTS[name]
        home = work / name
        shutil.copytree(seeded, home)
        settings = PrismSettings(home=home, device="cpu", database_url=f"sqlite:///{home / 'prism.db'}")
        base = settings.retrain_config()
        config = replace(
            base, min_pairs=5,
            train=replace(base.train, epochs=args.epochs, adapter_lr=(v or {}).get("lr")),
            adapters=None if v is None else AdapterSettings(rank=v["rank"], alpha=v["alpha"]),
            freeze_unadapted=(v or {}).get("freeze_unadapted", True),
            gate=GateConfig(holdout_fraction=0.25, min_mrr_gain=-1.0, max_catalog_recall_drop=1.0),
        )
        store = Store.open(settings.db_url)
        started = time.perf_counter()
        outcome = run_retrain(store, home=home, config=config, device="cpu", now=now)
        wall = time.perf_counter() - started
        gate = outcome.metrics.get("gate", {})
        candidate = outcome.candidate_model_version
        row = {
            "decision": outcome.decision, "reason": outcome.reason, "run_seconds": round(wall, 1),
            "train_seconds": outcome.metrics.get("training", {}).get("seconds"),
            "steps": outcome.metrics.get("training", {}).get("steps"),
            "trainable_parameters": outcome.metrics.get("training", {}).get("stats", {}).get("trainable_parameters"),
            "adapter_parameters": outcome.metrics.get("training", {}).get("stats", {}).get("adapter_parameters"),
            "training_items": outcome.metrics.get("training", {}).get("stats", {}).get("items"),
            "image_features_cached": outcome.metrics.get("training", {}).get("stats", {}).get("image_features_cached"),
            "text_features_cached": outcome.metrics.get("training", {}).get("stats", {}).get("text_features_cached"),
            "catalog_recall@1": [gate.get("serving", {}).get("catalog", {}).get("recall@1"),
                                 gate.get("candidate", {}).get("catalog", {}).get("recall@1")],
            "later_mrr_ci": [gate.get("lift", {}).get("ci_low"), gate.get("lift", {}).get("ci_high")],
            "later_mrr": [gate.get("serving", {}).get("later_clicks", {}).get("mrr"),
                          gate.get("candidate", {}).get("later_clicks", {}).get("mrr")],
            "later_queries": gate.get("candidate", {}).get("later_clicks", {}).get("queries"),
            "catalog_recall@10": [gate.get("serving", {}).get("catalog", {}).get("recall@10"),
                                  gate.get("candidate", {}).get("catalog", {}).get("recall@10")],
            "candidate_bytes": version_size(settings.models_dir, candidate) if candidate and outcome.decision == "promoted" else None,
            "base_bytes": version_size(settings.models_dir, "demo"),
        }
        if row["candidate_bytes"]:
            started = time.perf_counter()
            from embedder import load_embedder

            load_embedder(candidate, models_dir=settings.models_dir, device="cpu")
            row["load_seconds"] = round(time.perf_counter() - started, 2)
        store.close()
        results["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
