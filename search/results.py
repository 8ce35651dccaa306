"""Ranked pages of repeated text queries, cached per process for one catalog state at a time.

Shop traffic repeats itself: a few thousand queries make most of the volume. With the query
vector cached (embedder/query_cache.py) a repeat still pays the exact-identifier SQL, the
model-thread hop and the ANN search; this cache keeps the page those produced instead.

What keeps it right: a page is a function of the serving index version, the catalog journal
position the serving state has replayed to (its overlay's seq), and the query (text, target, k,
offset, filters). Every entry is stored under that (index version, seq) state, and a lookup or
store under another state empties the cache first: a PUT, PATCH or DELETE (a journal entry) or a
version swap makes every page before it unreachable at once, in every worker, on the next query
that syncs with the journal (which every search does first). Facet counts are not cached (they
come from the in-memory filter index, cheaply), nor are searches a running canary may interleave,
image or "similar" queries. Hits' product records come from the metadata cache as for any search.

Least recently used pages go first once `max_entries` are held; 0 disables the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class ResultCache:
    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, list] = OrderedDict()
        self._state: tuple | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def _follow(self, state: tuple) -> None:
        if state != self._state:
            if self._entries:
                self.invalidations += 1
            self._entries.clear()
            self._state = state

    def get(self, state: tuple, key: tuple) -> list | None:
        """The page stored for `key` under catalog `state`, or None."""
        if not self.enabled:
            return None
        with self._lock:
            self._follow(state)
            page = self._entries.get(key)
            if page is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return page

    def put(self, state: tuple, key: tuple, page: list) -> None:
        """Store `page` (a list of (row, score, parts) that nobody mutates) for `key` under `state`.
        A page computed under a state that is no longer the newest seen is dropped."""
        if not self.enabled:
            return
        with self._lock:
            if self._state is not None and state != self._state and state[1] < self._state[1]:
                return  # computed before a change another query already synced past
            self._follow(state)
            self._entries[key] = page
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def stats(self) -> dict:
        return {"max_entries": self.max_entries, "entries": len(self._entries), "hits": self.hits,
                "misses": self.misses, "invalidations": self.invalidations}
