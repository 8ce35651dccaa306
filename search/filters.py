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

Attributes and stock (issue 19) follow the same base + delta shape. Every top-level attribute
whose value is a scalar or a list of scalars is indexed, up to MAX_INDEXED_ATTRIBUTES names (the
first ones met in row order; products rarely carry more): per name, a vocabulary of value keys
(`store.attribute_key`: case-folded text, numbers by value), a posting list per value, each row's
first value code (and the extra values of list-valued rows), and, for values that are numbers,
live rows in numeric order for range filters. A filter on a name no product has matches nothing.

Facet counts (`facets`) count the values of the rows matching a filter: per-row codes gathered
over the matching base rows (one `bincount`) plus the delta rows that match now; with no filter
they are the posting-list lengths adjusted by the delta, so a whole-catalog count costs
O(changed rows), not O(catalog). A facet returns at most `limit` values, most frequent first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from indexer import IdSet
from store import AttributeCondition, ProductFacts, ProductFilter, attribute_keys, attribute_number, filter_key

log = logging.getLogger(__name__)

_NONE = -1  # the code of "no category" / "no brand" / "no value"
_ALLOWED_CACHED = 64  # distinct filters whose row ids a snapshot keeps
MAX_INDEXED_ATTRIBUTES = 64  # attribute names a FilterIndex indexes
STOCK_FACET = ("true", "false", "unknown")  # the `in_stock` facet's values


class _Vocabulary:
    """value key -> code, and each code's spelling as first met (what a facet shows)."""

    def __init__(self, codes: dict[str, int] | None = None, spelled: list[str] | None = None):
        self.codes = codes if codes is not None else {}
        self.spelled = spelled if spelled is not None else []

    def code(self, key: str | None, spelling) -> int:
        if key is None:
            return _NONE
        found = self.codes.get(key)
        if found is None:
            found = self.codes[key] = len(self.spelled)
            self.spelled.append(spelling if isinstance(spelling, str) else key)
        return found

    def copy(self) -> "_Vocabulary":
        return _Vocabulary(dict(self.codes), list(self.spelled))

    def lookup(self, keys: Iterable[str]) -> np.ndarray:
        # Values no product has ever had match nothing (and get no code).
        return np.asarray([self.codes[k] for k in keys if k in self.codes], dtype=np.int32)


@dataclass(frozen=True)
class _AttributeBase:
    postings: dict[int, np.ndarray]  # code -> sorted live rows holding that value
    first: np.ndarray  # int32 per row id: the code of its (first) value, _NONE when none
    extra_rows: np.ndarray  # further values of list-valued rows: (row, code) pairs, row-sorted
    extra_codes: np.ndarray
    number: np.ndarray | None  # float64 per row id (NaN: not a number); None: no row has one
    number_rows: np.ndarray  # live rows with a number, in numeric order
    number_sorted: np.ndarray
    totals: np.ndarray  # live rows per code


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
    stock: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 per row id, NaN = unknown
    live_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted
    attributes: dict[str, _AttributeBase] = field(default_factory=dict)
    stock_totals: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))  # per STOCK_FACET


# One changed row: category code, brand code, price, live, stock, {name: value codes}, {name: number}.
_Row = tuple[int, int, float, bool, float, dict[str, tuple[int, ...]], dict[str, float]]


@dataclass(frozen=True)
class _Delta:
    values: dict[int, _Row]
    rows: np.ndarray  # sorted int64
    category: np.ndarray
    brand: np.ndarray
    price: np.ndarray
    live: np.ndarray
    stock: np.ndarray
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (positions in `rows`, codes)
    numbers: dict[str, np.ndarray]  # name -> float64 aligned with `rows`, NaN = none

    @classmethod
    def of(cls, values: dict[int, _Row]) -> "_Delta":
        rows = np.asarray(sorted(values), dtype=np.int64)
        columns = [values[int(r)] for r in rows]
        pairs: dict[str, tuple[list, list]] = {}
        numbers: dict[str, np.ndarray] = {}
        for i, c in enumerate(columns):
            for name, codes in c[5].items():
                where, which = pairs.setdefault(name, ([], []))
                where += [i] * len(codes)
                which += codes
            for name, number in c[6].items():
                numbers.setdefault(name, np.full(len(rows), np.nan))[i] = number
        return cls(
            values,
            rows,
            np.asarray([c[0] for c in columns], dtype=np.int32),
            np.asarray([c[1] for c in columns], dtype=np.int32),
            np.asarray([c[2] for c in columns], dtype=np.float64),
            np.asarray([c[3] for c in columns], dtype=bool),
            np.asarray([c[4] for c in columns], dtype=np.float64),
            {n: (np.asarray(w, np.int64), np.asarray(c, np.int32)) for n, (w, c) in pairs.items()},
            numbers,
        )


