"""How much the click loop helps: simulated shoppers, `prism retrain`, the served ranking before and after.

1. The demo (`prism demo --no-serve`, reused when PRISM_HOME has it) is served by `prism serve`.
2. Vocabulary: every demo product's English title and aliases, lower-cased. A query's relevant
   products are every product that has it as title or alias, with all their skin-tone variants.
   A seeded 20% of the vocabulary is held out: shoppers never send it before the retrain.
3. Shoppers draw queries from the rest with a Zipf-like head (the query at popularity rank r
   has weight 1 / r ** s), search through `GET /v1/search` (image target, one page of 24
   results, as the search page shows), and
   click by the position-based model: a result at position k is examined with probability
   1 / k ** eta; an examined relevant result is clicked with probability `p_relevant`, an
   examined irrelevant one with `p_noise`. A shopper who sees nothing they want on the page
   narrows the search with probability `p_refine`: the same words, filtered to the category of
   what they look for (as the page's category filter does), and examines that page the same way.
   They post the impressions of everything shown and their clicks through `POST /v1/events`.
4. `prism retrain` runs the nightly job once (mining, fine-tune, gate, promotion).
5. Future traffic (a fresh seeded draw from the same distribution) and the held-out queries are
   searched before and after; each query's served top 10 is scored against its relevant
   products: MRR@10 and recall@10 (a relevant product in the top 10). Catalog recall@10
   (title -> image over the full demo catalog, `prism eval`) is compared for both models.

Usage:

    python benchmarks/feedback_lift.py [--home DIR] [--train-queries 4000] [--eval-queries 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

K = 10


def categories(catalog) -> dict[str, str]:
    return {p.product_id: p.category for p in catalog.products}


def vocabulary(catalog) -> dict[str, frozenset[str]]:
    from feedback import normalise_query  # the mining's rule, so shopper queries match mined ones

    groups: dict[str, set[str]] = defaultdict(set)
    for p in catalog.products:
        groups[p.variant_group].add(p.product_id)
    relevant: dict[str, set[str]] = defaultdict(set)
    for p in catalog.products:
        for text in (p.title, *p.aliases):
            if text.strip():
                relevant[normalise_query(text)] |= groups[p.variant_group]
    return {q: frozenset(ids) for q, ids in sorted(relevant.items())}


class Shoppers:
    def __init__(self, queries: list[str], zipf_s: float, eta: float, p_relevant: float, p_noise: float):
        self.queries = queries
        self.weights = [1.0 / (rank + 1) ** zipf_s for rank in range(len(queries))]
        self.eta, self.p_relevant, self.p_noise = eta, p_relevant, p_noise

    def draw(self, n: int, rng: random.Random) -> list[str]:
        return rng.choices(self.queries, weights=self.weights, k=n)

    def clicks(self, results: list[dict], relevant: frozenset[str], rng: random.Random) -> list[dict]:
        out = []
        for hit in results:
            if rng.random() >= 1.0 / hit["rank"] ** self.eta:
                continue  # not examined
            p = self.p_relevant if hit["product_id"] in relevant else self.p_noise
            if rng.random() < p:
                out.append(hit)
        return out


def event(kind: str, query_id: str, hit: dict) -> dict:
    return {"event_id": uuid.uuid4().hex, "type": kind, "query_id": query_id, "product_id": hit["product_id"],
            "position": hit["rank"], "ts": datetime.now(timezone.utc).isoformat()}


def search(client, q: str, k: int = K, category: str | None = None) -> dict:
    params = {"q": q, "target": "image", "k": k}
    if category:
        params["category"] = category
    r = client.get("/v1/search", params=params)
    r.raise_for_status()
    return r.json()


def send_traffic(client, shoppers: Shoppers, vocab, queries: list[str], rng: random.Random, page: int,
                 category_of: dict[str, str], p_refine: float) -> dict:
    batch, counts = [], defaultdict(int)
    for q in queries:
        result = search(client, q, page)
        wanted = sorted({category_of[pid] for pid in vocab[q]})
        tries = [result]
        if not any(h["product_id"] in vocab[q] for h in result["results"]) and rng.random() < p_refine:
            tries.append(search(client, q, page, category=rng.choice(wanted)))
            counts["refined"] += 1
        for served in tries:
            batch += [event("impression", served["query_id"], hit) for hit in served["results"]]
            clicked = shoppers.clicks(served["results"], vocab[q], rng)
            batch += [event("click", served["query_id"], hit) for hit in clicked]
            counts["searches"] += 1
            counts["clicks"] += len(clicked)
        if len(batch) >= 500:
            post_events(client, batch)
            batch = []
    if batch:
        post_events(client, batch)
    return dict(counts)


def post_events(client, batch: list[dict]) -> None:
    r = client.post("/v1/events", json=batch)
    if r.status_code != 200:
        raise SystemExit(f"POST /v1/events failed: {r.status_code} {r.text[:500]}")


def measure(client, vocab, queries: list[str]) -> dict:
    reciprocal, hits = [], []
    for q in queries:
        ranks = [h["rank"] for h in search(client, q)["results"] if h["product_id"] in vocab[q]]
        first = min(ranks) if ranks else None
        reciprocal.append(1.0 / first if first else 0.0)
        hits.append(1.0 if first else 0.0)
    n = max(1, len(queries))
    return {"queries": len(queries), "mrr@10": round(sum(reciprocal) / n, 4), "recall@10": round(sum(hits) / n, 4)}


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, cwd=HERE.parent,
                          capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="PRISM_HOME with (or for) the demo; default: a temp dir")
    parser.add_argument("--train-queries", type=int, default=4000, help="searches whose clicks feed the retrain")
    parser.add_argument("--eval-queries", type=int, default=1500, help="future-traffic searches measured before/after")
    parser.add_argument("--unseen-fraction", type=float, default=0.2)
    parser.add_argument("--page-size", type=int, default=24, help="results a shopper sees (the page shows 24)")
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--eta", type=float, default=1.0, help="examination 1 / position ** eta")
    parser.add_argument("--p-relevant", type=float, default=0.9)
    parser.add_argument("--p-noise", type=float, default=0.02)
    parser.add_argument("--p-refine", type=float, default=0.7, help="narrow to the category when the page has nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "feedback_lift.json")
    args = parser.parse_args()

    import httpx

    from embed_throughput import machine_info
    from indexer import load_demo_catalog
    from prism_server import PrismServer

    home = (args.home or Path(tempfile.mkdtemp(prefix="prism-lift-"))).resolve()
    token = uuid.uuid4().hex
    env = {**os.environ, "PRISM_HOME": str(home), "PRISM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "PRISM_ADMIN_TOKEN": token}
    started = time.perf_counter()
    print(f"demo in {home} (built or reused) ...", flush=True)
    demo = run_cli(["demo", "--no-serve"], env)
    if demo.returncode != 0:
        raise SystemExit(f"prism demo failed:\n{demo.stderr[-3000:]}")
    catalog = load_demo_catalog(home / "demo")
    vocab = vocabulary(catalog)

    rng = random.Random(args.seed)
    order = sorted(vocab)
    rng.shuffle(order)
    n_unseen = int(len(order) * args.unseen_fraction)
    unseen, seen = order[:n_unseen], order[n_unseen:]
    shoppers = Shoppers(seen, args.zipf_s, args.eta, args.p_relevant, args.p_noise)
    future = shoppers.draw(args.eval_queries, random.Random(args.seed + 1))
    unseen_sample = random.Random(args.seed + 2).sample(unseen, min(len(unseen), args.eval_queries))

    server = PrismServer(env).start(timeout_s=300)
    try:
        client = httpx.Client(base_url=server.url, timeout=60)
        before_version = server.wait_ready()
        print(f"serving {before_version['model_version']}; sending {args.train_queries} shopper searches ...", flush=True)
        traffic = send_traffic(client, shoppers, vocab, shoppers.draw(args.train_queries, random.Random(args.seed + 3)),
                               random.Random(args.seed + 4), args.page_size, categories(catalog), args.p_refine)
        print(f"traffic: {traffic}; measuring before ...", flush=True)
        before = {"future": measure(client, vocab, future), "unseen": measure(client, vocab, unseen_sample)}

        print("prism retrain ...", flush=True)
        t0 = time.perf_counter()
        retrain = run_cli(["retrain", "--json"], env)
        retrain_s = time.perf_counter() - t0
        if retrain.returncode != 0:
            raise SystemExit(f"prism retrain failed:\n{retrain.stderr[-3000:]}")
        outcome = json.loads(retrain.stdout)
        print(f"retrain: {outcome['status']}, {outcome['decision']} ({outcome.get('reason') or outcome['metrics'].get('gate', {}).get('why')})", flush=True)
        if outcome["index_version"]:
            server.wait_ready(index_version=outcome["index_version"])
        after = {"future": measure(client, vocab, future), "unseen": measure(client, vocab, unseen_sample)}
    finally:
        server.stop()

    catalog_recall = {}
    if outcome.get("candidate_model_version") and outcome["decision"] == "promoted":
        ev = run_cli(["eval", "--model", outcome["candidate_model_version"],
                      "--compare", outcome["serving_model_version"], "--json"], env)
        if ev.returncode == 0:
            reports = json.loads(ev.stdout)
            for name, version in (("candidate", outcome["candidate_model_version"]),
                                  ("compare", outcome["serving_model_version"])):
                full = reports[version]["full"]
                catalog_recall[name] = {"title_to_image_recall@10": full["title_to_image"]["recall"]["@10"],
                                        "text_to_image_recall@10": full["text_to_image"]["recall"]["@10"]}

    def lift(key: str, metric: str) -> float:
        b = before[key][metric]
        return round((after[key][metric] - b) / b, 4) if b else float("nan")

    result = {
        "benchmark": "feedback_lift",
        "home": str(home),
        "settings": vars(args) | {"home": str(home), "out": str(args.out)},
        "vocabulary": {"queries": len(vocab), "seen": len(seen), "unseen": len(unseen)},
        "traffic": traffic,
        "retrain": {"status": outcome["status"], "decision": outcome["decision"],
                    "serving_model_version": outcome["serving_model_version"],
                    "candidate_model_version": outcome["candidate_model_version"],
                    "seconds": round(retrain_s, 1), "gate": outcome["metrics"].get("gate"),
                    "mining": outcome["metrics"].get("mining"), "training_items": outcome["metrics"].get("training_items")},
        "before": before,
        "after": after,
        "relative_lift": {f"{key}_{metric}": lift(key, metric) for key in ("future", "unseen")
                          for metric in ("mrr@10", "recall@10")},
        "catalog_recall@10": catalog_recall,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"feedback lift: {traffic['searches']} shopper searches ({traffic.get('refined', 0)} "
                        f"narrowed to a category), {traffic['clicks']} clicks, "
                        f"retrain {outcome['decision']}")
    for col in ("traffic", "metric", "before", "after", "relative"):
        table.add_column(col, justify="left" if col in ("traffic", "metric") else "right")
    for key, label in (("future", "future (same distribution)"), ("unseen", "queries never seen in training")):
        for metric in ("mrr@10", "recall@10"):
            table.add_row(label, metric, f"{before[key][metric]:.4f}", f"{after[key][metric]:.4f}",
                          f"{result['relative_lift'][f'{key}_{metric}']:+.1%}")
    if catalog_recall:
        for metric in ("title_to_image_recall@10", "text_to_image_recall@10"):
            b, a = catalog_recall["compare"][metric], catalog_recall["candidate"][metric]
            table.add_row("catalog (full demo, prism eval)", metric.replace("_recall@10", " recall@10"),
                          f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f} abs")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
