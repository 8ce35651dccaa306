"""Does the interleaved canary pick the better ranker, and never promote a worse one?

A ranking-level simulation with Prism's own canary code: `search.interleave` (the draw that
decides whether a query is interleaved and its coin flips, and the team draft), `feedback.canary`
(`tally`: per-arm credit and wins; `decide`: the rule, with `CanaryPolicy`'s defaults). Only the
shoppers and the two rankers are simulated; no server, no model.

- Queries: `--queries` distinct queries, drawn by Zipf (s = 1.1) popularity per session. Each has
  `--items` candidate products, 4 of them relevant with graded relevance (0.9, 0.6, 0.4, 0.2;
  the rest 0.02).
- Rankers: a model sorts a query's products by relevance plus Gaussian noise (sd 0.35), drawn
  once per (query, product): the same query always gets the same ranking. Its degraded
  checkpoint adds more noise (sd 0.3) to the same scores. The better of the two is the one with
  the higher MRR (of each query's most relevant product) on the traffic, popularity-weighted;
  both MRRs, on the traffic and over all queries alike, are in the output.
- Shoppers: see a page of 10 (the interleaved list), examine rank r with probability 1/r (the
  position-based model of docs/feedback.md), click an examined product with probability its
  relevance. The page reports impressions of all 10 and its clicks.
- The canary interleaves every session (fraction 1); each session is one search, drawn and its
  coins flipped on its own (`search_draw` without a session, as for an API client that sends
  none). Prism's rule is applied every 25 sessions, as a server reviews every few seconds, until
  it decides or `--sessions` (3,000) are spent.

Scenarios (20 seeds each): a better candidate (should be promoted), a worse candidate (must never
be promoted), and a candidate that ranks exactly as the serving version (A/A: any decision is a
false one; repeated testing, and the per-query unit, make it likelier than alpha).

    python benchmarks/canary_sim.py            # about 10 seconds

Prints a table and writes benchmarks/results/canary_sim.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from feedback.canary import CanaryPolicy, CanaryStats, decide, tally  # noqa: E402
from search.interleave import ARM_NAMES, search_draw, team_draft  # noqa: E402
from store import CanarySearch  # noqa: E402

PAGE = 10
REVIEW_EVERY = 25
RELEVANCE = (0.9, 0.6, 0.4, 0.2)
NOISE, DEGRADED = 0.35, 0.3  # a model's score noise; the extra noise of its degraded checkpoint
SCENARIOS = ("better candidate", "worse candidate", "same ranker (A/A)")


def make_world(rng: np.random.Generator, queries: int, items: int) -> np.ndarray:
    """Relevance of each query's candidate products: 4 graded ones at random places, the rest low."""
    relevance = np.full((queries, items), 0.02)
    for q in range(queries):
        places = rng.choice(items, size=len(RELEVANCE), replace=False)
        relevance[q, places] = RELEVANCE
    return relevance


