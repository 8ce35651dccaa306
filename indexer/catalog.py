"""Catalog readers (CSV, Parquet, JSONL) with row-level validation.

Schema (one product per row; column names are case-sensitive):

    product_id   required  string, unique, at most 256 characters
    title        required  string
    description  optional  string
    category     optional  string
    brand        optional  string
    price        optional  number >= 0
    currency     optional  3-letter code (e.g. EUR)
    stock        optional  integer >= 0, units on hand (empty: unknown, never filtered out by in_stock;
                           no such column, or key in a JSONL row: a product keeps the stock it has)
    image        optional  path relative to the catalog file, an absolute path, or an http(s) URL
                           (URLs only when URL images are enabled)
    images       optional  several images: in JSONL and Parquet a list of references (as `image`),
                           in CSV the references separated by `|`; at most MAX_IMAGES. With `image`
                           as well, `image` is the first (primary) image and `images` follow it
    attributes   optional  JSON object; any other column is folded into it as well

A bad row is reported (line, product_id, reason) and skipped; good rows proceed.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from store import ProductInput

KNOWN_COLUMNS = ("product_id", "title", "description", "category", "brand", "price", "currency", "stock", "image",
                 "images", "attributes")
# Images one product may have (the first included): each is a vector of the image index, and an
# image query over-fetches by this factor to return one result per product.
MAX_IMAGES = 16
MAX_STOCK = 2**31 - 1
REQUIRED_COLUMNS = ("product_id", "title")
MAX_ID_LENGTH = 256
MAX_TEXT_LENGTH = 20_000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (unknown format, missing columns, unreadable file)."""


@dataclass(frozen=True)
class RowError:
    line: int
    product_id: str | None
    reason: str


@dataclass(frozen=True)
class CatalogRow:
    line: int
    product: ProductInput


@dataclass(frozen=True)
class ImagePolicy:
    """Where product images may come from."""

    root: Path | None = None  # when set, local images must resolve inside it
    allow_urls: bool = False


def read_catalog(path: str | Path, policy: ImagePolicy | None = None) -> Iterator[CatalogRow | RowError]:
    path = Path(path)
    policy = policy or ImagePolicy()
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    readers = {".csv": _csv_records, ".parquet": _parquet_records, ".jsonl": _jsonl_records, ".ndjson": _jsonl_records}
    reader = readers.get(suffix)
    if reader is None:
        raise CatalogError(f"unsupported catalog format {suffix!r}: use .csv, .parquet or .jsonl")
    seen: dict[str, int] = {}
    base = path.resolve().parent
    rows = 0
    for line, record in reader(path):
        rows += 1
        if isinstance(record, RowError):
            yield record
            continue
        result = validate_record(record, line, base=base, policy=policy)
        if isinstance(result, CatalogRow):
            first = seen.get(result.product.product_id)
            if first is not None:
                yield RowError(line, result.product.product_id, f"duplicate product_id (first seen at line {first})")
                continue
            seen[result.product.product_id] = line
        yield result
    if rows == 0:
        # Almost always the wrong file (or an export that failed); building a new index version
        # from it would only repeat the previous one.
        raise CatalogError(f"{path.name} has no product rows")


