"""Metadata filters answered in memory, so a filtered query costs no SQL and no catalog scan.

`FilterIndex` is built once per index version from the products table (streamed in row-id
chunks) and then follows the change journal, as the overlay does for vectors:

- the base, from the load: per row id (row ids are the dense autoincrement keys) the
  category and brand as codes, the price and whether the product was live; a posting list of row
  ids per category and per brand; live rows in price order. Never modified.
- the delta: the current filter columns of every row changed through the journal since
  (upserts, metadata changes, deletes), read back from SQL when the change is replayed. Rebuilt
  per replay, O(rows changed), and swapped by reference with the overlay: a search in flight
  keeps the snapshot it started with.

A query takes the narrowest base candidate list (the union of its categories' or its brands'
postings, or its price range), drops the rows the delta overrides, tests the rest on the base
columns and adds the delta rows that match now. A row outside the delta is as it was at the
load, so a match is always among the candidates: the answer equals `Store.filter_row_ids`
(the reference, see tests/test_query_costs.py) for every change that went through the journal,
catalog-file loads included. Categories and brands match by `store.filter_key`, whatever their
case.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from indexer import IdSet
from store import ProductFacts, ProductFilter, filter_key

_NONE = -1  # the code of "no category" / "no brand"
_ALLOWED_CACHED = 64  # distinct filters whose row ids a snapshot keeps


@dataclass(frozen=True)
class _Base:
    category: np.ndarray  # int32 code per row id
    brand: np.ndarray
    price: np.ndarray  # float64 per row id, NaN = none
    live: np.ndarray  # bool per row id
    by_category: dict[int, np.ndarray]  # code -> sorted live row ids
    by_brand: dict[int, np.ndarray]
    price_rows: np.ndarray  # live rows with a price, in price order
    price_sorted: np.ndarray  # their prices


@dataclass(frozen=True)
class _Delta:
    values: dict[int, tuple[int, int, float, bool]]  # row -> category code, brand code, price, live
    rows: np.ndarray  # sorted int64
    category: np.ndarray
    brand: np.ndarray
    price: np.ndarray
    live: np.ndarray

    @classmethod
    def of(cls, values: dict[int, tuple[int, int, float, bool]]) -> "_Delta":
        rows = np.asarray(sorted(values), dtype=np.int64)
        columns = [values[int(r)] for r in rows]
        return cls(
            values,
            rows,
            np.asarray([c[0] for c in columns], dtype=np.int32),
            np.asarray([c[1] for c in columns], dtype=np.int32),
            np.asarray([c[2] for c in columns], dtype=np.float64),
            np.asarray([c[3] for c in columns], dtype=bool),
        )


_EMPTY_DELTA = _Delta.of({})


class FilterIndex:
    """An immutable snapshot; `patched` returns the next one."""

    def __init__(self, categories: dict[str, int], brands: dict[str, int], base: _Base, delta: _Delta = _EMPTY_DELTA):
        self._categories = categories  # filter_key(value) -> code; copied, never changed, when a patch adds one
        self._brands = brands
        self._base = base
        self._delta = delta
        self._allowed: dict[ProductFilter, IdSet] = {}

    @classmethod
    def load(cls, chunks: Iterable[ProductFacts]) -> "FilterIndex":
        """From the live products' facts in row-id order (`Store.iter_filter_facts`)."""
        categories: dict[str, int] = {}
        brands: dict[str, int] = {}
        rows, cats, brs, prices = [], [], [], []
        for facts in chunks:
            rows.append(facts.rows)
            cats.append(np.fromiter((_code(categories, v) for v in facts.categories), np.int32, len(facts.rows)))
            brs.append(np.fromiter((_code(brands, v) for v in facts.brands), np.int32, len(facts.rows)))
            prices.append(facts.prices)
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        cat = np.concatenate(cats) if cats else np.zeros(0, np.int32)
        brand = np.concatenate(brs) if brs else np.zeros(0, np.int32)
        price = np.concatenate(prices) if prices else np.zeros(0, np.float64)
        n = int(row.max()) + 1 if len(row) else 0
        # Row ids fit in 32 bits in any catalog this serves on one host: half the memory of postings.
        ids = row.astype(np.int32 if n < 2**31 else np.int64)
        by_row = {
            "category": np.full(n, _NONE, np.int32),
            "brand": np.full(n, _NONE, np.int32),
            "price": np.full(n, np.nan, np.float64),
            "live": np.zeros(n, dtype=bool),
        }
        by_row["category"][row], by_row["brand"][row], by_row["price"][row], by_row["live"][row] = cat, brand, price, True
        priced = np.flatnonzero(~np.isnan(price))
        order = priced[np.argsort(price[priced], kind="stable")]
        base = _Base(
            **by_row,
            by_category=_postings(ids, cat),
            by_brand=_postings(ids, brand),
            price_rows=ids[order],
            price_sorted=price[order],
        )
        return cls(categories, brands, base)

    def base_live(self, rows: np.ndarray) -> np.ndarray:
        """Whether each row was a live product when this index was loaded."""
        rows = np.asarray(rows, dtype=np.int64)
        live = self._base.live
        inside = (rows >= 0) & (rows < len(live))
        out = np.zeros(len(rows), dtype=bool)
        out[inside] = live[rows[inside]]
        return out

    @property
    def changed_rows(self) -> int:
        return len(self._delta.rows)

    def patched(self, facts: ProductFacts) -> "FilterIndex":
        """A new snapshot in which these rows have these (current) facts."""
        if not len(facts.rows):
            return self
        categories, brands = self._categories, self._brands
        if any(v is not None and filter_key(v) not in categories for v in facts.categories):
            categories = dict(categories)
        if any(v is not None and filter_key(v) not in brands for v in facts.brands):
            brands = dict(brands)
        values = dict(self._delta.values)
        for row, category, brand, price, live in zip(facts.rows, facts.categories, facts.brands, facts.prices, facts.live):
            values[int(row)] = (_code(categories, category), _code(brands, brand), float(price), bool(live))
        return FilterIndex(categories, brands, self._base, _Delta.of(values))

    def allowed(self, flt: ProductFilter) -> IdSet:
        """`row_ids` as an IdSet, kept for the snapshot's life: shoppers repeat filters (a
        category page), and the set's selector bitmap is then built once, not per query."""
        found = self._allowed.get(flt)
        if found is None:
            if len(self._allowed) >= _ALLOWED_CACHED:
                self._allowed.clear()
            found = self._allowed[flt] = IdSet(self.row_ids(flt))
        return found

    def row_ids(self, flt: ProductFilter) -> np.ndarray:
        """Sorted int64 row ids of the live products matching a (non-empty) filter."""
        base, delta = self._base, self._delta
        cats = _codes(self._categories, flt.categories)
        brands = _codes(self._brands, flt.brands)
        low = -np.inf if flt.price_min is None else flt.price_min
        high = np.inf if flt.price_max is None else flt.price_max

        # The narrowest list that every base match is on.
        sources = []
        if flt.categories:
            sources.append((sum(len(base.by_category.get(c, ())) for c in cats), "category"))
        if flt.brands:
            sources.append((sum(len(base.by_brand.get(b, ())) for b in brands), "brand"))
        if flt.price_min is not None or flt.price_max is not None:
            start = int(np.searchsorted(base.price_sorted, low, side="left"))
            stop = int(np.searchsorted(base.price_sorted, high, side="right"))
            sources.append((max(stop - start, 0), "price"))
        if not sources:
            raise ValueError("an empty filter allows everything; it needs no row ids")
        _, narrowest = min(sources)
        if narrowest == "category":
            candidates = _union(base.by_category, cats)
        elif narrowest == "brand":
            candidates = _union(base.by_brand, brands)
        else:
            candidates = base.price_rows[start:stop] if stop > start else np.zeros(0, np.int64)
        candidates = np.asarray(candidates, dtype=np.int64)
        if len(delta.rows) and len(candidates):
            candidates = candidates[~np.isin(candidates, delta.rows)]

        flags = (flt, cats, brands, low, high)
        hits = candidates[_matches(base.category[candidates], base.brand[candidates], base.price[candidates], *flags)]
        changed = delta.rows[delta.live & _matches(delta.category, delta.brand, delta.price, *flags)]
        out = np.concatenate([hits, changed]) if len(changed) else hits
        out.sort()
        return out