def rankings(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def offline_mrr(ranked: np.ndarray, relevance: np.ndarray, weights: np.ndarray | None = None) -> float:
    """MRR of each query's most relevant product, over queries (weighted by `weights`: traffic)."""
    best = relevance.argmax(axis=1)
    ranks = np.argmax(ranked == best[:, None], axis=1) + 1
    return float(np.average(1.0 / ranks, weights=weights))


def simulate(seed: int, scenario: str, args, policy: CanaryPolicy) -> dict:
    rng = np.random.default_rng(seed)
    relevance = make_world(rng, args.queries, args.items)
    popularity = 1.0 / np.arange(1, args.queries + 1) ** 1.1
    popularity /= popularity.sum()
    # A model and a degraded checkpoint of it (more noise on the same scores). Which one is better
    # is judged where the canary judges it, on the traffic (MRR weighted by query popularity): on
    # a few head queries a degraded checkpoint can be the luckier one.
    scores = relevance + rng.normal(0.0, NOISE, size=relevance.shape)
    model = rankings(scores)
    checkpoint = rankings(scores + rng.normal(0.0, args.degraded, size=relevance.shape))
    high, low = sorted((model, checkpoint), key=lambda r: -offline_mrr(r, relevance, popularity))
    serving, candidate = {"better candidate": (low, high), "worse candidate": (high, low),
                          "same ranker (A/A)": (high, high)}[scenario]
    examine = 1.0 / np.arange(1, PAGE + 1)
    canary_id = seed  # a canary per simulation: its own draws and coin flips
    searches: list[CanarySearch] = []
    stats = CanaryStats()
    decision, why, sessions = None, "", 0
    traffic = rng.choice(args.queries, size=args.sessions, p=popularity)
    for session, q in enumerate(traffic.tolist(), start=1):
        # A shopper's one search, with no session: drawn, and its coins flipped, on its own.
        draw, coin_seed = search_draw(canary_id, query_id=f"{seed}-{session}", session=None, query=f"query-{q}")
        if draw < args.fraction:
            merged = team_draft(serving[q][:PAGE].tolist(), candidate[q][:PAGE].tolist(), PAGE, coin_seed)
            shown = np.asarray([item for item, _ in merged])
            looked = rng.random(PAGE) < examine
            clicked = looked & (rng.random(PAGE) < relevance[q, shown])
            searches.append(CanarySearch(
                f"{seed}-{session}", 0, [ARM_NAMES[arm] for _, arm in merged],
                frozenset(range(1, PAGE + 1)), frozenset(int(i) + 1 for i in np.flatnonzero(clicked))))
        if session % REVIEW_EVERY == 0 or session == args.sessions:
            decision, why = decide(tally(searches, into=stats), policy)
            searches.clear()  # counted
            if decision is not None:
                sessions = session
                break
    weights = np.bincount(traffic[:session], minlength=args.queries)
    return {"seed": seed, "decision": decision or "undecided", "sessions": sessions or args.sessions,
            "interleaved": stats.searches, "decided": stats.decided, "candidate_wins": stats.candidate.wins,
            "serving_wins": stats.serving.wins, "p_value": stats.p_value, "p_sequential": stats.p_sequential,
            "offline_mrr": {"serving": round(offline_mrr(serving, relevance), 4),
                            "candidate": round(offline_mrr(candidate, relevance), 4)},
            # what the canary measures: MRR over the queries its sessions asked
            "traffic_mrr": {"serving": round(offline_mrr(serving, relevance, weights), 4),
                            "candidate": round(offline_mrr(candidate, relevance, weights), 4)}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=3000, help="most sessions a canary may take to decide")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--degraded", type=float, default=DEGRADED,
                        help="extra score noise of the degraded checkpoint: smaller, a closer race")
    parser.add_argument("--fixed-test", action="store_true",
                        help="decide on the fixed-sample sign test's p-value (PRISM_CANARY_SEQUENTIAL=false)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "canary_sim.json")
    args = parser.parse_args(argv)
    policy = CanaryPolicy(sequential=not args.fixed_test)
    started = time.perf_counter()
    report = {"config": {"seeds": args.seeds, "sessions": args.sessions, "queries": args.queries, "items": args.items,
                         "fraction": args.fraction, "page": PAGE, "review_every": REVIEW_EVERY,
                         "noise": NOISE, "degraded_extra_noise": args.degraded, "policy": policy.to_dict()},
              "scenarios": {}}
    print(f"{'scenario':<18} {'MRR serving':>11} {'MRR cand.':>9} {'promoted':>8} {'stopped':>7} {'undecided':>9} "
          f"{'median sessions':>15}   (MRR: on the sessions' traffic)")
    for name in SCENARIOS:
        runs = [simulate(seed, name, args, policy) for seed in range(args.seeds)]
        counts = {d: sum(r["decision"] == d for r in runs) for d in ("promote", "stop", "undecided")}
        decided = [r["sessions"] for r in runs if r["decision"] != "undecided"]
        summary = {
            "promoted": counts["promote"], "stopped": counts["stop"], "undecided": counts["undecided"],
            "median_sessions_to_decision": float(np.median(decided)) if decided else None,
            "offline_mrr": {arm: round(float(np.mean([r["offline_mrr"][arm] for r in runs])), 4)
                            for arm in ("serving", "candidate")},
            "traffic_mrr": {arm: round(float(np.mean([r["traffic_mrr"][arm] for r in runs])), 4)
                            for arm in ("serving", "candidate")},
            "runs": runs,
        }
        report["scenarios"][name] = summary
        print(f"{name:<18} {summary['traffic_mrr']['serving']:>11.3f} {summary['traffic_mrr']['candidate']:>9.3f} "
              f"{counts['promote']:>8} {counts['stop']:>7} {counts['undecided']:>9} "
              f"{summary['median_sessions_to_decision'] or '-':>15}")
    better, worse = report["scenarios"]["better candidate"], report["scenarios"]["worse candidate"]
    report["targets"] = {
        "better_promoted_share": better["promoted"] / args.seeds, "better_promoted_target": 0.95,
        "worse_promoted": worse["promoted"], "worse_promoted_target": 0,
        "met": better["promoted"] / args.seeds >= 0.95 and worse["promoted"] == 0,
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(f"better candidate promoted in {better['promoted']}/{args.seeds} (target >= 95%), worse candidate "
          f"promoted in {worse['promoted']}/{args.seeds} (target 0); {report['seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