_EMPTY_DELTA = _Delta.of({})


@dataclass(frozen=True)
class _Split:
    """The rows matching a filter: base rows (sorted) and positions in the delta."""

    base: np.ndarray
    changed: np.ndarray  # int64 positions into delta.rows


def _parse_attributes(attributes: dict | None, vocabularies: dict[str, _Vocabulary], *, grow: bool,
                      copied: set[str] | None = None):
    """A row's attributes as ({name: value codes}, {name: number}); names past the cap are left out
    (`grow` False: only names already indexed). `copied`: names whose vocabulary this snapshot owns
    already; any other is copied before it gains a value (copy on write: a patch must not change
    the vocabularies of the snapshot searches in flight use, nor copy all of them per replay)."""
    codes: dict[str, tuple[int, ...]] = {}
    numbers: dict[str, float] = {}
    if not attributes:
        return codes, numbers
    for name, value in attributes.items():
        if not isinstance(name, str) or name.startswith("_"):
            continue  # Prism's own bookkeeping
        keys = attribute_keys(value)
        number = None if isinstance(value, list) else attribute_number(value)
        if not keys and number is None:
            continue
        vocabulary = vocabularies.get(name)
        if vocabulary is None:
            if not grow or len(vocabularies) >= MAX_INDEXED_ATTRIBUTES:
                continue
            vocabulary = vocabularies[name] = _Vocabulary()
            if copied is not None:
                copied.add(name)
        elif copied is not None and name not in copied and any(k not in vocabulary.codes for k in keys):
            vocabulary = vocabularies[name] = vocabulary.copy()
            copied.add(name)
        spellings = value if isinstance(value, list) else [value]
        spelled = {}
        for item in spellings:
            for key in attribute_keys(item):
                spelled.setdefault(key, item if isinstance(item, str) else key)
        if keys:
            codes[name] = tuple(vocabulary.code(k, spelled.get(k, k)) for k in keys)
        if number is not None:
            numbers[name] = number
    return codes, numbers


