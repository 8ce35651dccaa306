import json

import pytest

from prism_cli import run_prism
from sample_catalog import make_catalog


def _run(args, env, check=True):
    return run_prism(args, env, check, timeout=300)


@pytest.fixture(scope="module")
def env(tmp_path_factory, databases):
    home = tmp_path_factory.mktemp("home")
    return databases.env(home, PRISM_MODEL="prism-tiny-vit:random")


def test_index_then_search_by_image_returns_that_product(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("cat")
    catalog = make_catalog(root, 60)
    out = _run(["index", str(catalog), "--batch-size", "16"], env)
    assert "products indexed" in out.stdout and "recall@10" in out.stdout
    res = _run(["search", "--image", str(root / "images" / "00031.png"), "--target", "image", "-k", "1", "--json"], env)
    body = json.loads(res.stdout)
    assert [r["product_id"] for r in body["results"]] == ["P00031"] and body["query_id"]
    listing = json.loads(_run(["models", "list", "--json"], env).stdout)
    assert [v["active"] for v in listing["indexes"]] == [True]


def test_cli_errors_are_messages_not_tracebacks(tmp_path, env):
    cases = [
        ["index", str(tmp_path / "missing.csv")],
        ["search"],
        ["search", "shoe", "--image", str(tmp_path / "x.png")],
        ["search", "shoe", "--target", "video"],
        ["search", "--image", str(tmp_path / "missing.png")],
        ["index", str(tmp_path / "missing.csv"), "--model", "NoSuchArch:random"],
    ]
    for args in cases:
        proc = _run(args, env, check=False)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr, (args, proc.stderr)
