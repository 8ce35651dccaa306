"""A per-process cache of query vectors: (vector space, text key) and (vector space, image sha256).

Shop traffic repeats itself (a few thousand queries make most of the volume), and a repeated
query's vector is the same vector: a hit skips the encoder and the batcher's queue. Keys carry
the vector space (model version and precision, `Embedder.vector_space`), so a vector of one model
can never answer for another; `drop_spaces` lets the engine free the entries of a model it
unloads. Least recently used entries go first once either bound (entries, bytes) is reached.
Thread-safe: the engine's request threads look up and fill it concurrently.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# What an entry costs beyond its vector's bytes: the key string, the tuple, the array header and
# the OrderedDict slot (measured with sys.getsizeof on CPython 3.11, rounded up).
_ENTRY_OVERHEAD = 300


@dataclass(frozen=True)
class QueryCacheConfig:
    """`max_entries` / `max_bytes`: either 0 disables the cache."""

    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0


class QueryCache:
    def __init__(self, config: QueryCacheConfig | None = None):
        self.config = config or QueryCacheConfig()
        self._entries: OrderedDict[tuple[str, str, str], tuple[np.ndarray, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = {"text": 0, "image": 0}
        self.misses = {"text": 0, "image": 0}
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def get(self, space: str, kind: str, key: str) -> np.ndarray | None:
        """The cached (1, dim) vector, or None (counted as a miss)."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get((space, kind, key))
            if entry is None:
                self.misses[kind] += 1
                return None
            self._entries.move_to_end((space, kind, key))
            self.hits[kind] += 1
            return entry[0]

    def holds(self, space: str, kind: str, key: str) -> bool:
        """Whether the entry is cached, without counting a hit or miss or refreshing it."""
        with self._lock:
            return (space, kind, key) in self._entries

    def put(self, space: str, kind: str, key: str, vector: np.ndarray) -> None:
        if not self.enabled:
            return
        # A read-only copy: callers get the same array on every hit, and none may change it.
        vector = np.array(vector, dtype=np.float32, copy=True).reshape(1, -1)
        vector.flags.writeable = False
        size = vector.nbytes + sys.getsizeof(key) + _ENTRY_OVERHEAD
        if size > self.config.max_bytes:
            return
        with self._lock:
            old = self._entries.pop((space, kind, key), None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[(space, kind, key)] = (vector, size)
            self._bytes += size
            while len(self._entries) > self.config.max_entries or self._bytes > self.config.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed
                self.evictions += 1

    def drop_spaces(self, keep: set[str]) -> int:
        """Forget every entry whose vector space is not in `keep`; returns how many went."""
        with self._lock:
            gone = [k for k in self._entries if k[0] not in keep]
            for k in gone:
                self._bytes -= self._entries.pop(k)[1]
            return len(gone)

    def stats(self) -> dict:
        with self._lock:
            return {
                "enabled": self.enabled,
                "max_entries": self.config.max_entries,
                "max_bytes": self.config.max_bytes,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "hits": dict(self.hits),
                "misses": dict(self.misses),
                "evictions": self.evictions,
            }
