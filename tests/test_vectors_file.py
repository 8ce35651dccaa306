"""indexer.vectors_file: the --vectors Parquet reader (bring your own vectors)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexer.catalog import RowError
from indexer.vectors_file import VECTOR_COLUMNS, VectorChunk, VectorsFileError, check_vectors_file, read_vectors_file

# Touches no database: the suite's SQLite run covers it, its PostgreSQL run skips it.
pytestmark = pytest.mark.no_database

DIM = 8


def _vector_type(kind: str, value: pa.DataType, dim: int = DIM) -> pa.DataType:
    return {"fixed": pa.list_(value, dim), "list": pa.list_(value), "large": pa.large_list(value)}[kind]


def _column(rows, kind: str = "list", value: pa.DataType = pa.float32(), dim: int = DIM) -> pa.Array:
    # Built as float32, then cast: pyarrow cannot build float16 straight from Python floats.
    rows = [None if r is None else [None if x is None else float(x) for x in r] for r in rows]
    base = pa.list_(pa.float32(), dim) if kind == "fixed" else pa.list_(pa.float32())
    return pa.array(rows, base).cast(_vector_type(kind, value, dim))


def _write(path, ids, *, image=None, text=None, kind="list", value=pa.float32(), dim=DIM, **write_kw):
    columns = {"product_id": pa.array(ids, pa.string()) if not isinstance(ids, pa.Array) else ids}
    if image is not None:
        columns["image_vector"] = _column(image, kind, value, dim)
    if text is not None:
        columns["text_vector"] = _column(text, kind, value, dim)
    pq.write_table(pa.table(columns), path, **write_kw)
    return path


def _read(path, dim=DIM, **kw):
    items = list(read_vectors_file(path, dim=dim, **kw))
    chunks = [x for x in items if isinstance(x, VectorChunk)]
    errors = [x for x in items if isinstance(x, RowError)]
    return items, chunks, errors


def _normalised(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _random(n, dim=DIM, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


# -- good files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,value",
    [("fixed", pa.float16()), ("fixed", pa.float32()), ("list", pa.float32()), ("list", pa.float16()), ("large", pa.float32())],
)
def test_reads_vectors_equal_to_input_after_normalisation(tmp_path, kind, value):
    vecs = _random(20)
    held = {"image": vecs, "text": vecs * 3}
    if value == pa.float16():
        held = {m: v.astype(np.float16).astype(np.float32) for m, v in held.items()}  # what the file holds
    ids = [f"p{i}" for i in range(20)]
    path = _write(tmp_path / "v.parquet", ids, image=held["image"].tolist(), text=held["text"].tolist(), kind=kind, value=value)

    items, chunks, errors = _read(path)
    assert errors == [] and len(chunks) == 1
    chunk = chunks[0]
    assert chunk.product_ids == ids
    assert chunk.lines.dtype == np.int64 and chunk.lines.tolist() == list(range(1, 21))
    assert set(chunk.vectors) == {"image", "text"} == set(chunk.present)
    for modality in ("image", "text"):
        got = chunk.vectors[modality]
        assert got.dtype == np.float32 and got.shape == (20, DIM)
        np.testing.assert_allclose(got, _normalised(held[modality]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
        assert chunk.present[modality].dtype == np.bool_ and chunk.present[modality].all()


@pytest.mark.parametrize("modality", ["image", "text"])
def test_single_modality_file(tmp_path, modality):
    vecs = _random(5)
    path = _write(tmp_path / "v.parquet", list("abcde"), **{modality: vecs.tolist()}, kind="fixed", value=pa.float16())
    _, chunks, errors = _read(path)
    assert errors == []
    (chunk,) = chunks
    assert set(chunk.vectors) == {modality} == set(chunk.present)
    np.testing.assert_allclose(chunk.vectors[modality], _normalised(vecs.astype(np.float16)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["fixed", "list"])
def test_null_vectors_are_absent_not_errors(tmp_path, kind):
    vecs = _random(4)
    image = [vecs[0], None, vecs[2], vecs[3]]
    text = [vecs[0], vecs[1], None, vecs[3]]
    path = _write(tmp_path / "v.parquet", ["a", "b", "c", "d"], image=image, text=text, kind=kind)
    _, chunks, errors = _read(path)
    assert errors == []
    (chunk,) = chunks
    assert chunk.present["image"].tolist() == [True, False, True, True]
    assert chunk.present["text"].tolist() == [True, True, False, True]
    assert not chunk.vectors["image"][1].any() and not chunk.vectors["text"][2].any()
    np.testing.assert_allclose(chunk.vectors["image"][2], _normalised(vecs[2:3])[0], rtol=1e-5)


def test_all_null_typed_column_is_treated_as_missing(tmp_path):
    table = pa.table({"product_id": ["a"], "image_vector": _column([[1.0] * DIM]), "text_vector": pa.nulls(1)})
    pq.write_table(table, tmp_path / "v.parquet")
    _, chunks, errors = _read(tmp_path / "v.parquet")
    assert errors == [] and set(chunks[0].vectors) == {"image"}


def test_product_ids_are_cleaned_like_the_catalog_and_integers_accepted(tmp_path):
    vecs = _random(3).tolist()
    path = _write(tmp_path / "v.parquet", ["  padded\t", "in\x01side", "plain"], image=vecs)
    _, chunks, _ = _read(path)
    assert chunks[0].product_ids == ["padded", "in side", "plain"]

    table = pa.table({"product_id": pa.array([7, 8, 9], pa.int64()), "image_vector": _column(vecs)})
    pq.write_table(table, tmp_path / "ints.parquet")
    _, chunks, _ = _read(tmp_path / "ints.parquet")
    assert chunks[0].product_ids == ["7", "8", "9"]


def test_tiny_and_huge_float32_vectors_are_normalised_not_rejected(tmp_path):
    tiny = [1e-30] * DIM  # sum of squares underflows float32
    huge = [1e30] * DIM  # sum of squares overflows float32
    path = _write(tmp_path / "v.parquet", ["tiny", "huge"], image=[tiny, huge], kind="fixed")
    _, chunks, errors = _read(path)
    assert errors == []
    np.testing.assert_allclose(chunks[0].vectors["image"], np.full((2, DIM), 1 / math.sqrt(DIM)), rtol=1e-6)


# -- bad rows ---------------------------------------------------------------------------------

GOOD = [0.5] * DIM


def _bad_row_cases():
    nan, inf = float("nan"), float("inf")
    return [
        # (id, image, text, kinds, expected reported id, reason fragment)
        (None, GOOD, GOOD, ("fixed", "list"), None, "product_id is missing"),
        ("", GOOD, GOOD, ("fixed", "list"), "", "product_id is empty"),
        ("   ", GOOD, GOOD, ("list",), "", "product_id is empty"),
        ("x" * 257, GOOD, GOOD, ("fixed", "list"), "x" * 257, "product_id is 257 characters; the limit is 256"),
        ("short", [0.5] * (DIM - 2), GOOD, ("list",), "short", f"image_vector has {DIM - 2} values, expected {DIM}"),
        ("long", GOOD, [0.5] * (DIM + 1), ("list",), "long", f"text_vector has {DIM + 1} values, expected {DIM}"),
        ("empty", [], GOOD, ("list",), "empty", f"image_vector has 0 values, expected {DIM}"),
        ("nan", [nan] + GOOD[1:], GOOD, ("fixed", "list"), "nan", "image_vector contains NaN or inf"),
        ("inf", GOOD, GOOD[:-1] + [inf], ("fixed", "list"), "inf", "text_vector contains NaN or inf"),
        ("zero", [0.0] * DIM, GOOD, ("fixed", "list"), "zero", "image_vector is all zeros"),
        ("hole", GOOD[:-1] + [None], GOOD, ("fixed", "list"), "hole", "image_vector contains nulls"),
        ("none", None, None, ("fixed", "list"), "none", "no vector: image_vector and text_vector are both null"),
    ]


@pytest.mark.parametrize(
    "pid,image,text,kind,reported,reason",
    [(p, i, t, k, r, why) for p, i, t, kinds, r, why in _bad_row_cases() for k in kinds],
    ids=lambda x: x if isinstance(x, str) and len(x) < 40 else None,
)
def test_bad_row_is_reported_and_good_rows_come_through(tmp_path, pid, image, text, kind, reported, reason):
    good = _random(4)
    ids = ["g1", "g2", pid, "g3"]
    images = [good[0], good[1], image, good[2]]
    texts = [good[0], good[1], text, good[3]]
    path = _write(tmp_path / "v.parquet", ids, image=images, text=texts, kind=kind)

    items, chunks, errors = _read(path)
    assert errors == [RowError(3, reported, reason)]
    assert isinstance(items[0], RowError) and isinstance(items[-1], VectorChunk)  # errors first
    (chunk,) = chunks
    assert chunk.product_ids == ["g1", "g2", "g3"]
    assert chunk.lines.tolist() == [1, 2, 4]
    np.testing.assert_allclose(chunk.vectors["image"], _normalised(good[[0, 1, 2]]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunk.vectors["text"], _normalised(good[[0, 1, 3]]), rtol=1e-5, atol=1e-6)


def test_row_with_one_bad_vector_is_rejected_whole_and_reasons_combine(tmp_path):
    path = _write(
        tmp_path / "v.parquet",
        ["ok", "half", "both"],
        image=[GOOD, GOOD, [0.0] * DIM],
        text=[GOOD, [float("nan")] * DIM, [0.5] * 3],
    )
    _, chunks, errors = _read(path)
    assert errors == [
        RowError(2, "half", "text_vector contains NaN or inf"),
        RowError(3, "both", f"image_vector is all zeros; text_vector has 3 values, expected {DIM}"),
    ]
    assert chunks[0].product_ids == ["ok"]


def test_single_column_file_null_vector_is_no_vector(tmp_path):
    path = _write(tmp_path / "v.parquet", ["a", "b"], text=[GOOD, None], kind="fixed")
    _, chunks, errors = _read(path)
    assert errors == [RowError(2, "b", "text_vector is null")]
    assert chunks[0].product_ids == ["a"]


def test_batch_with_only_bad_rows_yields_no_chunk(tmp_path):
    path = _write(tmp_path / "v.parquet", [None, "z"], image=[GOOD, [0.0] * DIM], kind="fixed")
    items, chunks, errors = _read(path)
    assert chunks == [] and [e.line for e in errors] == [1, 2]


def test_product_id_that_is_not_utf8_is_a_bad_row(tmp_path):
    raw = pa.array([b"ok", b"\xff\xfe", b"fine"], pa.binary())
    ids = pa.Array.from_buffers(pa.string(), 3, raw.buffers())  # Parquet writers need not check UTF-8
    path = _write(tmp_path / "v.parquet", ids, image=[GOOD] * 3)
    _, chunks, errors = _read(path)
    assert errors == [RowError(2, None, "product_id is not valid UTF-8")]
    assert chunks[0].product_ids == ["ok", "fine"] and chunks[0].lines.tolist() == [1, 3]


def test_file_corrupt_part_way_raises_vectors_file_error(tmp_path):
    path = _write(tmp_path / "v.parquet", [str(i) for i in range(400)], image=_random(400).tolist(), kind="fixed", row_group_size=100, compression="none")
    offset = pq.ParquetFile(path).metadata.row_group(2).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\0" * 64
    path.write_bytes(bytes(data))
    seen = []
    with pytest.raises(VectorsFileError, match="cannot read past row 200"):
        for item in read_vectors_file(path, dim=DIM, batch_rows=100):
            seen.append(item)
    assert [int(c.lines[0]) for c in seen] == [1, 101]


# -- file-level errors ---------------------------------------------------------------------------


def _table_file(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda p: p / "missing.parquet", "vectors file not found"),
        (lambda p: (p / "v.parquet").write_text("product_id,image_vector\n") and p / "v.parquet", "as Parquet"),
        (lambda p: _table_file(p / "v.parquet", id=["a"], image_vector=_column([GOOD])), "missing required column product_id; found id, image_vector"),
        (lambda p: _table_file(p / "v.parquet", product_id=["a"], embedding=_column([GOOD])), "no vector column; expected image_vector and/or text_vector"),
        (lambda p: _table_file(p / "v.parquet", product_id=["a"], image_vector=pa.array([[1] * DIM], pa.list_(pa.int32()))), "image_vector is a list of int32; expected a list<float32>"),
        (lambda p: _table_file(p / "v.parquet", product_id=["a"], text_vector=pa.array([[1.0] * DIM], pa.list_(pa.float64()))), "text_vector is a list of double"),
        (lambda p: _table_file(p / "v.parquet", product_id=["a"], text_vector=pa.array(["x"])), "text_vector has type string"),
        (lambda p: _table_file(p / "v.parquet", product_id=["a"], image_vector=_column([[0.5] * 4], "fixed", dim=4)), f"image_vector holds vectors of 4 values but the model's embedding width is {DIM}"),
        (lambda p: _table_file(p / "v.parquet", product_id=[1.5], image_vector=_column([GOOD])), "product_id has type double"),
        (lambda p: _write(p / "v.parquet", [], image=[]), "has no rows"),
        (lambda p: _table_file(p / "v.parquet", product_id=["a"], image_vector=pa.nulls(1), text_vector=pa.nulls(1)), "image_vector and text_vector hold only nulls: no row has a vector"),
    ],
    ids=["missing", "not-parquet", "no-product-id", "no-vector-column", "int-vectors", "float64-vectors", "not-a-list", "fixed-width", "float-ids", "empty", "only-null-vectors"],
)
def test_file_level_errors_raise_at_the_call(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(VectorsFileError) as info:
        read_vectors_file(path, dim=DIM)  # not iterated: the schema is checked up front
    assert fragment in str(info.value)


def test_check_before_the_model_is_known_names_no_width(tmp_path):
    """`prism index` checks the file with dim=None before the model loads: its message must not
    print that None as the width it expects."""
    path = _table_file(tmp_path / "v.parquet", product_id=["a"], image_vector=pa.array([[1] * DIM], pa.list_(pa.int32())))
    with pytest.raises(VectorsFileError) as info:
        read_vectors_file(path, dim=None)
    assert "None" not in str(info.value) and "fixed_size_list<float32, N>" in str(info.value)


def test_check_vectors_file_rejects_a_fixed_width_that_is_not_the_models(tmp_path):
    path = _table_file(tmp_path / "v.parquet", product_id=["a"], image_vector=_column([[0.5] * 4], "fixed", dim=4))
    check_vectors_file(path, dim=None)  # the width is not known yet
    with pytest.raises(VectorsFileError, match="holds vectors of 4 values"):
        check_vectors_file(path, dim=DIM)
    check_vectors_file(path, dim=4)


def test_bad_arguments():
    with pytest.raises(ValueError):
        read_vectors_file("x.parquet", dim=0)
    with pytest.raises(ValueError):
        read_vectors_file("x.parquet", dim=DIM, batch_rows=0)


# -- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fixed", "list"])
def test_streams_in_batches_with_continuous_lines(tmp_path, kind):
    n = 1000
    vecs = _random(n, seed=1)
    images = list(vecs)
    for i in (5, 130, 131, 777):  # bad rows in several batches
        images[i] = [0.0] * DIM
    path = _write(tmp_path / "v.parquet", [f"p{i}" for i in range(n)], image=images, kind=kind, value=pa.float16(), row_group_size=100)
    assert pq.ParquetFile(path).metadata.num_row_groups == 10

    items, chunks, errors = _read(path, batch_rows=64)
    assert len(chunks) > 1  # fails if the reader read the whole file at once
    assert all(len(c.product_ids) <= 64 for c in chunks)
    assert [(e.line, e.product_id) for e in errors] == [(6, "p5"), (131, "p130"), (132, "p131"), (778, "p777")]
    lines = np.concatenate([c.lines for c in chunks])
    expected = [i + 1 for i in range(n) if i not in (5, 130, 131, 777)]
    assert lines.tolist() == expected
    assert [p for c in chunks for p in c.product_ids] == [f"p{i - 1}" for i in expected]
    got = np.concatenate([c.vectors["image"] for c in chunks])
    np.testing.assert_allclose(got, _normalised(vecs.astype(np.float16))[np.array(expected) - 1], rtol=1e-5, atol=1e-6)
    # a batch's errors come before its chunk: no error is reported after a chunk of later rows
    last = 0
    for item in items:
        if isinstance(item, RowError):
            assert item.line > last
        else:
            last = int(item.lines[-1])


def test_vector_columns_constant():
    assert VECTOR_COLUMNS == {"image": "image_vector", "text": "text_vector"}
