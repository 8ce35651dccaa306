"""Builds real catalogs on disk for tests, benchmarks and the pipeline demo.

Every product gets a distinct drawn image (shapes, colours, noise: no two alike) and plausible
metadata. Usage: python benchmarks/sample_catalog.py OUT_DIR [-n 1000] [--size 224] [--format csv]
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ["shoes", "bags", "hats", "shirts", "watches"]
BRANDS = ["acme", "globex", "initech", "umbrella"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def draw_product_image(i: int, size: int = 96) -> Image.Image:
    """A deterministic image that differs from every other i (shape, colours and noise)."""
    rng = np.random.default_rng(i)
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        x1, y1 = x0 + int(rng.integers(10, size // 2)), y0 + int(rng.integers(10, size // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    noise = rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def product_row(i: int, image: str | None) -> dict:
    category = CATEGORIES[i % len(CATEGORIES)]
    colour = COLOURS[(i // len(CATEGORIES)) % len(COLOURS)]
    return {
        "product_id": f"P{i:05d}",
        "title": f"{colour} {category[:-1]} model {i}",
        "description": f"A {colour} item from the {category} range",
        "category": category,
        "brand": BRANDS[i % len(BRANDS)],
        "price": f"{5 + (i * 7.3) % 200:.2f}",
        "currency": "EUR",
        "image": image or "",
    }


def make_catalog(root: Path, n: int, *, fmt: str = "csv", image_size: int = 96, name: str = "catalog") -> Path:
    """Write n products with images under root/images and a catalog file; returns the file."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"images/{i:05d}.png"
        if not (root / rel).exists():
            draw_product_image(i, image_size).save(root / rel)
        rows.append(product_row(i, rel))
    return write_rows(root, rows, fmt=fmt, name=name)


def write_rows(root: Path, rows: list[dict], *, fmt: str = "csv", name: str = "catalog") -> Path:
    path = root / f"{name}.{fmt}"
    if fmt == "csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(fmt)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="csv")
    args = parser.parse_args()
    print(make_catalog(args.out, args.n, fmt=args.format, image_size=args.size))