class FilterIndex:
    """An immutable snapshot; `patched` returns the next one."""

    def __init__(self, categories, brands, base: _Base, delta: _Delta = _EMPTY_DELTA,
                 attributes: dict[str, _Vocabulary] | None = None):
        # Vocabularies are copied, never changed, when a patch adds a value.
        self._categories = categories if isinstance(categories, _Vocabulary) else _Vocabulary(dict(categories))
        self._brands = brands if isinstance(brands, _Vocabulary) else _Vocabulary(dict(brands))
        self._attributes = attributes or {}
        self._base = base
        self._delta = delta
        self._allowed: dict[ProductFilter, IdSet] = {}
        self._splits: dict[ProductFilter, _Split] = {}

    @classmethod
    def load(cls, chunks: Iterable[ProductFacts]) -> "FilterIndex":
        """From the live products' facts in row-id order (`Store.iter_filter_facts`)."""
        categories, brands = _Vocabulary(), _Vocabulary()
        vocabularies: dict[str, _Vocabulary] = {}
        rows, cats, brs, prices, stocks = [], [], [], [], []
        pairs: dict[str, tuple[list, list]] = {}  # name -> (rows, codes), row-ordered
        numbered: dict[str, tuple[list, list]] = {}
        for facts in chunks:
            rows.append(facts.rows)
            cats.append(np.fromiter((categories.code(_key(v), v) for v in facts.categories), np.int32, len(facts.rows)))
            brs.append(np.fromiter((brands.code(_key(v), v) for v in facts.brands), np.int32, len(facts.rows)))
            prices.append(facts.prices)
            stocks.append(facts.stocks if facts.stocks is not None else np.full(len(facts.rows), np.nan))
            for row, attrs in zip(facts.rows.tolist(), facts.attributes or ()):
                codes, numbers = _parse_attributes(attrs, vocabularies, grow=True)
                for name, cs in codes.items():
                    where, which = pairs.setdefault(name, ([], []))
                    where += [row] * len(cs)
                    which += cs
                for name, number in numbers.items():
                    where, which = numbered.setdefault(name, ([], []))
                    where.append(row)
                    which.append(number)
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        cat = np.concatenate(cats) if cats else np.zeros(0, np.int32)
        brand = np.concatenate(brs) if brs else np.zeros(0, np.int32)
        price = np.concatenate(prices) if prices else np.zeros(0, np.float64)
        stock = np.concatenate(stocks) if stocks else np.zeros(0, np.float64)
        n = int(row.max()) + 1 if len(row) else 0
        # Row ids fit in 32 bits in any catalog this serves on one host: half the memory of postings.
        id_type = np.int32 if n < 2**31 else np.int64
        ids = row.astype(id_type)
        by_row = {
            "category": np.full(n, _NONE, np.int32),
            "brand": np.full(n, _NONE, np.int32),
            "price": np.full(n, np.nan, np.float64),
            "live": np.zeros(n, dtype=bool),
            "stock": np.full(n, np.nan, np.float64),
        }
        by_row["category"][row], by_row["brand"][row], by_row["price"][row], by_row["live"][row] = cat, brand, price, True
        by_row["stock"][row] = stock
        priced = np.flatnonzero(~np.isnan(price))
        order = priced[np.argsort(price[priced], kind="stable")]
        attributes = {
            name: _attribute_base(n, id_type, pairs.get(name, ([], [])), numbered.get(name), len(vocabularies[name].spelled))
            for name in vocabularies
        }
        if len(vocabularies) >= MAX_INDEXED_ATTRIBUTES:
            log.warning("products carry more than %d attribute names: only the first %d are filterable",
                        MAX_INDEXED_ATTRIBUTES, MAX_INDEXED_ATTRIBUTES)
        base = _Base(
            **by_row,
            by_category=_postings(ids, cat),
            by_brand=_postings(ids, brand),
            price_rows=ids[order],
            price_sorted=price[order],
            live_rows=row.astype(np.int64),
            attributes=attributes,
            stock_totals=_stock_counts(stock),
        )
        return cls(categories, brands, base, attributes=vocabularies)

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

    @property
    def attribute_names(self) -> list[str]:
        """Indexed attribute names, those most products had at the load first."""
        held = {name: int(attr.totals.sum()) for name, attr in self._base.attributes.items()}
        return sorted(self._attributes, key=lambda name: (-held.get(name, 0), name))

    def patched(self, facts: ProductFacts) -> "FilterIndex":
        """A new snapshot in which these rows have these (current) facts."""
        if not len(facts.rows):
            return self
        categories, brands = self._categories, self._brands
        if any(v is not None and _key(v) not in categories.codes for v in facts.categories):
            categories = categories.copy()
        if any(v is not None and _key(v) not in brands.codes for v in facts.brands):
            brands = brands.copy()
        attributes, copied = dict(self._attributes), set()
        stocks = facts.stocks if facts.stocks is not None else np.full(len(facts.rows), np.nan)
        values = dict(self._delta.values)
        for i, (row, category, brand, price, live) in enumerate(
                zip(facts.rows, facts.categories, facts.brands, facts.prices, facts.live)):
            attrs = facts.attributes[i] if facts.attributes else None
            codes, numbers = _parse_attributes(attrs, attributes, grow=True, copied=copied)
            values[int(row)] = (categories.code(_key(category), category), brands.code(_key(brand), brand), float(price),
                                bool(live), float(stocks[i]), codes, numbers)
        return FilterIndex(categories, brands, self._base, _Delta.of(values), attributes)

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
        if flt.is_empty():
            raise ValueError("an empty filter allows everything; it needs no row ids")
        split = self._split(flt)
        changed = self._delta.rows[split.changed]
        out = np.concatenate([split.base, changed]) if len(changed) else split.base.copy()
        out.sort()
        return out

    def _split(self, flt: ProductFilter) -> _Split:
        found = self._splits.get(flt)
        if found is None:
            if len(self._splits) >= _ALLOWED_CACHED:
                self._splits.clear()
            found = self._splits[flt] = self._match(flt)
        return found

    def _match(self, flt: ProductFilter) -> _Split:
        base, delta = self._base, self._delta
        query = _Query.of(flt, self)

        # The narrowest list that every base match is on.
        sources: list[tuple[int, int, object]] = []
        if flt.categories:
            sources.append((sum(len(base.by_category.get(int(c), ())) for c in query.cats), len(sources),
                            lambda: _union(base.by_category, query.cats)))
        if flt.brands:
            sources.append((sum(len(base.by_brand.get(int(b), ())) for b in query.brands), len(sources),
                            lambda: _union(base.by_brand, query.brands)))
        if flt.price_min is not None or flt.price_max is not None:
            start = int(np.searchsorted(base.price_sorted, query.low, side="left"))
            stop = int(np.searchsorted(base.price_sorted, query.high, side="right"))
            sources.append((max(stop - start, 0), len(sources), lambda a=start, b=stop: base.price_rows[a:b]))
        for cond, codes in query.attributes:
            attr = base.attributes.get(cond.name)
            if attr is None:
                sources.append((0, len(sources), lambda: np.zeros(0, np.int64)))
            elif cond.numeric:
                start = int(np.searchsorted(attr.number_sorted, -np.inf if cond.low is None else cond.low, side="left"))
                stop = int(np.searchsorted(attr.number_sorted, np.inf if cond.high is None else cond.high, side="right"))
                sources.append((max(stop - start, 0), len(sources), lambda a=attr, x=start, y=stop: a.number_rows[x:y]))
            else:
                sources.append((sum(len(attr.postings.get(int(c), ())) for c in codes), len(sources),
                                lambda a=attr, cs=codes: _union(a.postings, cs, disjoint=False)))
        if not sources:  # in_stock alone: every live row is a candidate
            sources.append((len(base.live_rows), 0, lambda: base.live_rows))
        _, _, take = min(sources, key=lambda s: (s[0], s[1]))
        candidates = np.asarray(take(), dtype=np.int64)
        if len(delta.rows) and len(candidates):
            candidates = candidates[~np.isin(candidates, delta.rows)]
        hits = candidates[query.base_matches(base, candidates)]
        changed = np.flatnonzero(delta.live & query.delta_matches(delta))
        return _Split(np.sort(hits), changed.astype(np.int64))

    # ---------------------------------------------------------------- facets

    def facets(self, flt: ProductFilter, names: Sequence[str], *, limit: int = 50) -> dict[str, dict[str, int]]:
        """{name: {value: count}} over the live products matching `flt` (all of them when empty),
        at most `limit` values per name, most frequent first. Names: "category", "brand",
        "in_stock", "attributes.<name>" (an attribute no product has: no values)."""
        base, delta = self._base, self._delta
        if flt.is_empty():
            base_rows, everything = None, True
            changed = np.flatnonzero(delta.live)
        else:
            split = self._split(flt)
            base_rows, everything = split.base, False
            changed = split.changed
        # Base rows the delta overrides were counted in the totals: taken out again.
        overridden = delta.rows[self.base_live(delta.rows)] if everything else None
        out: dict[str, dict[str, int]] = {}
        for name in names:
            if name == "in_stock":
                counts = _stock_counts(delta.stock[changed])
                if everything:
                    counts = counts + base.stock_totals - _stock_counts(base.stock[overridden])
                else:
                    counts = counts + _stock_counts(base.stock[base_rows])
                out[name] = {v: int(c) for v, c in zip(STOCK_FACET, counts) if c}
                continue
            if name in ("category", "brand"):
                vocabulary = self._categories if name == "category" else self._brands
                column = base.category if name == "category" else base.brand
                postings = base.by_category if name == "category" else base.by_brand
                size = len(vocabulary.spelled)
                counts = _bincount((delta.category if name == "category" else delta.brand)[changed], size)
                if everything:
                    totals = np.zeros(size, np.int64)
                    for code, posting in postings.items():
                        totals[code] = len(posting)
                    counts += totals - _bincount(column[overridden], size)
                else:
                    counts += _bincount(column[base_rows], size)
            elif name.startswith("attributes."):
                attr_name = name[len("attributes."):]
                vocabulary = self._attributes.get(attr_name)
                if vocabulary is None:
                    out[name] = {}
                    continue
                size = len(vocabulary.spelled)
                counts = np.zeros(size, np.int64)
                where, codes = delta.pairs.get(attr_name, (np.zeros(0, np.int64), np.zeros(0, np.int32)))
                counts += _bincount(codes[np.isin(where, changed)], size)
                attr = base.attributes.get(attr_name)
                if attr is not None:
                    if everything:
                        counts[: len(attr.totals)] += attr.totals
                        counts -= _attribute_counts(attr, overridden, size)
                    else:
                        counts += _attribute_counts(attr, base_rows, size)
            else:
                raise ValueError(f"unknown facet {name!r}")
            top = np.flatnonzero(counts > 0)
            top = sorted(top.tolist(), key=lambda c: (-int(counts[c]), vocabulary.spelled[c]))[:limit]
            out[name] = {vocabulary.spelled[c]: int(counts[c]) for c in top}
        return out


