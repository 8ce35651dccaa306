"""`make reliability`: Prism's fault and load scenarios at full size; writes docs/reliability.md.

    python benchmarks/reliability.py [--postgres-url URL] [--quick]

1. durability   20,000 events from 32 clients through `prism serve` (2 workers): once undisturbed,
                once with the whole server SIGKILLed mid-stream and restarted; retried batches.
2. crash        SIGKILL during `prism index`, an index-version build and `prism retrain`
                (benchmarks/crash_faults.py); the active version must keep serving.
3. hot swap     32 clients stream text and image searches while two index versions (two model
                versions) are activated back and forth over HTTP.
4. bad input    schemathesis over every route and the hostile-input battery (tests/), longer.

Scenarios 1 and 3 run on SQLite, and on PostgreSQL too when --postgres-url is given (`make
reliability` starts a throwaway server with .ci/with-postgres). Results: benchmarks/results/
reliability.json and docs/reliability.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embed_throughput import machine_info, save_random_checkpoint  # noqa: E402
from load_faults import durability, hot_swap  # noqa: E402
from sample_catalog import draw_product_image, make_catalog  # noqa: E402

TINY = "prism-tiny-vit:random"
RESULTS = HERE / "results" / "reliability.json"
DOC = ROOT / "docs" / "reliability.md"


def _database_url(home: Path, server_url: str | None) -> str:
    if server_url is None:
        return f"sqlite:///{home.resolve() / 'prism.db'}"
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = "prism_reliability_" + home.name.replace("-", "_").lower()
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def two_version_home(root: Path, n_products: int, server_url: str | None) -> tuple[Path, str, list[str]]:
    """A home serving n products, indexed twice by two model versions (tiny ViT, seeded random)."""
    from embedder import load_embedder
    from indexer import CatalogIndexer, IndexOptions
    from store import Store

    home = root / ("home-pg" if server_url else "home-sqlite")
    catalog = make_catalog(root / "catalog", n_products) if not (root / "catalog").exists() else root / "catalog" / "catalog.csv"
    checkpoint = root / "tiny.pt"
    if not checkpoint.exists():
        save_random_checkpoint("prism-tiny-vit", checkpoint)
    url = _database_url(home, server_url)
    store = Store.open(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for spec in (TINY, f"prism-tiny-vit:{checkpoint}"):
                embedder = load_embedder(spec, device="cpu")
                CatalogIndexer(home=home, store=store, embedder=embedder, options=IndexOptions(batch_size=64)).run(catalog)
        versions = [v.index_version for v in store.list_index_versions()]
    finally:
        store.close()
    return home, url, versions


def _env(home: Path, url: str) -> dict[str, str]:
    env = {**os.environ, "PRISM_HOME": str(home), "PRISM_DATABASE_URL": url, "PRISM_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "PRISM_THREADS": "1"}
    return env


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    draw_product_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def run_load(root: Path, server_url: str | None, args, durability_too: bool = True) -> dict:
    home, url, versions = two_version_home(root, args.products, server_url)
    env = _env(home, url)
    out = {"database": "postgresql" if server_url else "sqlite", "products": args.products, "index_versions": versions}
    for name, kill in (("durability_clean", None), ("durability_sigkill", 0.4)) if durability_too else ():
        print(f"[{out['database']}] {name}: {args.events} events, {args.clients} clients ...", flush=True)
        out[name] = durability(env, url, events=args.events, clients=args.clients, batch_size=args.batch,
                               kill_at_fraction=kill, workers=2, log=root / f"{name}.log")
        print(json.dumps(out[name]), flush=True)
    print(f"[{out['database']}] hot swap: {args.swaps} swaps, {args.clients} clients ...", flush=True)
    out["hot_swap"] = hot_swap(env, versions, swaps=args.swaps, interval_s=1.0, clients=args.clients, workers=2,
                               image=_png(4242), log=root / "hot_swap.log")
    print(json.dumps(out["hot_swap"]), flush=True)
    print(f"[{out['database']}] hot swap on two replicas sharing the database and PRISM_SHARED_DIR ...", flush=True)
    out["hot_swap_replicas"] = hot_swap(env, versions, swaps=args.swaps, interval_s=1.0, clients=args.clients, workers=1,
                                        image=_png(4242), log=root / "hot_swap_replicas.log",
                                        replica_homes=[root / "replica-0", root / "replica-1"])
    print(json.dumps(out["hot_swap_replicas"]), flush=True)
    return out


def run_crash(root: Path, args) -> dict:
    """On SQLite only: the suite runs the same scenarios (small) on PostgreSQL, and full size on both
    would double the longest part of this script."""
    import crash_faults

    return crash_faults.run_all(root, full=not args.quick)


def run_bad_input(args) -> dict:
    """The schemathesis run and the hostile battery from the test suite, with more fuzz examples."""
    report = Path(tempfile.mkdtemp(prefix="prism-fuzz-")) / "junit.xml"
    env = {**os.environ, "PRISM_FUZZ_EXAMPLES": str(args.fuzz_examples), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         "tests/test_schema_fuzz.py", "tests/test_hostile_input.py"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    import xml.etree.ElementTree as ET

    suite = ET.parse(report).getroot().find("testsuite") if report.exists() else None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}
    # test_every_route_was_fuzzed prints a summary line and one line per operation (cases, statuses).
    out_lines = proc.stdout.splitlines()
    start = next((i for i, line in enumerate(out_lines) if line.startswith("schemathesis:")), None)
    fuzz = [] if start is None else [out_lines[start]] + [
        line for line in out_lines[start + 1 : start + 40] if line.startswith("  ") and "(" in line
    ]
    return {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - started, 1), "fuzz_examples": args.fuzz_examples,
            "fuzz_summary": fuzz, **counts, "tail": proc.stdout[-1500:] if proc.returncode else ""}


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(results: dict) -> str:
    m = results.get("machine", {})
    lines = [
        "# Reliability: load, faults and bad input",
        "",
        "Generated by `make reliability` (`benchmarks/reliability.py`; raw figures in",
        "`benchmarks/results/reliability.json`). Do not edit by hand: rerun it.",
        "",
        f"Host: {m.get('cpus', '?')} cores, {m.get('platform', '')}, load average {m.get('loadavg_start', '?')} at the"
        f" start; finished {results.get('finished_at', '?')}"
        + (" (**--quick sizes**)" if results.get("quick") else "") + ".",
        "",
    ]
    if results.get("parts_from_earlier_runs"):
        lines += [f"Rerun partially: {results['parts_from_earlier_runs']}", ""]
    lines += _headline(results)
    for load in results.get("load", []):
        db = load["database"]
        lines += [f"## Events and hot swap on {db}", "",
                  f"`prism serve` with 2 workers over {load['products']} products; two index versions built by two "
                  "model versions." + (" The throwaway PostgreSQL server (`.ci/with-postgres`) runs with `fsync=off`:"
                                       " a killed Prism process, not a killed database, is the fault injected here."
                                       if db == "postgresql" else ""), ""]
        lines += [_row(["run", "events", "clients", "acknowledged", "rows added", "lost", "answered duplicate", "retries after ack (all answered duplicate)",
                        "SIGKILLs (acked at kill, downtime)", "failed posts (retried)", "events/s", "post p50 / p99 ms"]),
                  _row(["---"] * 12)]
        for name in ("durability_clean", "durability_sigkill"):
            r = load.get(name)
            if not r:
                continue
            kills = ", ".join(f"{k['acked_at_kill']} acked, {k.get('downtime_s', '?')} s down" for k in r["kills"]) or "none"
            lines.append(_row([
                name.split("_")[1], r["events"], r["clients"], r["acknowledged"], r["rows_added"],
                f"**{r['lost']}**", r["duplicate_answers"], f"{r['retries_after_ack']} ({r['retries_answered_all_duplicates']})",
                kills, r["failed_posts"], r["events_per_s"], f"{r['post_p50_ms']} / {r['post_p99_ms']}",
            ]))
        swap_runs = [(label, load[key]) for key, label in (("hot_swap", "one server"),
                                                           ("hot_swap_replicas", "two replicas")) if key in load]
        if swap_runs:
            lines += ["", _row(["hot swap", "clients", "swaps (ok)", "queries", "failed", "served by version",
                                "p50 / p99 / max ms"]), _row(["---"] * 7)]
            for label, h in swap_runs:
                lines.append(_row([label, h["clients"], f"{h['swaps']} ({h['activations_ok']})", h["queries"],
                                   f"**{h['failed']}**", ", ".join(f"{v}: {n}" for v, n in h["versions_served"].items()),
                                   f"{h['p50_ms']} / {h['p99_ms']} / {h['max_ms']}"]))
        lines.append("")
    crash = results.get("crash")
    if crash:
        lines += ["## Crash safety: SIGKILL during index, build and retrain (SQLite)", ""]
        lines += _render_crash(crash)
    bad = results.get("bad_input")
    if bad:
        lines += ["## Bad input (SQLite)", "",
                  f"`tests/test_schema_fuzz.py` (schemathesis over every route of `/openapi.json`, "
                  f"{bad['fuzz_examples']} examples per operation) and `tests/test_hostile_input.py` (hostile files, "
                  "text and catalogs): "
                  f"{bad.get('tests', '?')} tests, {bad.get('failures', '?')} failures, {bad.get('errors', '?')} errors, "
                  f"in {bad['seconds']} s.", ""]
        summary = bad.get("fuzz_summary", [])
        if summary:
            lines += [summary[0].strip(), "", "```"] + [line.rstrip() for line in summary[1:]] + ["```", ""]
            lines += ["Random cases cannot guess a logged `query_id` or draw a decodable image, so they reach "
                      "`POST /v1/events` and the upload routes only up to validation; storing events and decoding "
                      "hostile images are covered by the battery and `tests/test_feedback.py`."]
        lines.append("")
    return "\n".join(lines) + "\n"


def _headline(results: dict) -> list[str]:
    """The figures that matter, summed over every run: what was thrown at Prism, what was lost."""
    out = ["## Summary", ""]
    loads = results.get("load", [])
    runs = [load[name] for load in loads for name in ("durability_clean", "durability_sigkill") if name in load]
    if runs:
        out.append(
            f"- **Events**: {sum(r['events'] for r in runs):,} events in {len(runs)} runs of {runs[0]['clients']} concurrent "
            f"clients ({', '.join(load['database'] for load in loads)}), {sum(len(r['kills']) for r in runs)} of them with the "
            f"server SIGKILLed mid-stream; {sum(r['acknowledged'] for r in runs):,} acknowledged, "
            f"**lost {sum(r['lost'] for r in runs)}**, rows added {sum(r['rows_added'] for r in runs):,}; "
            f"{sum(r['retries_after_ack'] for r in runs)} verbatim retries of acknowledged batches added nothing, and "
            f"{sum(r['duplicate_answers'] for r in runs)} events committed just before a kill (answer lost) were "
            "absorbed as duplicates when the client retried."
        )
    swaps = [load[key] for load in loads for key in ("hot_swap", "hot_swap_replicas") if key in load]
    if swaps:
        out.append(
            f"- **Hot swap**: {sum(h['swaps'] for h in swaps)} activations under {swaps[0]['clients']} streaming clients, "
            f"{sum(h['queries'] for h in swaps):,} text and image queries, **failed {sum(h['failed'] for h in swaps)}**."
        )
    crash = results.get("crash")
    if crash:
        scenarios = [crash[n] for n in ("index", "build", "retrain") if n in crash]
        out.append(
            f"- **Crashes**: {sum(r.get('kills', 0) for r in scenarios)} SIGKILLs during `prism index`, an index build and "
            f"`prism retrain`; partial versions activated: **{sum(r.get('partial_versions_activated', 0) for r in scenarios)}**; "
            f"the active version served after every kill: {all(r.get('served_ok_after_kill') for r in scenarios)}; "
            f"every rerun completed: {all(r.get('rerun_ok') for r in scenarios)}; leftovers after reruns: "
            f"{sum(len(r.get('leftovers_after_rerun') or []) for r in scenarios)}."
        )
    bad = results.get("bad_input")
    if bad:
        cases = next((line.split(" cases")[0].split()[-1] for line in bad.get("fuzz_summary", [])[:1]), "?")
        out.append(
            f"- **Bad input**: {cases} schemathesis cases over every route and {bad.get('tests', '?')} tests of the "
            f"hostile battery and fuzz checks; failures: **{bad.get('failures', '?')}** (any 5xx or schema-breaking "
            "answer is a failure)."
        )
    return out + [""]


def _render_crash(crash: dict) -> list[str]:
    sizes = crash.get("sizes", {})
    out = [f"Sizes: {sizes.get('products', '?')} products for index and build, retrain on a demo home, "
           f"{sizes.get('retrain_epochs', '?')} fine-tune epochs; stage kills at named points plus "
           f"{sizes.get('time_kills', '?')} kills at measured times. After every kill the active version must be "
           "unchanged, load with its checksums and answer searches; no partial version may be active or "
           "activatable; the rerun must finish and leave nothing behind.", ""]
    keys = ["scenario", "kills", "stages killed in", "active unchanged, serving", "partial versions activated",
            "leftovers before rerun", "rerun", "leftovers after rerun", "verdict"]
    out += [_row(keys), _row(["---"] * len(keys))]
    for name in ("index", "build", "retrain"):
        r = crash.get(name)
        if not r:
            continue
        stages = sorted(set(r.get("kill_stages") or []))
        leftovers = r.get("leftovers_before_rerun") or []
        out.append(_row([
            name, r.get("kills"), ", ".join(stages), r.get("served_ok_after_kill"), r.get("partial_versions_activated"),
            len(leftovers), "ok" if r.get("rerun_ok") else "FAILED", len(r.get("leftovers_after_rerun") or []),
            "ok" if r.get("ok") else "FAILED: " + "; ".join(r.get("failures", []))[:300],
        ]))
    return out + [""]


def write_doc(results: dict) -> None:
    DOC.write_text(render(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres-url", default=os.environ.get("PRISM_TEST_DATABASE_URL"),
                        help="also run the load scenarios on PostgreSQL (default: $PRISM_TEST_DATABASE_URL)")
    parser.add_argument("--quick", action="store_true", help="small sizes, to try the script")
    parser.add_argument("--only", choices=("load", "hot-swap", "crash", "bad-input"), action="append",
                        help="run only these parts (repeatable); hot-swap is the load part without durability")
    args = parser.parse_args()
    args.events, args.clients, args.batch, args.swaps, args.products = (
        (2_000, 8, 20, 4, 200) if args.quick else (20_000, 32, 25, 40, 2_000)
    )
    args.fuzz_examples = 50 if args.quick else 1000
    parts = set(args.only or ("load", "crash", "bad-input"))

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() and args.only else {}
    results["machine"] = machine_info()
    results["quick"] = args.quick
    with tempfile.TemporaryDirectory(prefix="prism-reliability-") as tmp:
        root = Path(tmp)
        if parts & {"load", "hot-swap"}:
            durability_too = "load" in parts
            fresh = [run_load(root, None, args, durability_too)]
            if args.postgres_url:
                fresh.append(run_load(root, args.postgres_url, args, durability_too))
            # a hot-swap-only run keeps the durability figures of the last full run
            earlier = {run["database"]: run for run in results.get("load", [])}
            results["load"] = [run if durability_too else {**earlier.get(run["database"], {}), **run} for run in fresh]
        if "crash" in parts:
            results["crash"] = run_crash(root / "crash", args)
        if "bad-input" in parts:
            print("bad input: schemathesis + hostile battery ...", flush=True)
            results["bad_input"] = run_bad_input(args)
    if args.only:
        kept = [name for name, part in (("load (durability)", "load"), ("crash", "crash"), ("bad-input", "bad-input"))
                if part not in parts]
        results["parts_from_earlier_runs"] = (f"{', '.join(kept)} from the run that finished "
                                              f"{results.get('finished_at', '?')}; {', '.join(sorted(parts))} from this one.")
    else:
        results.pop("parts_from_earlier_runs", None)
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    write_doc(results)
    print(f"wrote {RESULTS.relative_to(ROOT)} and {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
