"""Read a "bring your own vectors" file: embeddings made elsewhere, for `prism index --vectors`.

Format: one Parquet file, one product per row. Column names are case-sensitive. Other columns
are allowed but never read.

    product_id    required  string (or integer), at most 256 characters: the catalog's product_id
    image_vector  optional  list, large_list or fixed_size_list of float32 or float16
    text_vector   optional  same types; at least one of the two vector columns must exist

Vectors must come from the model named by `--model` and have its embedding width. Prism cannot
tell two models' vectors apart, so the only check it can make is the width. They need not be
normalised, because rows are scaled to unit length here (search is cosine). A null vector means
the product has no vector for that modality. That is not an error, unless every vector of the
row is null.

A bad row is reported (line = 1-based row number in the file, product_id, reason) and skipped,
and good rows go on. A row is bad when its product_id is null, empty or over 256 characters, or
when one of its vectors has the wrong number of values, holds null elements, NaN or inf, or is
all zeros. A row with one bad vector is dropped whole, because indexing only half of a row would
leave search results that nobody asked for.

The file as a whole is rejected (VectorsFileError, raised when read_vectors_file is called, before
anything is read) when it is missing or not Parquet, has no rows, has no product_id or no vector
column, has a vector column that is not a list of float16/float32, or has a fixed-size list whose
width is not the model's.

It has to handle 10M rows x 512 dims (about 10 GB of float16), so it streams batches of
`batch_rows` rows, and memory stays bounded by the batch and the Parquet row group. Each batch is
checked with whole-array operations. Python only loops over rows that are bad, or whose
product_id needs cleaning.

Advice for writers, from measurements (pyarrow 26, 1M x 512 float16): keep row groups to about
100k rows or fewer, because the reader holds one whole row group. Write the vector columns with
use_dictionary=False. pyarrow dictionary-encodes by default, and decoding dictionary-encoded
float16 cut read speed to about a third.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import compress
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexer.catalog import _CONTROL, MAX_ID_LENGTH, RowError

ID_COLUMN = "product_id"
VECTOR_COLUMNS = {"image": "image_vector", "text": "text_vector"}

# The catalog reader stores a product_id with control characters replaced by spaces and outer
# whitespace stripped (indexer.catalog._clean_text). Ids here must be cleaned the same way or
# they would not match. This finds the rows where cleaning can change anything: control
# characters, or Python-str.isspace() whitespace at either end (\p{Z} plus U+0085). Only those
# rows go through Python.
_NEEDS_CLEANING = r"^[\p{Z}\x{85}]|[\p{Z}\x{85}]$|[\x00-\x1f\x7f]"
# A float32 sum of squares below this (underflow), or one that is not finite (overflow from
# huge float32 values, or NaN/inf), is redone in float64 for that row. That keeps tiny or huge
# but valid vectors from being reported as "all zeros" or "NaN".
_MIN_SUMSQ = np.float32(1e-30)


class VectorsFileError(ValueError):
    """The vectors file as a whole cannot be used (missing/unreadable, not Parquet, no product_id column,
    no image_vector/text_vector column, a vector column that is not a list of float16/float32,
    fixed-size list width != expected dim). Message says what is wrong and what was expected."""


@dataclass(frozen=True)
class VectorChunk:
    lines: np.ndarray  # int64, 1-based row number in the file (for error reports), one per row kept
    product_ids: list[str]
    vectors: dict[str, np.ndarray]  # "image"/"text" -> float32 (n, dim), L2-normalised rows; only modalities whose column exists
    present: dict[str, np.ndarray]  # same keys -> bool (n,): False where that row's vector for that modality was null (absent, not an error)


def read_vectors_file(path: str | Path, *, dim: int | None, batch_rows: int = 65_536) -> Iterator[VectorChunk | RowError]:
    """Stream the file as RowErrors and VectorChunks. For each batch, its RowErrors come first
    (in row order), then its chunk, which is left out when no row of the batch is good.

    File-level problems raise VectorsFileError here, at the call, and not on the first next().
    A file that breaks part-way through (a corrupt page) raises it while being iterated.
    `dim=None` checks the file without knowing the model's width (before the model loads); such
    a reader must not be iterated."""
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows <= 0:
        raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    path = Path(path)
    pf, columns = _open(path, dim)
    if dim is None:
        pf.close()
        return iter(())
    return _chunks(pf, path.name, columns, dim, batch_rows)


def check_vectors_file(path: str | Path, *, dim: int | None = None) -> None:
    """Raise VectorsFileError for whatever makes read_vectors_file reject the file as a whole,
    reading no rows. With `dim`, that includes a fixed-size list of another width."""
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    _open(Path(path), dim)[0].close()


def _open(path: Path, dim: int | None) -> tuple[pq.ParquetFile, dict[str, str]]:
    if not path.is_file():
        raise VectorsFileError(f"vectors file not found: {path}")
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        num_rows = pf.metadata.num_rows
    except Exception as exc:
        raise VectorsFileError(f"cannot read {path.name} as Parquet: {exc}") from None
    try:
        columns = _check_schema(schema, dim, path.name)
        if num_rows == 0:
            # Nearly always an export that failed. An index built from it would hold nothing new.
            raise VectorsFileError(f"{path.name} has no rows")
    except VectorsFileError:
        pf.close()
        raise
    return pf, columns


def _check_schema(schema: pa.Schema, dim: int | None, name: str) -> dict[str, str]:
    names = schema.names
    found = ", ".join(names) or "none"
    for column in (ID_COLUMN, *VECTOR_COLUMNS.values()):
        if names.count(column) > 1:
            raise VectorsFileError(f"{name}: column {column} appears {names.count(column)} times; keep one")
    if ID_COLUMN not in names:
        raise VectorsFileError(f"{name}: missing required column {ID_COLUMN}; found {found}")
    id_type = schema.field(ID_COLUMN).type
    if not _is_id_type(id_type):
        raise VectorsFileError(f"{name}: {ID_COLUMN} has type {id_type}; expected a string (or integer) column")
    columns: dict[str, str] = {}
    only_nulls: list[str] = []
    # Before the model loads (dim=None) the width is not known yet.
    width = "N" if dim is None else dim
    expected = f"a list<float32> or fixed_size_list<float32, {width}> (float16 also accepted)"
    for modality, column in VECTOR_COLUMNS.items():
        if column not in names:
            continue
        vtype = schema.field(column).type
        if pa.types.is_null(vtype):
            # Every value is null (e.g. pandas writing a column of None). Read as "no vectors of
            # this modality", the same as leaving the column out.
            only_nulls.append(column)
            continue
        if not (pa.types.is_list(vtype) or pa.types.is_large_list(vtype) or pa.types.is_fixed_size_list(vtype)):
            raise VectorsFileError(f"{name}: {column} has type {vtype}; expected {expected}")
        value_type = vtype.value_type
        if not (pa.types.is_float32(value_type) or pa.types.is_float16(value_type)):
            raise VectorsFileError(f"{name}: {column} is a list of {value_type}; expected {expected}")
        if dim is not None and pa.types.is_fixed_size_list(vtype) and vtype.list_size != dim:
            raise VectorsFileError(
                f"{name}: {column} holds vectors of {vtype.list_size} values but the model's embedding "
                f"width is {dim}; were they made by a different model than --model?"
            )
        columns[modality] = column
    if not columns and only_nulls:
        # "no vector column" would contradict the column list the user can see in the file.
        verb = "holds" if len(only_nulls) == 1 else "hold"
        raise VectorsFileError(f"{name}: {' and '.join(only_nulls)} {verb} only nulls: no row has a vector")
    if not columns:
        wanted = " and/or ".join(VECTOR_COLUMNS.values())
        raise VectorsFileError(f"{name}: no vector column; expected {wanted}, found {found}")
    return columns


def _is_id_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or getattr(pa.types, "is_string_view", lambda _: False)(t)
        or pa.types.is_integer(t)
    )


def _chunks(pf: pq.ParquetFile, name: str, columns: dict[str, str], dim: int, batch_rows: int) -> Iterator[VectorChunk | RowError]:
    row0 = 0
    try:
        # One reader per row group. A single iter_batches over the whole file keeps memory that
        # grows with every row group it passes for list columns (pyarrow 26: about +50 MB per 65k
        # rows x 512 float16, so 1M rows ended at 1.2 GB of Arrow memory and 10M would not fit).
        # With a fresh reader per row group, memory stays flat at one row group plus one batch.
        for group in range(pf.metadata.num_row_groups):
            batches = pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=[ID_COLUMN, *columns.values()])
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as exc:
                    raise VectorsFileError(f"{name}: cannot read past row {row0}: {exc}") from None
                if batch.num_rows:
                    yield from _read_batch(batch, row0, columns, dim)
                row0 += batch.num_rows
    finally:
        pf.close()


def _read_batch(batch: pa.RecordBatch, row0: int, columns: dict[str, str], dim: int) -> Iterator[VectorChunk | RowError]:
    n = batch.num_rows
    bad: dict[int, list[str]] = {}  # row in batch -> reasons, in column order
    pids = _product_ids(batch.column(ID_COLUMN), bad)
    vectors: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for modality, column in columns.items():
        vectors[modality], present[modality] = _vectors(batch.column(column), column, dim, n, bad)

    none_present = ~np.logical_or.reduce(list(present.values()))
    if none_present.any():
        cols = list(columns.values())
        reason = f"{cols[0]} is null" if len(cols) == 1 else f"no vector: {' and '.join(cols)} are both null"
        _note(bad, np.flatnonzero(none_present), reason)

    for i in sorted(bad):
        yield RowError(row0 + i + 1, pids[i], "; ".join(bad[i]))

    lines = np.arange(row0 + 1, row0 + n + 1, dtype=np.int64)
    if bad:
        keep = np.ones(n, dtype=bool)
        keep[list(bad)] = False
        if not keep.any():
            return
        lines = lines[keep]
        pids = list(compress(pids, keep))
        vectors = {m: v[keep] for m, v in vectors.items()}
        present = {m: p[keep] for m, p in present.items()}
    yield VectorChunk(lines=lines, product_ids=pids, vectors=vectors, present=present)


def _note(bad: dict[int, list[str]], rows, reason) -> None:
    for i in rows:
        bad.setdefault(int(i), []).append(reason(int(i)) if callable(reason) else reason)


def _bools(arr: pa.Array) -> np.ndarray:
    # Arrow booleans are bit-packed, so turning them into numpy bools has to copy.
    return arr.to_numpy(zero_copy_only=False)


def _product_ids(arr: pa.Array, bad: dict[int, list[str]]) -> list[str | None]:
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())  # integers, dictionaries, string views
    undecodable = np.zeros(len(arr), dtype=bool)
    try:
        pids = arr.to_pylist()
    except UnicodeDecodeError:
        # Parquet does not make writers check UTF-8. Only a broken batch gets this per-row path.
        raw = arr.cast(pa.large_binary()).to_pylist()
        pids = []
        for i, b in enumerate(raw):
            try:
                pids.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError:
                pids.append(None)
                undecodable[i] = True
        arr = pa.array(pids, pa.large_string())
    missing = _bools(arr.is_null()) & ~undecodable
    lengths = pc.utf8_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    for i in np.flatnonzero(_bools(pc.match_substring_regex(arr, _NEEDS_CLEANING).fill_null(False))):
        pids[i] = _CONTROL.sub(" ", pids[i]).strip()
        lengths[i] = len(pids[i])
    _note(bad, np.flatnonzero(undecodable), "product_id is not valid UTF-8")
    _note(bad, np.flatnonzero(missing), "product_id is missing")
    _note(bad, np.flatnonzero(~missing & ~undecodable & (lengths == 0)), "product_id is empty")
    _note(
        bad,
        np.flatnonzero(lengths > MAX_ID_LENGTH),
        lambda i: f"product_id is {lengths[i]} characters; the limit is {MAX_ID_LENGTH}",
    )
    return pids


def _vectors(arr: pa.Array, column: str, dim: int, n: int, bad: dict[int, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (n, dim) with unit rows, present mask). Rows that are absent or bad are left
    unnormalised or zero. Bad rows are recorded in `bad` and dropped by the caller."""
    valid = ~_bools(arr.is_null()) if arr.null_count else np.ones(n, dtype=bool)
    checked = valid.copy()  # rows still to check for NaN/inf and all zeros

    if pa.types.is_fixed_size_list(arr.type):
        # The child array covers every slot, null slots included, and ignores the parent's
        # slice offset. Slicing it and reshaping gives (n, dim) without a copy.
        values = arr.values.slice(arr.offset * dim, n * dim)
        if values.null_count:
            holes = _bools(values.is_null()).reshape(n, dim).any(axis=1) & valid
            _note(bad, np.flatnonzero(holes), f"{column} contains nulls")
            checked &= ~holes
            values = values.fill_null(0)
        m = values.to_numpy(zero_copy_only=False).reshape(n, dim).astype(np.float32)
        if not valid.all():
            m[~valid] = 0  # a writer may leave anything in a null slot
    else:
        lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
        wrong = valid & (lengths != dim)
        _note(bad, np.flatnonzero(wrong), lambda i: f"{column} has {lengths[i]} values, expected {dim}")
        checked &= ~wrong
        # flatten() skips null lists, so without wrong-length rows it already lines up with the
        # valid rows; a filter (a copy) is only needed in batches that have them.
        flat = (arr.filter(pa.array(checked)) if wrong.any() else arr).flatten()
        rows = np.flatnonzero(checked)
        if flat.null_count:
            holes = _bools(flat.is_null()).reshape(-1, dim).any(axis=1)
            _note(bad, rows[holes], f"{column} contains nulls")
            checked[rows[holes]] = False
            flat = flat.fill_null(0)
        good = flat.to_numpy(zero_copy_only=False).reshape(-1, dim)
        if len(rows) == n:
            m = good.astype(np.float32)
        else:
            m = np.zeros((n, dim), dtype=np.float32)
            m[rows] = good

    with np.errstate(over="ignore", invalid="ignore"):
        sumsq = np.einsum("ij,ij->i", m, m)
        fine = checked & np.isfinite(sumsq) & (sumsq >= _MIN_SUMSQ)
        scale = np.zeros(n, dtype=np.float32)
        scale[fine] = 1.0 / np.sqrt(sumsq[fine])
        odd = np.flatnonzero(checked & ~fine)
        if odd.size:
            sub = m[odd].astype(np.float64)
            finite = np.isfinite(sub).all(axis=1)
            norm = np.sqrt(np.einsum("ij,ij->i", sub, sub))
            _note(bad, odd[~finite], f"{column} contains NaN or inf")
            _note(bad, odd[finite & (norm == 0)], f"{column} is all zeros")
            ok = finite & (norm > 0)
            m[odd[ok]] = (sub[ok] / norm[ok, None]).astype(np.float32)
            scale[odd[ok]] = 1.0
        # In place, because a second (n, dim) float32 copy is what would cost memory. Absent and
        # bad rows get scale 0 (bad ones may turn NaN: they are dropped).
        m *= scale[:, None]
    return m, valid