@dataclass(frozen=True)
class _Query:
    """A filter's values as codes of this snapshot's vocabularies."""

    flt: ProductFilter
    cats: np.ndarray
    brands: np.ndarray
    low: float
    high: float
    attributes: list[tuple[AttributeCondition, np.ndarray]]

    @classmethod
    def of(cls, flt: ProductFilter, index: FilterIndex) -> "_Query":
        attributes = []
        for cond in flt.attributes:
            vocabulary = index._attributes.get(cond.name)
            codes = np.zeros(0, np.int32) if vocabulary is None or cond.numeric else vocabulary.lookup(cond.values)
            attributes.append((cond, codes))
        return cls(
            flt,
            index._categories.lookup(filter_key(v) for v in flt.categories),
            index._brands.lookup(filter_key(v) for v in flt.brands),
            -np.inf if flt.price_min is None else flt.price_min,
            np.inf if flt.price_max is None else flt.price_max,
            attributes,
        )

    def _common(self, category, brand, price, stock) -> np.ndarray:
        flt = self.flt
        keep = np.ones(len(category), dtype=bool)
        if flt.categories:
            keep &= np.isin(category, self.cats)
        if flt.brands:
            keep &= np.isin(brand, self.brands)
        if flt.price_min is not None:
            keep &= price >= self.low  # NaN (no price) compares False, as NULL does in SQL
        if flt.price_max is not None:
            keep &= price <= self.high
        if flt.in_stock is True:
            keep &= ~(stock <= 0)  # unknown (NaN) stock stays
        elif flt.in_stock is False:
            keep &= stock <= 0
        return keep

    def base_matches(self, base: _Base, rows: np.ndarray) -> np.ndarray:
        keep = self._common(base.category[rows], base.brand[rows], base.price[rows], base.stock[rows])
        for cond, codes in self.attributes:
            if not keep.any():
                break
            attr = base.attributes.get(cond.name)
            if attr is None:
                keep[:] = False
            elif cond.numeric:
                number = attr.number[rows] if attr.number is not None else np.full(len(rows), np.nan)
                keep &= _in_range(number, cond)
            else:
                held = np.isin(attr.first[rows], codes)
                if len(attr.extra_rows):
                    held |= np.isin(rows, attr.extra_rows[np.isin(attr.extra_codes, codes)])
                keep &= held
        return keep

    def delta_matches(self, delta: _Delta) -> np.ndarray:
        keep = self._common(delta.category, delta.brand, delta.price, delta.stock)
        for cond, codes in self.attributes:
            if cond.numeric:
                number = delta.numbers.get(cond.name)
                keep &= _in_range(number, cond) if number is not None else False
            else:
                where, which = delta.pairs.get(cond.name, (np.zeros(0, np.int64), np.zeros(0, np.int32)))
                held = np.zeros(len(delta.rows), dtype=bool)
                held[where[np.isin(which, codes)]] = True
                keep &= held
        return keep


