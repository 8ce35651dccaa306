"""Product records for search hits, cached per process and kept current with the catalog journal.

A page of hits needs its products' catalog fields (title, price, image...). Reading them by SQL
for every query was one round trip per request for rows that rarely change. The cache holds the
records of recently served rows; what keeps it right is the journal (search/journal.py):

- every catalog change is a journal entry naming its row, and every query first syncs with the
  journal (`SearchEngine.sync`: one SQL round trip that every worker does anyway). The replay of
  new entries drops their rows from the cache (`invalidate`), so a PUT, PATCH or DELETE made
  through any worker or process shows in the next search of every worker;
- a version swap renews the whole cache: fields an indexing run writes outside the journal (image
  status and hash, found while embedding) reach hits with the version that embedded them. The
  loading thread re-reads the most recently used records (`reread`, after the activation, so
  after that indexing) and the swap puts them in place of the old (`refill`); the rest go;
- a record read from the database while a change was being invalidated is not cached: reads note
  the cache's epoch before going to the database and only fill the cache if no invalidation
  happened meanwhile (the read may predate the change).

Least recently used records go first once `max_entries` are held; 0 disables the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from store import ProductRecord, Store


# Records a version swap re-reads (the most recently used); the rest are read again when asked.
REREAD_MAX = 10_000


class MetadataCache:
    def __init__(self, store: Store, max_entries: int = 50_000):
        self.store = store
        self.max_entries = max_entries
        self._entries: OrderedDict[int, ProductRecord] = OrderedDict()
        self._lock = threading.Lock()
        self._epoch = 0  # bumped by every invalidation: fills read before it are dropped
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def products(self, row_ids: Iterable[int]) -> dict[int, ProductRecord]:
        """row_id -> record (deleted products included, as `Store.products_by_row_ids`)."""
        wanted = [int(r) for r in row_ids]
        if not self.enabled:
            return self.store.products_by_row_ids(wanted)
        out: dict[int, ProductRecord] = {}
        with self._lock:
            epoch = self._epoch
            for row in wanted:
                record = self._entries.get(row)
                if record is not None:
                    self._entries.move_to_end(row)
                    out[row] = record
            missing = [row for row in wanted if row not in out]
            self.hits += len(out)
            self.misses += len(missing)
        if missing:
            fetched = self.store.products_by_row_ids(missing)
            out.update(fetched)
            with self._lock:
                if self._epoch == epoch:
                    self._entries.update(fetched)
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
        return out

    def invalidate(self, row_ids: Iterable[int]) -> None:
        with self._lock:
            self._epoch += 1
            for row in row_ids:
                self._entries.pop(int(row), None)

    def reread(self, limit: int = REREAD_MAX) -> tuple[int, set[int], dict[int, ProductRecord]]:
        """The `limit` most recently used records read afresh, for `refill`: a version swap's
        loading thread calls it so that the swap renews the cache instead of emptying it (the
        first searches after a swap read their hits by SQL, inside their requests).

        The epoch is bumped first: a search's read that began before this one does not fill the
        cache, so whatever fills it from now on was read after this call, as current as these."""
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            held = set(self._entries)
            rows = list(self._entries)[-limit:] if limit > 0 else []
        read = self.store.products_by_row_ids(rows) if rows else {}
        return epoch, held, {row: read[row] for row in rows if row in read}  # least recently used first

    def refill(self, reread: tuple[int, set[int], dict[int, ProductRecord]]) -> int:
        """Swap in what `reread` read, with the records searches cached since; the records held
        before it and not re-read go. If anything was invalidated since, a re-read record may
        predate that change: the cache is emptied instead. Returns the records kept."""
        epoch, held, fresh = reread
        with self._lock:
            if epoch != self._epoch:
                self._epoch += 1
                self._entries.clear()
                return 0
            self._epoch += 1
            kept = OrderedDict(fresh)
            for row, record in self._entries.items():
                if row not in held:
                    kept[row] = record
            self._entries = kept
            return len(kept)

    def stats(self) -> dict:
        with self._lock:
            return {"enabled": self.enabled, "max_entries": self.max_entries, "entries": len(self._entries),
                    "hits": self.hits, "misses": self.misses}
