"""Pair mining: from logged searches and their events to weighted (query, clicked product) pairs.

What counts, and why:

- A click is a positive for the query that served it. Text queries give (query text -> product
  image) pairs; "more like this" queries give (query product's image -> clicked product) pairs.
  Uploaded query images are not kept by the server, so those searches cannot be mined.
- Position bias: shoppers look at the top of a list more than its bottom, so a click at rank 1
  is weaker evidence of relevance than one at rank 8. Under the position-based click model
  (Craswell et al. 2008; Joachims et al. 2017) P(click) = P(examined at rank k) * P(relevant),
  with the examination propensity taken as p(k) = (1 / k) ** eta. Each click is weighted by
  the inverse propensity 1 / p(k) = k ** eta, clipped at `max_weight` so that a single deep
  click cannot dominate (the usual clipped-IPS trade of a little bias for much less variance).
- Hard negatives: results shown *above* a clicked one and not clicked were examined (the
  shopper scrolled past them) and judged less relevant ("skip-above", Joachims 2002).
- Noise: an event repeated under a new event_id (same query, product and type) counts once;
  a served list with more than `max_clicks_per_query` clicks is a scraper or a bot, and all of
  its events are dropped; a pair needs `min_clicks` clicks (over all queries with the same
  normalised text), and at least `min_click_share` of that query's clicks, before it is trusted.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from store import LoggedEvent


@dataclass(frozen=True)
class MiningConfig:
    propensity_eta: float = 1.0
    max_weight: float = 10.0
    min_clicks: int = 2
    # of all clicks its query got: IPS multiplies the weight of rare deep clicks, and a popular
    # query collects a few stray clicks on unrelated products; those must not become positives
    min_click_share: float = 0.05
    max_clicks_per_query: int = 5
    hard_negatives_per_pair: int = 2


@dataclass(frozen=True)
class ClickPair:
    kind: str  # "text": query text -> product; "product": query product's image -> product
    query: str  # the normalised query text, or the query product's id
    product_id: str
    clicks: int
    weight: float  # sum of the clicks' inverse-propensity weights
    hard_negatives: tuple[str, ...] = ()


@dataclass
class MinedPairs:
    pairs: list[ClickPair]
    stats: dict = field(default_factory=dict)


def normalise_query(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def propensity_weight(position: int, config: MiningConfig) -> float:
    return min(config.max_weight, float(max(1, position)) ** config.propensity_eta)


def mine_pairs(events: Sequence[LoggedEvent], config: MiningConfig = MiningConfig()) -> MinedPairs:
    """Weighted positive pairs and their skip-above hard negatives from events joined to their searches."""
    stats = defaultdict(int)
    per_query: dict[str, dict[str, dict[str, LoggedEvent]]] = defaultdict(lambda: {"impression": {}, "click": {}})
    for e in events:
        stats[f"{e.type}s_read"] += 1
        seen = per_query[e.query_id][e.type]
        if e.product_id in seen:
            stats["duplicate_events"] += 1
            continue
        seen[e.product_id] = e

    clicks: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    skipped: dict[tuple[str, str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for query_id, by_type in per_query.items():
        clicked = by_type["click"]
        if not clicked:
            continue
        if len(clicked) > config.max_clicks_per_query:
            stats["bot_queries_dropped"] += 1
            continue
        search = next(iter(clicked.values())).search
        if search.query_text:
            kind, query = "text", normalise_query(search.query_text)
        elif search.query_product_id:
            kind, query = "product", search.query_product_id
        else:
            stats["image_upload_clicks_skipped"] += len(clicked)
            continue
        stats["queries_with_clicks"] += 1
        shown = by_type["impression"]
        for product_id, click in clicked.items():
            if kind == "product" and product_id == query:
                continue
            key = (kind, query, product_id)
            clicks[key].append(propensity_weight(click.position, config))
            for other_id, impression in shown.items():
                if impression.position < click.position and other_id not in clicked:
                    skipped[key][other_id] += 1

    per_query_clicks: dict[tuple[str, str], int] = defaultdict(int)
    for (kind, query, _), weights in clicks.items():
        per_query_clicks[(kind, query)] += len(weights)
    pairs = []
    for key, weights in clicks.items():
        if len(weights) < config.min_clicks:
            stats["pairs_below_min_clicks"] += 1
            continue
        if len(weights) < config.min_click_share * per_query_clicks[key[:2]]:
            stats["pairs_below_min_click_share"] += 1
            continue
        kind, query, product_id = key
        negatives = sorted(skipped.get(key, {}).items(), key=lambda kv: (-kv[1], kv[0]))
        pairs.append(ClickPair(
            kind, query, product_id, clicks=len(weights), weight=round(sum(weights), 4),
            hard_negatives=tuple(pid for pid, _ in negatives[: config.hard_negatives_per_pair]),
        ))
    pairs.sort(key=lambda p: (p.kind, p.query, p.product_id))
    stats["pairs"] = len(pairs)
    stats["distinct_queries"] = len({(p.kind, p.query) for p in pairs})
    return MinedPairs(pairs, dict(stats))


def split_by_time(events: Sequence[LoggedEvent], holdout_fraction: float) -> tuple[list[LoggedEvent], list[LoggedEvent], datetime | None]:
    """Events of the earlier searches for training, of the later ones for evaluation.

    The cut falls between searches (all events of one query_id stay on one side), so that the
    last `holdout_fraction` of the searches with clicks are ones the candidate never trained on.
    """
    clicked_searches = sorted({(e.search.ts, e.query_id) for e in events if e.type == "click"})
    if not clicked_searches:
        return list(events), [], None
    cut_index = int(len(clicked_searches) * (1 - holdout_fraction))
    if cut_index >= len(clicked_searches):
        return list(events), [], None
    cut = clicked_searches[cut_index][0]
    train = [e for e in events if e.search.ts < cut]
    later = [e for e in events if e.search.ts >= cut]
    return train, later, cut