def _in_range(number: np.ndarray, cond: AttributeCondition) -> np.ndarray:
    keep = ~np.isnan(number)
    if cond.low is not None:
        keep &= number >= cond.low
    if cond.high is not None:
        keep &= number <= cond.high
    return keep


def _attribute_base(n: int, id_type, pairs: tuple[list, list], numbered: tuple[list, list] | None, size: int):
    rows = np.asarray(pairs[0], dtype=np.int64)
    codes = np.asarray(pairs[1], dtype=np.int32)
    # Pairs come in row order: a row's first pair holds its first value, the rest are extras.
    first_of_row = np.ones(len(rows), dtype=bool)
    first_of_row[1:] = rows[1:] != rows[:-1]
    first = np.full(n, _NONE, np.int32)
    first[rows[first_of_row]] = codes[first_of_row]
    number, number_rows, number_sorted = None, np.zeros(0, id_type), np.zeros(0, np.float64)
    if numbered is not None:
        where = np.asarray(numbered[0], dtype=np.int64)
        values = np.asarray(numbered[1], dtype=np.float64)
        number = np.full(n, np.nan, np.float64)
        number[where] = values
        order = np.argsort(values, kind="stable")
        number_rows, number_sorted = where[order].astype(id_type), values[order]
    return _AttributeBase(
        postings=_postings(rows.astype(id_type), codes),
        first=first,
        extra_rows=rows[~first_of_row],
        extra_codes=codes[~first_of_row],
        number=number,
        number_rows=number_rows,
        number_sorted=number_sorted,
        totals=_bincount(codes, size),
    )


