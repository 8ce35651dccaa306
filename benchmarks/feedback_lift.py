"""How much the click loop helps: simulated shoppers, `prism retrain`, the served ranking before and after.

1. The demo (`prism demo --no-serve`, reused when PRISM_HOME has it) is served by `prism serve`.
2. Populations of shoppers (`--shoppers`), each with its own vocabulary: a query and the products
   it names, with all their skin-tone variants:
   - `catalog`: every product's English title and aliases, the words the index already holds;
   - `zh`: Chinese shoppers: each product's CLDR Chinese name (attributes.title_zh) and its CLDR
     zh keywords (Debian unicode-cldr-core, annotations/zh.xml);
   - `colloquial`: English the catalog does not use: Unicode character names ("thumbs down sign"),
     NamesList.txt's informal aliases ("twister"), CLDR's regional English names and keywords
     (en_GB, en_AU, en_CA, en_IN, en_001);
   - `typo`: the catalog's titles and aliases with one random edit (delete, insert, substitute,
     swap) in every word of three letters or more, the same misspelling each time.
   Generated phrases (zh, colloquial) are kept only when withheld from the indexed text (title and
   description): not a substring of any product's text, and with a word the named products' texts
   lack; and only when they name at most 3 emoji (a keyword like "face" judges nothing).
   A seeded 20% of each vocabulary is held out: shoppers never send it before the retrain.
3. Shoppers draw queries from the rest with a Zipf-like head (the query at popularity rank r
   has weight 1 / r ** s), search through `GET /v1/search` (image target, one page of 24
   results, as the search page shows), and
   click by the position-based model: a result at position k is examined with probability
   1 / k ** eta; an examined relevant result is clicked with probability `p_relevant`, an
   examined irrelevant one with `p_noise`. A shopper who sees nothing they want on the page
   narrows the search with probability `p_refine`: the same words, filtered to the category of
   what they look for (as the page's category filter does), and examines that page the same way.
   They post the impressions of everything shown and their clicks through `POST /v1/events`.
4. A night: every population's traffic, interleaved in time (shoppers of all populations search
   at the same hours, so the latest searches, which the gate judges on, hold every population),
   then `prism retrain` (mining, fine-tune, gate, promotion); `--nights` of them.
5. Per population, future traffic on the queries sent before ("seen": a fresh seeded draw from
   the same distribution) and the held-out queries ("unseen") are searched before the first
   night and after the last; each query's served top 10 is scored against its relevant
   products: MRR@10 and recall@10. `prism eval` gives the English catalog title -> image recall@1
   (full demo catalog) and the attributes.title_zh slice of both models.

Usage:

    python benchmarks/feedback_lift.py [--home DIR] [--shoppers zh,colloquial,typo] [--nights 1]
        [--train-queries 4000] [--eval-queries 1500] [--demo-limit N --demo-epochs E] [--retrain-epochs E]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import re
import tempfile
import time
import unicodedata
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


# ---- shopper populations: what each kind of shopper types for the products they want

POPULATIONS = ("catalog", "zh", "colloquial", "typo")
NAMES_LIST = Path("/usr/share/unicode/NamesList.txt")  # Debian unicode-data (`make unicode`)
ENGLISH_VARIANTS = ("en_GB", "en_AU", "en_CA", "en_IN", "en_001")  # CLDR regional English
MAX_GROUPS = 3  # a generated phrase naming more emoji than this is too vague to judge a ranking by


def indexed_texts(catalog) -> dict[str, str]:
    """What the demo index embeds and searches per product (title and description, as PRISM_TEXT_FIELDS
    sets by default), normalised as shopper queries are."""
    from feedback import normalise_query
    from indexer import product_text

    return {p.product_id: normalise_query(product_text(p)) for p in catalog.products}


def _groups(catalog) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = defaultdict(set)
    for p in catalog.products:
        groups[p.variant_group].add(p.product_id)
    return groups


def _phrases_to_vocabulary(catalog, named: dict[str, set[str]], *, withheld: bool) -> dict[str, frozenset[str]]:
    """Phrase -> the products (with their skin-tone variants) it names. With `withheld`, only
    phrases the indexed text does not hold: not a substring of any product's indexed text, and
    with a word of three letters or more that the texts of the products it names (all variants) lack."""
    from feedback import normalise_query

    groups = _groups(catalog)
    group_of = {p.product_id: p.variant_group for p in catalog.products}
    texts = indexed_texts(catalog)
    corpus = "\n".join(texts.values())
    out: dict[str, frozenset[str]] = {}
    for phrase, ids in named.items():
        q = normalise_query(phrase)
        names = {group_of[i] for i in ids}
        if not q or len(names) > MAX_GROUPS:
            continue
        relevant = frozenset(pid for g in names for pid in groups[g])
        if withheld:
            own = " ".join(texts[i] for i in relevant)
            if q in corpus or not any(len(w) >= 3 and w not in own for w in re.findall(r"\w+", q)):
                continue
        out[q] = relevant
    return dict(sorted(out.items()))


def _by_emoji(catalog) -> dict[str, list]:
    table: dict[str, list] = defaultdict(list)
    for p in catalog.products:
        table[p.emoji.replace("\ufe0f", "")].append(p)
    return table


def zh_vocabulary(catalog) -> dict[str, frozenset[str]]:
    """Chinese shoppers: each product's CLDR Chinese name (attributes.title_zh) and its CLDR zh
    keywords (Debian unicode-cldr-core, annotations/zh.xml): text the English index never holds."""
    from indexer.openmoji import CLDR_DIRS, read_cldr

    cldr = next((d for d in CLDR_DIRS if (d / "annotations" / "zh.xml").is_file()), None)
    if cldr is None:
        raise SystemExit("CLDR zh annotations not found (annotations/zh.xml): `make unicode` installs unicode-cldr-core")
    keywords, _ = read_cldr(cldr, "zh")
    named: dict[str, set[str]] = defaultdict(set)
    for text, products in _by_emoji(catalog).items():
        for p in products:
            for phrase in ([p.title_zh] if p.title_zh else []) + keywords.get(text, []):
                if re.search(r"[\u3400-\u9fff]", phrase):  # a few zh keywords are Latin ("SUV")
                    named[phrase].add(p.product_id)
    return _phrases_to_vocabulary(catalog, named, withheld=True)


def colloquial_vocabulary(catalog) -> dict[str, frozenset[str]]:
    """English the catalog does not use: Unicode character names ("thumbs down sign") and the informal
    aliases of NamesList.txt ("= twister"), CLDR's regional English names and keywords (en_GB,
    en_AU, ...); kept only where withheld from the indexed text (`_phrases_to_vocabulary`)."""
    from indexer.openmoji import CLDR_DIRS, read_cldr

    by_emoji = _by_emoji(catalog)
    named: dict[str, set[str]] = defaultdict(set)

    def add(text: str, phrase: str) -> None:
        for p in by_emoji.get(text, []):
            named[phrase.strip()].add(p.product_id)

    for text in by_emoji:
        if len(text) == 1 and unicodedata.name(text, ""):
            add(text, unicodedata.name(text).lower())
    if NAMES_LIST.is_file():
        current = None
        for line in NAMES_LIST.read_text(encoding="utf-8", errors="replace").splitlines():
            if m := re.match(r"^([0-9A-F]{4,6})\t", line):
                current = chr(int(m.group(1), 16))
            elif line.startswith("\t= ") and current:
                for alias in line[3:].split(","):
                    add(current, alias)
    cldr = next((d for d in CLDR_DIRS if (d / "annotations").is_dir()), None)
    for locale in ENGLISH_VARIANTS if cldr else ():
        keywords, names = read_cldr(cldr, locale)
        for text, words in keywords.items():
            for w in words:
                add(text, w)
        for text, name in names.items():
            add(text, name)
    return _phrases_to_vocabulary(catalog, named, withheld=True)


def misspell(text: str, rng: random.Random) -> str:
    """One random edit (delete, insert, substitute, swap two neighbours) in every word of three
    letters or more; shorter words stay as typed."""
    letters = "abcdefghijklmnopqrstuvwxyz"

    def edit(word: str) -> str:
        if len(word) < 3 or not word.isalpha():
            return word
        i = rng.randrange(len(word))
        op = rng.choice(("delete", "insert", "substitute", "swap"))
        if op == "delete":
            return word[:i] + word[i + 1:]
        if op == "insert":
            return word[:i] + rng.choice(letters) + word[i:]
        if op == "substitute":
            return word[:i] + rng.choice(letters.replace(word[i], "")) + word[i + 1:]
        swappable = [j for j in range(len(word) - 1) if word[j] != word[j + 1]]
        if not swappable:  # "aaa": a swap changes nothing; drop a letter instead
            return word[1:]
        j = min(swappable, key=lambda j: abs(j - i))
        return word[:j] + word[j + 1] + word[j] + word[j + 2:]

    return " ".join(edit(w) for w in text.split(" "))


def typo_vocabulary(catalog, seed: int) -> dict[str, frozenset[str]]:
    """The catalog's own titles and aliases, each misspelt once, the same way every time it is
    typed (a common misspelling recurs); misspellings that spell another catalog query are dropped."""
    exact = vocabulary(catalog)
    out: dict[str, frozenset[str]] = {}
    for q, ids in exact.items():
        typo = misspell(q, random.Random(f"{seed}:{q}"))
        if typo != q and typo not in exact:
            out[typo] = out.get(typo, frozenset()) | ids
    return dict(sorted(out.items()))


def population_vocabulary(name: str, catalog, seed: int) -> dict[str, frozenset[str]]:
    if name == "catalog":
        return vocabulary(catalog)
    if name == "zh":
        return zh_vocabulary(catalog)
    if name == "colloquial":
        return colloquial_vocabulary(catalog)
    if name == "typo":
        return typo_vocabulary(catalog, seed)
    raise SystemExit(f"unknown shopper population {name!r}; choose from {', '.join(POPULATIONS)}")


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


def send_traffic(client, plan: dict, visits: list[tuple[str, str]], rngs: dict[str, random.Random], page: int,
                 category_of: dict[str, str], p_refine: float) -> dict:
    """Send `visits` ((population, query), in order) and their events; the counts per population."""
    batch, counts = [], {name: defaultdict(int) for name in plan}
    for name, q in visits:
        vocab, shoppers, rng, n = plan[name]["vocab"], plan[name]["shoppers"], rngs[name], counts[name]
        result = search(client, q, page)
        wanted = sorted({category_of[pid] for pid in vocab[q]})
        tries = [result]
        if not any(h["product_id"] in vocab[q] for h in result["results"]) and rng.random() < p_refine:
            tries.append(search(client, q, page, category=rng.choice(wanted)))
            n["refined"] += 1
        for served in tries:
            batch += [event("impression", served["query_id"], hit) for hit in served["results"]]
            clicked = shoppers.clicks(served["results"], vocab[q], rng)
            batch += [event("click", served["query_id"], hit) for hit in clicked]
            n["searches"] += 1
            n["clicks"] += len(clicked)
        if len(batch) >= 500:
            post_events(client, batch)
            batch = []
    if batch:
        post_events(client, batch)
    return {name: dict(n) for name, n in counts.items()}


def night_visits(plan: dict, queries_each: int, seed: int, night: int) -> list[tuple[str, str]]:
    """One night's searches of every population, interleaved in a seeded order.

    Shoppers of all populations search at the same hours. Sent one population after another, the
    latest searches (the slice the retrain's gate judges on) would all come from the last one.
    """
    visits = [(name, q) for name, pl in plan.items()
              for q in pl["shoppers"].draw(queries_each, random.Random(f"{seed}:{name}:night{night}"))]
    random.Random(f"{seed}:interleave:night{night}").shuffle(visits)
    return visits


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
    parser.add_argument("--shoppers", default="zh,colloquial,typo",
                        help=f"comma-separated populations: {', '.join(POPULATIONS)} (catalog: the catalog's own words)")
    parser.add_argument("--nights", type=int, default=1, help="traffic then `prism retrain`, this many times")
    parser.add_argument("--train-queries", type=int, default=4000,
                        help="searches per population per night whose clicks feed the retrain")
    parser.add_argument("--eval-queries", type=int, default=1500, help="searches per population and slice measured")
    parser.add_argument("--unseen-fraction", type=float, default=0.2)
    parser.add_argument("--page-size", type=int, default=24, help="results a shopper sees (the page shows 24)")
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--eta", type=float, default=1.0, help="examination 1 / position ** eta")
    parser.add_argument("--p-relevant", type=float, default=0.9)
    parser.add_argument("--p-noise", type=float, default=0.02)
    parser.add_argument("--p-refine", type=float, default=0.7, help="narrow to the category when the page has nothing")
    parser.add_argument("--demo-limit", type=int, default=None, help="`prism demo --limit`: a small demo catalog")
    parser.add_argument("--demo-epochs", type=int, default=None, help="`prism demo --epochs` (with --demo-limit)")
    parser.add_argument("--retrain-epochs", type=int, default=None,
                        help="PRISM_RETRAIN_EPOCHS for each night's retrain (default: the setting's, 40)")
    parser.add_argument("--min-clicks", type=int, default=None,
                        help="PRISM_RETRAIN_MIN_CLICKS for each night's retrain (default: the setting's, 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "feedback_lift.json")
    args = parser.parse_args()
    populations = [p.strip() for p in args.shoppers.split(",") if p.strip()]
    for name in populations:
        if name not in POPULATIONS:
            parser.error(f"unknown population {name!r}; choose from {', '.join(POPULATIONS)}")

    import httpx

    from embed_throughput import machine_info
    from indexer import load_demo_catalog
    from prism_server import PrismServer

    home = (args.home or Path(tempfile.mkdtemp(prefix="prism-lift-"))).resolve()
    token = uuid.uuid4().hex
    env = {**os.environ, "PRISM_HOME": str(home), "PRISM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "PRISM_ADMIN_TOKEN": token}
    if args.retrain_epochs:
        env["PRISM_RETRAIN_EPOCHS"] = str(args.retrain_epochs)
    if args.min_clicks:
        env["PRISM_RETRAIN_MIN_CLICKS"] = str(args.min_clicks)
    started = time.perf_counter()
    print(f"demo in {home} (built or reused) ...", flush=True)
    demo_args = ["demo", "--no-serve"]
    if args.demo_limit:
        demo_args += ["--limit", str(args.demo_limit)]
    if args.demo_epochs:
        demo_args += ["--epochs", str(args.demo_epochs)]
    demo = run_cli(demo_args, env)
    if demo.returncode != 0:
        raise SystemExit(f"prism demo failed:\n{demo.stderr[-3000:]}")
    catalog = load_demo_catalog(home / "demo")
    category_of = categories(catalog)

    plan = {}
    for n, name in enumerate(populations):
        vocab = population_vocabulary(name, catalog, args.seed)
        rng = random.Random(f"{args.seed}:{name}")
        order = sorted(vocab)
        rng.shuffle(order)
        n_unseen = int(len(order) * args.unseen_fraction)
        unseen, seen = order[:n_unseen], order[n_unseen:]
        shoppers = Shoppers(seen, args.zipf_s, args.eta, args.p_relevant, args.p_noise)
        plan[name] = {
            "vocab": vocab, "shoppers": shoppers,
            "seen": shoppers.draw(args.eval_queries, random.Random(f"{args.seed}:{name}:future")),
            "unseen": random.Random(f"{args.seed}:{name}:unseen").sample(unseen, min(len(unseen), args.eval_queries)),
            "sizes": {"queries": len(vocab), "seen": len(seen), "unseen": len(unseen)},
        }
        print(f"{name}: {len(vocab)} distinct queries ({len(seen)} sent, {len(unseen)} held out)", flush=True)

    def measure_all(client) -> dict:
        return {name: {key: measure(client, pl["vocab"], pl[key]) for key in ("seen", "unseen")}
                for name, pl in plan.items()}

    nights = []
    server = PrismServer(env).start(timeout_s=300)
    try:
        client = httpx.Client(base_url=server.url, timeout=60)
        first_model = server.wait_ready()["model_version"]
        print(f"serving {first_model}; measuring before ...", flush=True)
        before = measure_all(client)
        for night in range(args.nights):
            rngs = {name: random.Random(f"{args.seed}:{name}:clicks{night}") for name in plan}
            traffic = send_traffic(client, plan, night_visits(plan, args.train_queries, args.seed, night), rngs,
                                   args.page_size, category_of, args.p_refine)
            print(f"night {night + 1}: traffic {traffic}; prism retrain ...", flush=True)
            t0 = time.perf_counter()
            retrain = run_cli(["retrain", "--json"], env)
            retrain_s = time.perf_counter() - t0
            if retrain.returncode != 0:
                raise SystemExit(f"prism retrain failed:\n{retrain.stderr[-3000:]}")
            outcome = json.loads(retrain.stdout)
            gate = outcome["metrics"].get("gate") or {}
            print(f"night {night + 1}: {outcome['status']}, {outcome['decision']} "
                  f"({outcome.get('reason') or gate.get('why')}), {retrain_s:.0f} s", flush=True)
            if outcome["index_version"]:
                server.wait_ready(index_version=outcome["index_version"])
            nights.append({"traffic": traffic, "status": outcome["status"], "decision": outcome["decision"],
                           "reason": outcome.get("reason"), "serving_model_version": outcome["serving_model_version"],
                           "candidate_model_version": outcome["candidate_model_version"],
                           "retrain_seconds": round(retrain_s, 1), "gate": gate,
                           "mining": outcome["metrics"].get("mining"),
                           "training": {k: (outcome["metrics"].get("training") or {}).get(k)
                                        for k in ("steps", "seconds", "epochs_done", "stats")},
                           "training_items": outcome["metrics"].get("training_items")})
        last_model = server.wait_ready()["model_version"]
        after = measure_all(client)
    finally:
        server.stop()

    catalog_eval = catalog_recall(env, first_model, last_model)

    def rel(b: float, a: float) -> float | None:
        return round((a - b) / b, 4) if b else None

    result: dict = {
        "benchmark": "feedback_lift",
        "home": str(home),
        "settings": vars(args) | {"home": str(home), "out": str(args.out)},
        "populations": populations,
        "models": {"before": first_model, "after": last_model},
    }
    for name in populations:
        result[name] = {key: {"queries": before[name][key]["queries"],
                              "mrr_before": before[name][key]["mrr@10"], "mrr_after": after[name][key]["mrr@10"],
                              "mrr_relative_lift": rel(before[name][key]["mrr@10"], after[name][key]["mrr@10"]),
                              "recall@10_before": before[name][key]["recall@10"],
                              "recall@10_after": after[name][key]["recall@10"]}
                        for key in ("seen", "unseen")} | {"vocabulary": plan[name]["sizes"]}
    result |= {
        "catalog_title_recall@1": catalog_eval.get("title_recall@1"),
        "catalog_eval": catalog_eval,
        "nights": nights,
        "retrain_seconds": [n["retrain_seconds"] for n in nights],
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print_table(result)
    print(f"wrote {args.out}")


def catalog_recall(env: dict, before: str, after: str) -> dict:
    """English catalog title -> image recall@1 (full demo catalog) and the title_zh slice, for the
    model served before the first night and after the last (`prism eval`)."""
    args = ["eval", "--model", after, "--json"] + (["--compare", before] if after != before else [])
    ev = run_cli(args, env)
    if ev.returncode != 0:
        return {"error": ev.stderr[-1000:]}
    reports = json.loads(ev.stdout)
    out: dict = {}
    for name, version in (("before", before), ("after", after)):
        report = reports[version]
        out.setdefault("title_recall@1", {})[name] = report["full"]["title_to_image"]["recall"]["@1"]
        zh = report.get("languages", {}).get("attributes.title_zh")
        if zh:
            out.setdefault("title_zh_mrr", {})[name] = zh["scores"]["mrr"]
            out.setdefault("title_zh_recall@1", {})[name] = zh["scores"]["recall"]["@1"]
    return out


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    decisions = ", ".join(n["decision"] for n in result["nights"])
    table = Table(title=f"feedback lift by shopper population: {len(result['nights'])} night(s) ({decisions}), "
                        f"retrain {', '.join(f'{s:.0f} s' for s in result['retrain_seconds'])}")
    for col in ("population", "queries", "n", "MRR@10 before", "after", "relative", "recall@10 before", "after"):
        table.add_column(col, justify="left" if col in ("population", "queries") else "right")
    for name in result["populations"]:
        for key, label in (("seen", "seen (sent before the retrain)"), ("unseen", "never sent before")):
            r = result[name][key]
            lift = "" if r["mrr_relative_lift"] is None else f"{r['mrr_relative_lift']:+.1%}"
            table.add_row(name, label, str(r["queries"]), f"{r['mrr_before']:.4f}", f"{r['mrr_after']:.4f}", lift,
                          f"{r['recall@10_before']:.4f}", f"{r['recall@10_after']:.4f}")
    ev = result["catalog_eval"]
    for metric, label in (("title_recall@1", "catalog title->image recall@1"), ("title_zh_mrr", "title_zh slice MRR")):
        if metric in ev:
            b, a = ev[metric]["before"], ev[metric]["after"]
            table.add_row("prism eval", label, "", f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f} abs", "", "")
    Console().print(table)


if __name__ == "__main__":
    main()