def _code(vocabulary: dict[str, int], value: str | None) -> int:
    if value is None:
        return _NONE
    key = filter_key(value)
    code = vocabulary.get(key)
    if code is None:
        code = vocabulary[key] = len(vocabulary)
    return code


def _codes(vocabulary: dict[str, int], values: tuple[str, ...]) -> np.ndarray:
    # Values no product has ever had match nothing (and get no code).
    keys = [filter_key(v) for v in values]
    return np.asarray([vocabulary[k] for k in keys if k in vocabulary], dtype=np.int32)


def _postings(ids: np.ndarray, codes: np.ndarray) -> dict[int, np.ndarray]:
    """code -> its rows, sorted (views into one array; `ids` is in row order, the sort stable)."""
    order = np.argsort(codes, kind="stable")
    grouped, sorted_codes = ids[order], codes[order]
    values, starts = np.unique(sorted_codes, return_index=True)
    ends = [*starts[1:], len(sorted_codes)]
    return {int(v): grouped[a:b] for v, a, b in zip(values, starts, ends) if v != _NONE}


def _union(postings: dict[int, np.ndarray], codes: np.ndarray) -> np.ndarray:
    lists = [postings[int(c)] for c in codes if int(c) in postings]
    if not lists:
        return np.zeros(0, np.int64)
    # A row has one category and one brand: the lists are disjoint.
    return lists[0] if len(lists) == 1 else np.concatenate(lists)


def _matches(category, brand, price, flt: ProductFilter, cats, brands, low, high) -> np.ndarray:
    keep = np.ones(len(category), dtype=bool)
    if flt.categories:
        keep &= np.isin(category, cats)
    if flt.brands:
        keep &= np.isin(brand, brands)
    if flt.price_min is not None:
        keep &= price >= low  # NaN (no price) compares False, as NULL does in SQL
    if flt.price_max is not None:
        keep &= price <= high
    return keep
