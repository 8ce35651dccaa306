"""`prism eval` by language field: a catalog's Chinese titles (attributes.title_zh) as queries
against its images, without the demo catalog and without the click simulator.

The tiny model's weights are random, so the scores mean nothing semantically; the test checks
what the slice is (one query per distinct value, the products holding it as its answers, the
whole catalog as gallery) against ranks computed here from the same model's vectors.
"""

import json

import numpy as np
import pytest

from embedder import load_embedder
from prism_cli import run_prism
from sample_catalog import draw_product_image

TINY = "prism-tiny-vit:random"
# (id, English title, Chinese title, Japanese title); C1 and C2 share a Chinese title (two sizes
# of one thing), C5 has none: 4 distinct Chinese queries over 5 holders, 2 Japanese ones.
PRODUCTS = [
    ("C1", "red running shoe", "红色跑步鞋", "赤いランニングシューズ"),
    ("C2", "red running shoe, large", "红色跑步鞋", None),
    ("C3", "blue leather handbag", "蓝色皮革手提包", "青い革のハンドバッグ"),
    ("C4", "green baseball cap", "绿色棒球帽", None),
    ("C5", "white cotton shirt", None, None),
    ("C6", "black steel watch", "黑色不锈钢手表", None),
]


@pytest.fixture
def zh_home(tmp_path, databases):
    root = tmp_path / "catalog"
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (pid, title, zh, ja) in enumerate(PRODUCTS):
        draw_product_image(200 + i, 64).save(root / "images" / f"{pid}.png")
        attributes = {k: v for k, v in (("title_zh", zh), ("title_ja", ja)) if v}
        lines.append(json.dumps({"product_id": pid, "title": title, "image": f"images/{pid}.png",
                                 "attributes": attributes}, ensure_ascii=False))
    (root / "catalog.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    home = tmp_path / "home"
    env = databases.env(home, PRISM_MODEL=TINY)
    run_prism(["index", str(root / "catalog.jsonl")], env)
    return home, env, root


def _expected(root, field_index: int) -> tuple[int, float]:
    """(queries, MRR) computed here: each distinct value's best-placed holder among all images."""
    embedder = load_embedder(TINY, device="cpu")
    images = [str(root / "images" / f"{p[0]}.png") for p in PRODUCTS]
    vectors = np.concatenate([b.vectors for b in embedder.embed_images(enumerate(images), batch_size=8)])
    values = [p[field_index] for p in PRODUCTS]
    queries = sorted({v for v in values if v})
    reciprocal = []
    for q, qv in zip(queries, embedder.encode_texts(queries)):
        scores = vectors @ qv
        best = max(scores[i] for i, v in enumerate(values) if v == q)
        reciprocal.append(1.0 / (1 + int((scores > best).sum())))
    return len(queries), round(float(np.mean(reciprocal)), 4)


def test_prism_eval_reports_a_slice_per_language_field(zh_home):
    home, env, root = zh_home
    # No demo catalog in this home: the language slices are the whole report.
    fields = {**env, "PRISM_EVAL_LANGUAGE_FIELDS": "attributes.title_zh,attributes.title_ja"}
    report = json.loads(run_prism(["eval", "--json"], fields).stdout)
    (model,) = report
    zh = report[model]["languages"]["attributes.title_zh"]
    queries, mrr = _expected(root, 2)
    assert (zh["field"], zh["products"], zh["gallery"], zh["scores"]["queries"]) == ("attributes.title_zh", 5, 6, queries)
    assert queries == 4 and zh["scores"]["mrr"] == pytest.approx(mrr, abs=1e-4)
    recall = zh["scores"]["recall"]
    assert recall["@1"] <= recall["@5"] <= recall["@10"] == 1.0  # 6 images: every answer is in the top 10
    ja = report[model]["languages"]["attributes.title_ja"]
    assert (ja["products"], ja["scores"]["queries"]) == (2, 2)
    assert ja["scores"]["mrr"] == pytest.approx(_expected(root, 3)[1], abs=1e-4)

    # The default field is attributes.title_zh alone.
    table = run_prism(["eval"], env)
    assert "attributes.title_zh" in table.stdout and "recall@1" in table.stdout
    assert "attributes.title_ja" not in table.stdout

    # A field no product has, and no demo catalog: nothing to evaluate, said so.
    none = run_prism(["eval"], {**env, "PRISM_EVAL_LANGUAGE_FIELDS": "attributes.title_de"}, check=False)
    assert none.returncode == 2 and "no demo catalog" in none.stderr and "Traceback" not in none.stderr
    bad = run_prism(["eval"], {**env, "PRISM_EVAL_LANGUAGE_FIELDS": "title_zh"}, check=False)
    assert bad.returncode == 2 and "eval_language_fields" in bad.stderr
