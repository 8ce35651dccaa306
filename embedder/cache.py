"""Content-hash vector cache: immutable Arrow shards under one directory per model version.

A vector is keyed by sha256 of what was embedded (image bytes or text), so unchanged content is
never embedded twice, across runs, catalog edits, and interrupted runs alike.

Sized for tens of millions of vectors without holding them in memory:
- each shard (`part-<uuid>.arrow`) is one uncompressed Arrow IPC record batch with columns `key`,
  `digest` (16 bytes of blake2b(key)), `modality`, `product_id` and `vector`; opening the cache
  memory-maps each shard and copies out only its digests, so what stays resident is 24 bytes per
  vector (digest + location), never the vectors;
- reads memory-map the shards they need and copy out the rows asked for (`get_many`, one chunk of
  a build at a time), so the process holds the chunk, not the file;
- shards are written to a temporary name, fsynced and renamed, so a crash never leaves a
  half-written shard behind (a dead run's `.part-*.tmp` is removed by the next run, see
  `indexer.pipeline.embedding_writer`);
- `compact()` folds small shards (and the Parquet shards of earlier releases, which are still
  read as they are) into large ones; it runs only while no other run writes the directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHARD_ROWS = 65_536  # rows per shard written by put_many and compact (128 MiB at 512 float32)
COMPACT_BELOW = 16_384  # shards smaller than this are folded together by compact()
_DIGEST = np.dtype("S16")


def key_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def _digests(keys: Sequence[str]) -> np.ndarray:
    return np.frombuffer(b"".join(key_digest(k) for k in keys), dtype=_DIGEST) if keys else np.zeros(0, _DIGEST)


class VectorCache:
    shard_rows = SHARD_ROWS  # what a bulk writer should gather before `put_many`, to write full shards

    def __init__(self, root: str | Path, dim: int, *, flush_every: int = 2048, flush_after_s: float = 30.0):
        self.root = Path(root)
        self.dim = dim
        self.flush_every = flush_every
        # A run killed outright (SIGKILL, OOM) loses what is still pending: bound it in time as
        # well as in count, since on a slow CPU 2,048 images are minutes of work.
        self.flush_after_s = flush_after_s
        self._pending_since = 0.0
        self._pending: dict[str, tuple[str, str, np.ndarray]] = {}
        # Shard number -> path (Arrow, read on demand) or matrix (a legacy Parquet shard, in memory).
        self._shards: list[Path | np.ndarray] = []
        # Sorted runs of (digest, location), location = shard << 32 | row. Runs are merged as they
        # grow (each at most half the one before it), so a lookup searches O(log n) runs.
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._count = 0
        self._load()

    # ---------------------------------------------------------------- reading

    def _load(self) -> None:
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.glob("part-*.arrow")):
            try:
                digests = _read_arrow_digests(shard, self.dim)
            except ValueError:
                raise  # a shard of another width: the wrong directory, not damage
            except Exception as exc:  # a damaged shard costs re-embedding, never a failed run
                log.warning("skipping unreadable embedding shard %s: %s", shard, exc)
                continue
            self._add_run(digests, shard)
        for shard in sorted(self.root.glob("part-*.parquet")):
            try:
                keys, matrix = _read_parquet_shard(shard, self.dim)
            except ValueError:
                raise
            except Exception as exc:
                log.warning("skipping unreadable embedding shard %s: %s", shard, exc)
                continue
            self._add_run(_digests(keys), matrix)

    def _add_run(self, digests: np.ndarray, shard: Path | np.ndarray) -> None:
        number = len(self._shards)
        self._shards.append(shard)
        locations = (np.int64(number) << np.int64(32)) | np.arange(len(digests), dtype=np.int64)
        order = np.argsort(digests, kind="stable")
        self._runs.append((digests[order], locations[order]))
        self._count += len(digests)
        while len(self._runs) > 1 and len(self._runs[-1][0]) * 2 >= len(self._runs[-2][0]):
            (d2, l2), (d1, l1) = self._runs.pop(), self._runs.pop()
            merged_d = np.concatenate([d1, d2])
            merged_l = np.concatenate([l1, l2])
            order = np.argsort(merged_d, kind="stable")
            self._runs.append((merged_d[order], merged_l[order]))

    def _locate(self, digests: np.ndarray) -> np.ndarray:
        """Location of each digest, -1 where it is not stored."""
        found = np.full(len(digests), -1, dtype=np.int64)
        for run_digests, run_locations in self._runs:
            if not len(run_digests):
                continue
            at = np.minimum(np.searchsorted(run_digests, digests), len(run_digests) - 1)
            hit = (run_digests[at] == digests) & (found < 0)
            found[hit] = run_locations[at[hit]]
        return found

    def _read(self, locations: np.ndarray) -> np.ndarray:
        """Vectors at these (valid) locations, one shard at a time."""
        out = np.empty((len(locations), self.dim), dtype=np.float32)
        shards = locations >> 32
        rows = locations & 0xFFFFFFFF
        for number in np.unique(shards):
            where = np.flatnonzero(shards == number)
            shard = self._shards[int(number)]
            if isinstance(shard, np.ndarray):
                out[where] = shard[rows[where]]
            else:
                out[where] = _read_arrow_rows(shard, rows[where], self.dim)
        return out

    def locate(self, keys: Sequence[str]) -> np.ndarray:
        """Where each key's vector is stored (-1: not stored), for `read`. Pending vectors are
        written first, so every stored key has a location."""
        self.flush()
        return self._locate(_digests(keys))

    def read(self, locations: np.ndarray) -> np.ndarray:
        """The vectors at these locations (from `locate`, all valid)."""
        return self._read(np.asarray(locations, dtype=np.int64))

    def __len__(self) -> int:
        return self._count + len(self._pending)

    def __contains__(self, key: str) -> bool:
        return key in self._pending or bool(self._locate(_digests([key]))[0] >= 0)

    def contains_many(self, keys: Sequence[str]) -> np.ndarray:
        present = self._locate(_digests(keys)) >= 0
        if self._pending:
            present |= np.fromiter((k in self._pending for k in keys), dtype=bool, count=len(keys))
        return present

    def get(self, key: str) -> np.ndarray | None:
        pending = self._pending.get(key)
        if pending is not None:
            return pending[2]
        location = self._locate(_digests([key]))
        return None if location[0] < 0 else self._read(location)[0]

    def get_many(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for keys (zeros where absent) and a boolean mask of which were found: one
        lookup and one read per shard touched, however many keys."""
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        stored = []
        for i, key in enumerate(keys):
            pending = self._pending.get(key)
            if pending is None:
                stored.append(i)
            else:
                out[i], found[i] = pending[2], True
        if stored:
            stored = np.asarray(stored)
            locations = self._locate(_digests([keys[i] for i in stored]))
            hit = locations >= 0
            if hit.any():
                out[stored[hit]] = self._read(locations[hit])
                found[stored[hit]] = True
        return out, found

    # ---------------------------------------------------------------- writing

    def put(self, key: str, vector: np.ndarray, *, modality: str, ref: str = "") -> None:
        if key in self._pending or key in self:
            return
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending[key] = (modality, ref, np.asarray(vector, dtype=np.float32))
        if len(self._pending) >= self.flush_every or time.monotonic() - self._pending_since >= self.flush_after_s:
            self.flush()

    def put_many(self, keys: Sequence[str], vectors: np.ndarray, *, modality: str, refs: Sequence[str]) -> int:
        """Store many vectors at once (bring-your-own vectors, journal replays): straight into
        shards of up to SHARD_ROWS, skipping keys already stored. Returns how many were new."""
        keys = list(keys)
        if len(keys) != len(vectors) or len(keys) != len(refs):
            raise ValueError(f"{len(keys)} keys, {len(vectors)} vectors and {len(refs)} refs")
        fresh = ~self.contains_many(keys)
        # Duplicate keys inside the batch: keep the first.
        _, first = np.unique(_digests(keys), return_index=True)
        unique = np.zeros(len(keys), dtype=bool)
        unique[first] = True
        take = np.flatnonzero(fresh & unique)
        for start in range(0, len(take), SHARD_ROWS):
            part = take[start : start + SHARD_ROWS]
            self._write_shard(
                [keys[i] for i in part], [modality] * len(part), [refs[i] for i in part],
                np.asarray(vectors[part], dtype=np.float32),
            )
        return len(take)

    def flush(self) -> None:
        if not self._pending:
            return
        keys = list(self._pending)
        modalities, refs, vectors = zip(*self._pending.values())
        self._write_shard(keys, list(modalities), list(refs), np.stack(vectors).astype(np.float32, copy=False))
        self._pending.clear()

    def _write_shard(self, keys: list[str], modalities: list[str], refs: list[str], matrix: np.ndarray) -> Path:
        digests = _digests(keys)
        path = _write_arrow_shard(self.root, keys, digests, modalities, refs, matrix, self.dim)
        self._add_run(digests, path)
        return path

    # ---------------------------------------------------------------- compaction

    @classmethod
    def compact(cls, root: str | Path, *, below: int = COMPACT_BELOW) -> int:
        """Fold shards of fewer than `below` rows, and Parquet shards of earlier releases, into
        shards of up to SHARD_ROWS rows; returns how many shards were replaced.

        Only while no other run writes or reads `root` (under `embedding_writer`'s exclusive
        lock): a reader that listed a shard before it was folded would not find it any more.
        New shards are renamed into place before the old ones are removed, so a crash in between
        leaves duplicates (harmless, the same vectors), never a loss.
        """
        root = Path(root)
        if not root.is_dir():
            return 0
        small: list[Path] = list(sorted(root.glob("part-*.parquet")))
        for shard in sorted(root.glob("part-*.arrow")):
            try:
                source, batch = _open_batch(shard)
                count = batch.num_rows
                source.close()
            except Exception:
                continue  # unreadable: left alone, as the reader skips it
            if count < below:
                small.append(shard)
        if len(small) < 2 and not any(p.suffix == ".parquet" for p in small):
            return 0
        dim = None
        folded: list[Path] = []
        buffer: dict[str, list] = {"keys": [], "modalities": [], "refs": [], "vectors": []}

        def write_buffer() -> None:
            if buffer["keys"]:
                matrix = np.concatenate(buffer["vectors"]).astype(np.float32, copy=False)
                _write_arrow_shard(root, buffer["keys"], _digests(buffer["keys"]), buffer["modalities"],
                                   buffer["refs"], matrix, dim)
                for values in buffer.values():
                    values.clear()

        for shard in small:
            try:
                keys, modalities, refs, matrix = _read_whole_shard(shard)
            except Exception as exc:
                log.warning("skipping unreadable embedding shard %s while compacting: %s", shard, exc)
                continue
            dim = dim or matrix.shape[1]
            # Keys are not de-duplicated across shards: writers skip stored keys, so duplicates
            # come only from a crash between a compaction's rename and unlink, and cost bytes.
            buffer["keys"] += keys
            buffer["modalities"] += modalities
            buffer["refs"] += refs
            buffer["vectors"].append(matrix)
            folded.append(shard)
            if len(buffer["keys"]) >= SHARD_ROWS:
                write_buffer()
        write_buffer()
        for shard in folded:  # only what was read and rewritten: an unreadable shard stays
            shard.unlink(missing_ok=True)
        log.info("compacted %d embedding shards in %s", len(folded), root)
        return len(folded)


