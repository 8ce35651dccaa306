"""Spot checks of the demo: what `prism search TEXT -k 5` ranks for a few everyday queries.

Runs on a home that `prism demo --no-serve` built, prints a table, writes
benchmarks/results/demo_spot_checks.json and rewrites the table in docs/demo.md between its
`spot-checks` markers, so the page always shows what the current demo returns (it was written by
hand once and drifted).

    python benchmarks/demo_spot_checks.py [--home prism-data] [--doc docs/demo.md] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# (query, the product a shopper means: its exact demo title)
QUERIES = [
    ("pizza", "pizza"),
    ("dog", "dog"),
    ("umbrella", "umbrella"),
    ("red apple", "red apple"),
    ("running shoe", "running shoe"),
    ("birthday cake", "birthday cake"),
    ("fire engine", "fire engine"),
    ("flag of japan", "flag: Japan"),
]
K = 5
START, END = "<!-- spot-checks:start -->", "<!-- spot-checks:end -->"


def run(home: Path) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from api.settings import PrismSettings
    from search import SearchEngine, Target
    from store import Store

    settings = PrismSettings(home=home)
    store = Store.open(settings.db_url)
    try:
        engine = SearchEngine(store, indexes_dir=settings.indexes_dir, models_dir=settings.models_dir, device="cpu")
        if not engine.refresh() and not engine.ready:
            raise SystemExit(f"no index version is serving in {home}: run `prism demo --no-serve` first")
        rows = []
        for query, meant in QUERIES:
            hits = engine.search(text=query, target=Target.IMAGE, k=K).hits
            titles = [h.product.title for h in hits]
            wanted = next((p for p in _by_title(store, meant)), None)
            rank = next((h.rank for h in hits if wanted is not None and h.product.product_id == wanted.product_id), None)
            rows.append({
                "query": query,
                "meant": meant,
                "meant_in_catalog": wanted is not None,
                "meant_split": None if wanted is None else wanted.attributes.get("split"),
                "rank_of_meant": rank,
                "top": titles,
                "model_version": engine.serving.version.model_version,
                "index_version": engine.serving.version.index_version,
            })
        return rows
    finally:
        store.close()


def _by_title(store, title: str):
    return [p for chunk in store.iter_live_products() for p in chunk if p.title.lower() == title.lower()]


def markdown(rows: list[dict]) -> str:
    lines = [
        f"Spot checks (`prism search TEXT -k {K}`, text→image, the ranking the page shows; written by "
        "`benchmarks/demo_spot_checks.py` from the current demo):",
        "",
        "| query | the product meant (split) | its rank | top 5 |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        meant = f"{r['meant']} ({r['meant_split'] or '?'})" if r["meant_in_catalog"] else f"{r['meant']} (not in the catalog)"
        rank = "–" if r["rank_of_meant"] is None else str(r["rank_of_meant"])
        lines.append(f"| \"{r['query']}\" | {meant} | {rank} | {'; '.join(r['top'])} |")
    found = sum(r["rank_of_meant"] is not None for r in rows)
    lines += ["", f"{found} of {len(rows)} queries have the product meant in the top {K}. "
              "A miss on a test-split product is a concept the model never saw in training."]
    return "\n".join(lines)


def rewrite(doc: Path, table: str) -> None:
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} has no {START} ... {END} block to rewrite")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    tmp.replace(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("PRISM_HOME", "prism-data")))
    parser.add_argument("--doc", type=Path, default=HERE.parent / "docs" / "demo.md")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "demo_spot_checks.json")
    args = parser.parse_args()
    rows = run(args.home)
    table = markdown(rows)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"k": K, "queries": rows}, indent=2, ensure_ascii=False))
    rewrite(args.doc, table)
    print(f"\nwrote {args.json} and the spot checks in {args.doc}")


if __name__ == "__main__":
    main()
