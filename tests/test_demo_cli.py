"""`prism demo --no-serve` and `prism eval` end to end, on a small slice of the OpenMoji catalog.

The real demo trains for minutes; here `--limit` and `--epochs` keep the same code path short.
"""

import json
import shutil

import pytest

from prism_cli import run_prism


def _run(args, env, check=True):
    return run_prism(args, env, check)


@pytest.fixture(scope="module")
def demo_home(small_demo_home):
    return small_demo_home


def test_demo_builds_trains_indexes_and_reuses(demo_home):
    home, env, first = demo_home
    assert "demo model (trained in" in first.stderr and "CC BY-SA 4.0" in first.stderr
    meta = json.loads((home / "models" / "demo" / "model.json").read_text())
    assert meta["arch"] == "prism-demo-minilm" and meta["hyper_parameters"]["epochs"] == 60
    assert meta["training"]["epochs_done"] == 60 and set(meta["metrics"]) <= {"test", "full"}
    assert not (home / "models" / ".training" / "demo").exists()  # the resume checkpoint is gone once written
    listing = json.loads(_run(["models", "list", "--json"], env).stdout)
    assert [m["model_version"] for m in listing["models"]] == ["demo"]
    assert [v["model_version"] for v in listing["indexes"] if v["active"]] == ["demo"]

    again = _run(["demo", "--no-serve", "--limit", "150", "--epochs", "60"], env)
    assert "demo model (reused)" in again.stderr
    other = _run(["demo", "--no-serve", "--limit", "150", "--epochs", "61"], env, check=False)
    assert other.returncode == 2 and "immutable" in other.stderr and "Traceback" not in other.stderr


def test_search_the_demo_by_text(demo_home):
    home, env, _ = demo_home
    body = json.loads(_run(["search", "flag", "--target", "image", "-k", "5", "--json"], env).stdout)
    assert len(body["results"]) == 5 and body["model_version"] == "demo"


def test_eval_reports_recall_and_mrr_side_by_side(demo_home):
    home, env, _ = demo_home
    report = json.loads(_run(["eval", "--json"], env).stdout)
    full = report["demo"]["full"]
    for direction in ("text_to_image", "image_to_text", "title_to_image"):
        assert set(full[direction]["recall"]) == {"@1", "@5", "@10"} and 0 < full[direction]["mrr"] <= 1
    assert full["gallery"] > 140
    shutil.copytree(home / "models" / "demo", home / "models" / "demo-copy")  # same weights, another version
    both = _run(["eval", "--model", "demo", "--compare", "demo-copy"], env)
    assert "delta" in both.stdout and "demo-copy" in both.stdout and "+0.000" in both.stdout
    assert "-0.0" not in both.stdout.replace("-0.000", "")
    same = _run(["eval", "--compare", "demo"], env, check=False)
    assert same.returncode == 2 and "different version" in same.stderr
    missing = _run(["eval", "--model", "no-such-version"], env, check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_eval_reports_the_quality_cost_of_a_precision(demo_home):
    home, env, _ = demo_home
    report = json.loads(_run(["eval", "--precision", "int8", "--json"], env).stdout)
    assert set(report) == {"demo", "demo (int8)"}
    fp32, int8 = report["demo"]["full"], report["demo (int8)"]["full"]
    assert int8["gallery"] == fp32["gallery"] and 0 < int8["text_to_image"]["mrr"] <= 1
    assert fp32["extra"]["precision"] == "fp32" and int8["extra"]["precision"] == "int8"
    table = _run(["eval", "--precision", "int8"], env).stdout
    assert "demo (int8)" in table and "delta" in table
    both = _run(["eval", "--compare", "demo", "--precision", "int8"], env, check=False)
    assert both.returncode == 2 and "give one" in both.stderr


def test_eval_without_a_demo_catalog_says_what_to_do(tmp_path, databases):
    env = databases.env(tmp_path)
    proc = _run(["eval"], env, check=False)
    assert proc.returncode == 2 and "prism demo" in proc.stderr


def test_the_page_credits_openmoji(demo_home, databases):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import PrismSettings

    home, _, _ = demo_home
    with TestClient(create_app(PrismSettings(home=home, device="cpu", database_url=databases.url(home)))) as client:
        facets = client.get("/v1/facets").json()
        assert "OpenMoji" in facets["credits"] and "CC BY-SA 4.0" in facets["credits"]
        assert {c["value"] for c in facets["categories"]} >= {"Flags"}
        hits = client.get("/v1/search", params={"q": "flag", "k": 3}).json()["results"]
        assert len(hits) == 3 and all(h["image_url"] for h in hits)


def test_the_spot_checks_in_docs_demo_md_are_written_from_the_demo(demo_home, tmp_path):
    """docs/demo.md's spot checks come from a script run on the demo, not from memory."""
    import subprocess
    import sys
    from pathlib import Path

    home, env, _ = demo_home
    root = Path(__file__).resolve().parents[1]
    doc = tmp_path / "demo.md"
    shutil.copy(root / "docs" / "demo.md", doc)
    out = tmp_path / "spot.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "demo_spot_checks.py"), "--home", str(home),
                           "--doc", str(doc), "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(out.read_text())
    served = [json.loads(_run(["search", q["query"], "-k", "5", "--json"], env).stdout) for q in body["queries"][:2]]
    for check, result in zip(body["queries"], served):
        assert check["top"] == [r["title"] for r in result["results"]]  # what `prism search` shows
    text = doc.read_text()
    assert text.count("<!-- spot-checks:start -->") == 1 and f"| \"{body['queries'][0]['query']}\" |" in text
    assert "; ".join(body["queries"][0]["top"]) in text