# ---------------------------------------------------------------- shard files


def _write_arrow_shard(root: Path, keys, digests: np.ndarray, modalities, refs, matrix: np.ndarray, dim: int) -> Path:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    root.mkdir(parents=True, exist_ok=True)
    n = len(keys)
    batch = pa.record_batch(
        {
            "key": pa.array(keys, pa.string()),
            "digest": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(digests.tobytes())]),
            "modality": pa.array(modalities, pa.string()),
            "product_id": pa.array(refs, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).reshape(-1)), dim),
        }
    )
    name = f"part-{uuid.uuid4().hex}.arrow"
    tmp = root / f".{name}.tmp"
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, root / name)
    return root / name


def _open_batch(path: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    source = pa.memory_map(str(path))
    reader = ipc.open_file(source)
    if reader.num_record_batches != 1:
        source.close()
        raise OSError(f"{path} holds {reader.num_record_batches} record batches, expected 1")
    return source, reader.get_batch(0)


def _read_arrow_digests(path: Path, dim: int) -> np.ndarray:
    source, batch = _open_batch(path)
    try:
        width = batch.schema.field("vector").type.list_size
        if width != dim:
            raise ValueError(f"{path} holds {width}-d vectors, expected {dim}")
        column = batch.column("digest")
        raw = np.frombuffer(column.buffers()[1], dtype=_DIGEST)
        return raw[column.offset : column.offset + len(column)].copy()
    finally:
        source.close()


def _read_arrow_rows(path: Path, rows: np.ndarray, dim: int) -> np.ndarray:
    source, batch = _open_batch(path)
    try:
        flat = batch.column("vector").flatten().to_numpy(zero_copy_only=True)
        return flat.reshape(-1, dim)[rows]  # fancy indexing copies: the map can close
    finally:
        source.close()


def _read_parquet_shard(path: Path, dim: int) -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["key", "vector"])
    width = table.schema.field("vector").type.list_size
    if width != dim:
        raise ValueError(f"{path} holds {width}-d vectors, expected {dim}")
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("key").to_pylist(), flat.reshape(-1, dim).astype(np.float32, copy=False)


def _read_whole_shard(path: Path) -> tuple[list[str], list[str], list[str], np.ndarray]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["key", "modality", "product_id", "vector"]).combine_chunks()
        batch = table.to_batches()[0] if table.num_rows else None
        if batch is None:
            return [], [], [], np.zeros((0, table.schema.field("vector").type.list_size), np.float32)
        dim = batch.schema.field("vector").type.list_size
        flat = batch.column("vector").flatten().to_numpy(zero_copy_only=False)
        return _shard_columns(batch, np.array(flat, dtype=np.float32).reshape(-1, dim))
    source, batch = _open_batch(path)
    try:
        dim = batch.schema.field("vector").type.list_size
        flat = batch.column("vector").flatten().to_numpy(zero_copy_only=True)
        return _shard_columns(batch, np.array(flat, dtype=np.float32).reshape(-1, dim))  # a copy: the map closes
    finally:
        source.close()


def _shard_columns(batch, matrix: np.ndarray) -> tuple[list[str], list[str], list[str], np.ndarray]:
    return batch.column("key").to_pylist(), batch.column("modality").to_pylist(), batch.column("product_id").to_pylist(), matrix
