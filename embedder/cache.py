"""Content-hash vector cache: append-only Parquet shards under one directory per model version.

A vector is keyed by sha256 of what was embedded (image bytes or text), so unchanged content is
never embedded twice, across runs, catalog edits, and interrupted runs alike. Shards are written to
a temporary name and renamed, so a crash never leaves a half-written shard behind.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class VectorCache:
    def __init__(self, root: str | Path, dim: int, *, flush_every: int = 2048, flush_after_s: float = 30.0):
        self.root = Path(root)
        self.dim = dim
        self.flush_every = flush_every
        # A run killed outright (SIGKILL, OOM) loses what is still pending: bound it in time as
        # well as in count, since on a slow CPU 2,048 images are minutes of work.
        self.flush_after_s = flush_after_s
        self._pending_since = 0.0
        self._index: dict[str, int] = {}
        self._matrix = np.zeros((0, dim), dtype=np.float32)
        self._pending: dict[str, tuple[str, str, np.ndarray]] = {}
        self._load()

    def _load(self) -> None:
        import pyarrow.parquet as pq

        if not self.root.is_dir():
            return
        blocks: list[np.ndarray] = []
        for shard in sorted(self.root.glob("part-*.parquet")):
            try:
                table = pq.read_table(shard, columns=["key", "vector"])
            except Exception as exc:  # a damaged shard costs re-embedding, never a failed run
                log.warning("skipping unreadable embedding shard %s: %s", shard, exc)
                continue
            width = table.schema.field("vector").type.list_size
            if width != self.dim:
                raise ValueError(f"{shard} holds {width}-d vectors, expected {self.dim}")
            flat = table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
            vectors = flat.reshape(-1, self.dim).astype(np.float32, copy=False)
            base = sum(len(b) for b in blocks)
            for i, key in enumerate(table.column("key").to_pylist()):
                self._index[key] = base + i
            blocks.append(vectors)
        if blocks:
            self._matrix = np.concatenate(blocks)

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def __contains__(self, key: str) -> bool:
        return key in self._index or key in self._pending

    def get(self, key: str) -> np.ndarray | None:
        pos = self._index.get(key)
        if pos is not None:
            return self._matrix[pos]
        pending = self._pending.get(key)
        return None if pending is None else pending[2]

    def get_many(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for keys (zeros where absent) and a boolean mask of which were found."""
        self.flush()
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            pos = self._index.get(key)
            if pos is not None:
                out[i] = self._matrix[pos]
                found[i] = True
        return out, found

    def put(self, key: str, vector: np.ndarray, *, modality: str, ref: str = "") -> None:
        if key in self._index or key in self._pending:
            return
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending[key] = (modality, ref, np.asarray(vector, dtype=np.float32))
        if len(self._pending) >= self.flush_every or time.monotonic() - self._pending_since >= self.flush_after_s:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.root.mkdir(parents=True, exist_ok=True)
        keys = list(self._pending)
        modalities, refs, vectors = zip(*self._pending.values())
        matrix = np.stack(vectors).astype(np.float32, copy=False)
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "modality": pa.array(modalities, pa.string()),
                "product_id": pa.array(refs, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), self.dim),
            }
        )
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.root / f".{name}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / name)
        base = len(self._matrix)
        self._matrix = np.concatenate([self._matrix, matrix])
        for i, key in enumerate(keys):
            self._index[key] = base + i
        self._pending.clear()
