"""Team-draft interleaving (Radlinski, Kurup and Joachims, 2008) of two rankings, for canaries.

Two teams, the serving ranking (arm 0) and the candidate's (arm 1), draft a merged list: in every
round a coin flip picks which team drafts first, then each team adds its highest-ranked item not
already taken. Every item is credited to the team that drafted it, so a click on it is a vote for
that ranking; with the coin, neither ranking holds the top position more often than the other.

Deterministic: the coin flips come from a seed, and `team_draft(a, b, n)` is a prefix of
`team_draft(a, b, m)` for n < m (the rounds and their flips are the same), so every page of one
query is cut from one interleaved list, as pages are cut from one ranking (search.engine).
Rankings need only be `depth` deep: each team drafts from its first `depth` items at most.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable, Sequence

SERVING, CANDIDATE = 0, 1
ARM_NAMES = ("serving", "candidate")


def team_draft(a: Sequence[Hashable], b: Sequence[Hashable], depth: int, seed: int) -> list[tuple[Hashable, int]]:
    """The first `depth` items of the team-draft interleaving of rankings `a` (arm 0) and `b` (arm 1),
    each as (item, arm). Items are compared by equality; neither ranking should repeat one."""
    coin = random.Random(seed)
    lists = (a, b)
    cursor = [0, 0]
    taken: set[Hashable] = set()
    merged: list[tuple[Hashable, int]] = []

    def draft(arm: int) -> bool:
        ranking = lists[arm]
        while cursor[arm] < len(ranking) and ranking[cursor[arm]] in taken:
            cursor[arm] += 1
        if cursor[arm] >= len(ranking):
            return False
        item = ranking[cursor[arm]]
        taken.add(item)
        merged.append((item, arm))
        return True

    while len(merged) < depth:
        first = coin.random() < 0.5  # one flip per round, whether or not both teams can draft
        order = (SERVING, CANDIDATE) if first else (CANDIDATE, SERVING)
        drafted = False
        for arm in order:
            if len(merged) >= depth:
                break
            drafted = draft(arm) or drafted
        if not drafted:  # both rankings exhausted
            break
    return merged


def canary_draw(canary_id: int, unit: str) -> tuple[float, int]:
    """(a number in [0, 1) that decides whether `unit` is interleaved, the seed of its coin flips),
    both a hash of the canary and the unit, so a rerun draws the same."""
    digest = hashlib.sha256(f"prism-canary:{canary_id}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:16], "big")


def search_draw(canary_id: int, *, query_id: str, session: str | None, query: str) -> tuple[float, int]:
    """Whether a search is interleaved (the draw, against the canary's fraction) and its coin flips.

    With a `session` (the page's id of a shopper's visit), the visit is drawn as a whole, and the
    flips hash the session and the `query` (what was asked, not which page): every page of a query
    is cut from one interleaved list, and another shopper's search of the same words gets flips of
    its own. Without one, each search (its `query_id`) is drawn on its own. Never the query alone:
    every search of a popular query would then share one set of flips, and position bias would
    hand whichever arm drafts first at its top a lasting edge on all of its traffic.
    """
    if session is None:
        return canary_draw(canary_id, f"search:{query_id}")
    draw, _ = canary_draw(canary_id, f"session:{session}")
    _, seed = canary_draw(canary_id, f"session:{session}:{query}")
    return draw, seed