def _attribute_counts(attr: _AttributeBase, rows: np.ndarray, size: int) -> np.ndarray:
    counts = _bincount(attr.first[rows], size)
    if len(attr.extra_rows) and len(rows):
        counts += _bincount(attr.extra_codes[np.isin(attr.extra_rows, rows)], size)
    return counts


def _bincount(codes: np.ndarray, size: int) -> np.ndarray:
    codes = codes[codes >= 0]
    return np.bincount(codes, minlength=size)[:size].astype(np.int64) if len(codes) else np.zeros(size, np.int64)


def _stock_counts(stock: np.ndarray) -> np.ndarray:
    unknown = np.isnan(stock)
    return np.asarray([int((stock > 0).sum()), int((stock <= 0).sum()), int(unknown.sum())], dtype=np.int64)


def _key(value: str | None) -> str | None:
    return None if value is None else filter_key(value)


def _postings(ids: np.ndarray, codes: np.ndarray) -> dict[int, np.ndarray]:
    """code -> its rows, sorted (views into one array; `ids` is in row order, the sort stable)."""
    order = np.argsort(codes, kind="stable")
    grouped, sorted_codes = ids[order], codes[order]
    values, starts = np.unique(sorted_codes, return_index=True)
    ends = [*starts[1:], len(sorted_codes)]
    return {int(v): grouped[a:b] for v, a, b in zip(values, starts, ends) if v != _NONE}


def _union(postings: dict[int, np.ndarray], codes: np.ndarray, *, disjoint: bool = True) -> np.ndarray:
    lists = [postings[int(c)] for c in codes if int(c) in postings]
    if not lists:
        return np.zeros(0, np.int64)
    if len(lists) == 1:
        return lists[0]
    # A row has one category and one brand: their lists are disjoint. A list attribute's are not.
    return np.concatenate(lists) if disjoint else np.unique(np.concatenate(lists))
