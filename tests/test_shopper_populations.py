"""The feedback benchmark's shopper populations (benchmarks/feedback_lift.py) type what the indexed
catalog text does not hold: Chinese names, withheld colloquial English, misspellings."""

import random
import re

import pytest

import feedback_lift as lift
from feedback import normalise_query
from indexer.openmoji import DemoCatalog, collect_products

pytestmark = pytest.mark.no_database


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    # Names, keywords and splits of every OpenMoji emoji, without drawing images.
    products, stats = collect_products()
    root = tmp_path_factory.mktemp("populations")
    return DemoCatalog(root=root, catalog=root / "catalog.jsonl", products=products, stats=stats)


def _distance(a: str, b: str) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance."""
    d = [[max(i, j) if min(i, j) == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _withheld(vocab, catalog):
    texts = lift.indexed_texts(catalog)
    corpus = "\n".join(texts.values())
    for q, ids in vocab.items():
        assert ids and q not in corpus, q
        own = " ".join(texts[i] for i in ids)
        assert any(len(w) >= 3 and w not in own for w in re.findall(r"\w+", q)), q


def test_chinese_shoppers_type_cldr_chinese_the_index_never_holds(catalog):
    vocab = lift.zh_vocabulary(catalog)
    assert len(vocab) > 1000
    assert all(re.search(r"[\u4e00-\u9fff]", q) for q in vocab)
    _withheld(vocab, catalog)
    apple = next(p for p in catalog.products if p.product_id == "1F34E")
    assert vocab[normalise_query(apple.title_zh)] == {"1F34E"}


def test_colloquial_shoppers_use_english_withheld_from_the_index(catalog):
    vocab = lift.colloquial_vocabulary(catalog)
    assert len(vocab) > 200
    _withheld(vocab, catalog)
    assert vocab["overheated face"] == {"1F975"}  # regional English for the catalog's "Hot face"
    assert "aubergine" not in vocab  # 1F346's Unicode name, but its indexed keywords hold it


def test_typo_shoppers_make_one_edit_in_every_longer_word(catalog):
    exact = lift.vocabulary(catalog)
    vocab = lift.typo_vocabulary(catalog, seed=0)
    assert len(vocab) > 0.9 * len(exact) and not set(vocab) & set(exact)
    for typo in random.Random(0).sample(sorted(vocab), 200):
        (original,) = [q for q in exact if exact[q] <= vocab[typo] and len(q.split(" ")) == len(typo.split(" "))
                       and all(_distance(a, b) == (1 if len(a) >= 3 and a.isalpha() else 0)
                               for a, b in zip(q.split(" "), typo.split(" ")))][:1]
        assert exact[original] <= vocab[typo]
    assert lift.typo_vocabulary(catalog, seed=0) == vocab  # the same misspelling every time


def test_a_nights_populations_search_interleaved_so_the_gates_latest_slice_holds_each():
    plan = {name: {"shoppers": lift.Shoppers([f"{name} {i}" for i in range(50)], 1.0, 1.0, 0.9, 0.02)}
            for name in ("zh", "colloquial", "typo", "catalog")}
    visits = lift.night_visits(plan, 300, seed=0, night=0)
    assert len(visits) == 1_200 and visits == lift.night_visits(plan, 300, seed=0, night=0)
    assert all(q.startswith(name) for name, q in visits)
    latest = visits[-240:]  # the retrain's default holdout: the latest 20% of searches
    for name in plan:
        assert 30 <= sum(1 for who, _ in latest if who == name) <= 90, name
