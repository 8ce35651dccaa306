"""The OpenMoji demo catalog: real names, concept-disjoint splits, rendered images, atomic builds."""

import json

import pytest
from PIL import Image

from indexer import build_demo_catalog, load_demo_catalog, read_catalog
from indexer.openmoji import (
    GlyphRenderer,
    collect_products,
    concept_of,
    emoji_string,
    split_of,
    variant_group_of,
)

# Touches no database: the suite's SQLite run covers it, its PostgreSQL run skips it.
pytestmark = pytest.mark.no_database


@pytest.fixture(scope="module")
def all_products():
    return collect_products()


def test_every_named_openmoji_glyph_becomes_a_product(all_products):
    products, stats = all_products
    assert stats["openmoji_glyphs"] > 4000
    dropped = sum(stats["dropped"].values())
    assert stats["products"] + dropped == stats["openmoji_glyphs"]
    assert set(stats["dropped"]) == {"private-use OpenMoji extra (no Unicode name)"}
    by_id = {p.product_id: p for p in products}
    apple = by_id["1F34E"]
    assert apple.title == "Red apple" and apple.category == "Food & Drink" and apple.subcategory == "food-fruit"
    assert apple.title_zh == "红苹果" and "fruit" in apple.keywords
    assert by_id["1F355"].title == "Pizza"
    assert by_id["1F1EB-1F1F7"].title == "Flag: France" and by_id["1F1EB-1F1F7"].category == "Flags"
    assert by_id["0031-FE0F-20E3"].title == "Keycap: 1"
    assert by_id["1F44D-1F3FD"].title == "Thumbs up: medium skin tone"
    # a subdivision flag has no name in any table: it is derived from its tag letters
    assert by_id["1F3F4-E0067-E0062-E0073-E0063-E0074-E007F"].title == "Flag: Scotland"
    assert any(p.title == "Flag: CA-ON (subdivision)" for p in products)
    assert all(p.title and p.category and p.brand and p.price > 0 for p in products)


def test_variants_of_one_concept_share_a_split():
    runner = ["1F3C3", "1F3C3-1F3FD", "1F3C3-200D-2640-FE0F", "1F3C3-1F3FF-200D-2642-FE0F"]
    assert len({concept_of(r) for r in runner}) == 1
    technologist = ["1F9D1-200D-1F4BB", "1F468-200D-1F4BB", "1F469-1F3FB-200D-1F4BB"]
    assert len({concept_of(t) for t in technologist}) == 1
    assert concept_of("1F468-200D-1F469-200D-1F467") == concept_of("1F46A") != concept_of("1F34E")
    assert variant_group_of("1F44D-1F3FD") == variant_group_of("1F44D") == "1F44D"
    assert variant_group_of("1F3C3-200D-2640-FE0F") != variant_group_of("1F3C3")


def test_split_is_by_concept_deterministic_and_roughly_80_10_10(all_products):
    products, stats = all_products
    sides: dict[str, set] = {}
    for p in products:
        sides.setdefault(p.concept, set()).add(p.split)
    assert all(len(s) == 1 for s in sides.values())
    assert [split_of(c) for c in list(sides)[:50]] == [split_of(c) for c in list(sides)[:50]]
    shares = {k: v / len(products) for k, v in stats["splits"].items()}
    assert 0.7 < shares["train"] < 0.85 and 0.05 < shares["test"] < 0.15 and 0.05 < shares["validation"] < 0.15


def test_glyphs_render_as_one_coloured_image():
    renderer = GlyphRenderer(size=64)
    apple = renderer.render(emoji_string("1F34E"))
    assert apple.size == (64, 64) and apple.mode == "RGB"
    red = sum(1 for r, g, b in apple.getdata() if r > 180 and g < 100 and b < 100)
    assert red > 200  # the red apple is red
    family = emoji_string("1F468-200D-1F469-200D-1F467")
    assert renderer.single_glyph(family)
    assert not renderer.single_glyph(emoji_string("1F34E") + emoji_string("1F355"))


def test_build_writes_a_readable_catalog_atomically_and_reuses_it(tmp_path):
    root = tmp_path / "demo"
    catalog = build_demo_catalog(root, limit=60)
    assert 60 <= len(catalog.products) <= 80  # whole concepts: the last one may add its variants
    rows = [r for r in read_catalog(catalog.catalog)]
    assert all(hasattr(r, "product") for r in rows), [r for r in rows if not hasattr(r, "product")][:3]
    first = json.loads(catalog.catalog.read_text().splitlines()[0])
    assert first["attributes"]["split"] in ("train", "validation", "test")
    assert first["attributes"]["synthetic_fields"] == ["brand", "price"]
    with Image.open(root / first["image"]) as img:
        assert img.size == (128, 128)
    assert "CC BY-SA 4.0" in (root / "ATTRIBUTION.txt").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary directory left behind
    mtime = catalog.catalog.stat().st_mtime_ns
    assert build_demo_catalog(root, limit=60).catalog.stat().st_mtime_ns == mtime
    assert load_demo_catalog(root).stats["products"] == len(catalog.products)


def test_an_interrupted_build_leaves_the_old_catalog(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    build_demo_catalog(root, limit=30)
    before = root.joinpath("catalog.jsonl").read_text()

    def boom(self, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(GlyphRenderer, "render", boom)
    with pytest.raises(KeyboardInterrupt):
        build_demo_catalog(root, limit=40)
    assert root.joinpath("catalog.jsonl").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