def _check_columns(columns, path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise CatalogError(f"{path.name}: missing required column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")


_CSV_FIELD_LIMIT = 16 * 1024 * 1024


def _csv_records(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise CatalogError(f"cannot open {path}: {exc.strerror}") from None
    # csv's default cell limit (128 KiB) would fail the whole file on one oversized cell; past
    # this one, the row's own field limits report it as a bad row instead. (The limit is global.)
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with fh:
        reader = csv.DictReader(fh)
        try:
            _check_columns(reader.fieldnames or [], path)
            for record in reader:
                line = reader.line_num
                if None in record:
                    yield line, RowError(line, record.get("product_id"), "more fields than the header has")
                    continue
                yield line, {k: (v if v != "" else None) for k, v in record.items()}
        except UnicodeDecodeError as exc:
            raise CatalogError(
                f"{path.name} is not UTF-8 text ({exc}); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
            ) from None
        except csv.Error as exc:
            # DictReader.line_num is that of the last good row; its csv reader's is where it stopped.
            raise CatalogError(f"{path.name}: malformed CSV at line {reader.reader.line_num}: {exc}") from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield line_no, RowError(line_no, None, f"invalid JSON: {exc}")
                continue
            except RecursionError:
                yield line_no, RowError(line_no, None, "invalid JSON: nested too deeply")
                continue
            if not isinstance(record, dict):
                yield line_no, RowError(line_no, None, f"expected a JSON object, got {type(record).__name__}")
                continue
            yield line_no, record


def _parquet_records(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise CatalogError(f"cannot read {path.name} as Parquet: {exc}") from None
    _check_columns(pf.schema_arrow.names, path)
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (JSON allows "\\ud800"): no database or UTF-8
    encoder can store them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean_text(value, field: str, *, required: bool = False, max_length: int = MAX_TEXT_LENGTH) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise ValueError(f"{field} is missing")
        return None
    if isinstance(value, (dict, list, bool)):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    text = _CONTROL.sub(" ", str(value)).strip()
    if not _is_unicode(text):
        raise ValueError(f"{field} is not valid Unicode text (it holds a lone surrogate such as \\ud800)")
    if not text:
        if required:
            raise ValueError(f"{field} is empty")
        return None
    if len(text) > max_length:
        raise ValueError(f"{field} is {len(text)} characters; the limit is {max_length}")
    return text


def _price(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("price must be a number")
    try:
        price = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        raise ValueError(f"price {value!r} is not a number") from None
    if math.isnan(price):
        return None
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"price {value!r} must be a finite number >= 0")
    return price


def _stock(value) -> int | None:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        raise ValueError("stock must be a whole number")
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        raise ValueError(f"stock {value!r} is not a number") from None
    if not number.is_integer() or not 0 <= number <= MAX_STOCK:
        raise ValueError(f"stock {value!r} must be a whole number from 0 to {MAX_STOCK}")
    return int(number)


def _attributes(record: dict) -> dict:
    raw = record.get("attributes")
    attrs: dict = {}
    if raw not in (None, ""):
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"attributes is not valid JSON: {exc}") from None
            except RecursionError:
                raise ValueError("attributes is not valid JSON: nested too deeply") from None
        if not isinstance(raw, dict):
            raise ValueError("attributes must be a JSON object")
        attrs.update(raw)
    for key, value in record.items():
        if key not in KNOWN_COLUMNS and value is not None:
            attrs[str(key)] = value if isinstance(value, (str, int, float, bool, list, dict)) else str(value)
    try:
        encoded = json.dumps(attrs, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError):
        raise ValueError("attributes hold values that are not JSON") from None
    except RecursionError:
        raise ValueError("attributes are nested too deeply") from None
    if not _is_unicode(encoded):
        raise ValueError("attributes are not valid Unicode text (they hold a lone surrogate such as \\ud800)")
    return attrs


def resolve_image(ref: str, *, base: Path, policy: ImagePolicy) -> str:
    """The absolute path or URL an image reference points to; ValueError when not allowed."""
    lowered = ref.lower()
    if lowered.startswith(("http://", "https://")):
        if not policy.allow_urls:
            raise ValueError("image is a URL but URL images are disabled (enable with --allow-url-images)")
        return ref
    if "://" in ref or lowered.startswith(("file:", "data:")):
        raise ValueError(f"image {ref!r}: only file paths and http(s) URLs are supported")
    path = Path(ref).expanduser()
    resolved = (path if path.is_absolute() else base / path).resolve()
    root = policy.root.resolve() if policy.root is not None else (None if path.is_absolute() else base)
    if root is not None and not resolved.is_relative_to(root):
        raise ValueError(f"image path {ref!r} escapes the image root {root}")
    return str(resolved)


def _image_refs(image, images) -> list[str]:
    """The product's image references, the primary first: `image`, then the `images` list (a list
    in JSONL and Parquet, `|`-separated text in CSV), duplicates dropped."""
    first = _clean_text(image, "image", max_length=4096)
    listed: list = []
    if images is None or (isinstance(images, float) and math.isnan(images)):
        listed = []
    elif isinstance(images, str):
        listed = images.split("|")
    elif isinstance(images, (list, tuple)) or type(images).__name__ == "ndarray":
        listed = list(images)
    else:
        raise ValueError(f"images must be a list of image paths or URLs (in CSV: separated by '|'), "
                         f"got {type(images).__name__}")
    if len(listed) > MAX_IMAGES:
        raise ValueError(f"images lists {len(listed)} images; the limit is {MAX_IMAGES} per product")
    refs = [first] if first is not None else []
    for n, value in enumerate(listed):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"images[{n}] must be a path or URL string, got {type(value).__name__}")
        ref = _clean_text(value, f"images[{n}]", max_length=4096)
        if ref is not None and ref not in refs:
            refs.append(ref)
    if len(refs) > MAX_IMAGES:
        raise ValueError(f"image and images make {len(refs)} images; the limit is {MAX_IMAGES} per product")
    return refs


def validate_record(record: dict, line: int, *, base: Path, policy: ImagePolicy) -> CatalogRow | RowError:
    product_id = record.get("product_id")
    pid_text = None if product_id is None else str(product_id)
    try:
        pid = _clean_text(product_id, "product_id", required=True, max_length=MAX_ID_LENGTH)
        if isinstance(product_id, float):
            raise ValueError("product_id must be a string or an integer")
        title = _clean_text(record.get("title"), "title", required=True)
        currency = _clean_text(record.get("currency"), "currency", max_length=8)
        if currency is not None:
            currency = currency.upper()
            if not _CURRENCY.match(currency):
                raise ValueError(f"currency {currency!r} is not a 3-letter code")
        refs = _image_refs(record.get("image"), record.get("images"))
        image_ref = refs[0] if refs else None
        image_uri = None
        image_error = None
        if image_ref is not None:
            try:
                image_uri = resolve_image(image_ref, base=base, policy=policy)
            except ValueError as exc:
                # The product stays searchable by text; the image problem is reported with it.
                image_error = str(exc)
        extra_images = []
        for ref in refs[1:]:
            try:
                extra_images.append((ref, resolve_image(ref, base=base, policy=policy)))
            except ValueError as exc:
                image_error = f"{image_error}; {exc}" if image_error else str(exc)
        product = ProductInput(
            product_id=pid,
            title=title,
            description=_clean_text(record.get("description"), "description"),
            category=_clean_text(record.get("category"), "category", max_length=256),
            brand=_clean_text(record.get("brand"), "brand", max_length=256),
            price=_price(record.get("price")),
            currency=currency,
            stock=_stock(record.get("stock")),
            stock_listed="stock" in record,
            image_ref=image_ref,
            image_uri=image_uri,
            extra_images=tuple(extra_images),
            attributes=_attributes(record) | ({"_image_rejected": image_error} if image_error else {}),
        )
    except ValueError as exc:
        return RowError(line, pid_text, str(exc))
    return CatalogRow(line, product)
