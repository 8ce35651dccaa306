"""Interleaved canaries: a candidate model on a fraction of live searches before it takes all of them.

A canary names a candidate index version (a retrain's candidate, or any version built with
another model). Servers load it beside the serving version; a fraction of searches, drawn by a
hash of the canary and the query, get the team-draft interleaving of both rankings
(search/interleave.py), and the search log records, per served position, the arm that contributed
the product. The page reports impressions and clicks as always (`POST /v1/events`, naming the
query_id and the position), and each click is credited to the arm of its position.

Per interleaved search with clicks, the arm with more credited clicks wins it (equal counts: a
tie). Under "both rankings are as good" each such search is a fair coin, so the two-sided sign
test over searches with a winner gives the p-value of the difference (`p_value`). The rule is
applied again and again as clicks arrive, which a fixed-sample p-value does not allow for, so the
decision uses by default the always-valid p-value of the same test (`p_sequential`). The rule
(`CanaryPolicy`, stored with the canary so that every worker applies the same one): no decision
before `min_queries` searches with a winner; then the candidate is promoted when it wins at
p < `alpha`, stopped when it loses at p < `alpha`, and stopped when `max_queries` are reached
with no significant difference. Promotion is the activation compare-and-set against the version
the canary started from; starting and ending a canary is logged in `training_runs`.
`benchmarks/canary_sim.py` measures how often it picks the better ranking.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from feedback.versions import resolve_version
from store import ActiveVersionChangedError, CanaryConflictError, CanaryRecord, CanarySearch, Store

log = logging.getLogger(__name__)

ARMS = ("serving", "candidate")


class CanaryError(ValueError):
    """A canary request that cannot be right whatever the state (a fraction outside (0, 1])."""


@dataclass(frozen=True)
class CanaryPolicy:
    min_queries: int = 200  # interleaved searches with a winner before any decision
    max_queries: int = 5000  # this many with no significant difference: the canary is stopped
    alpha: float = 0.05  # level for promoting (candidate wins) or stopping (it loses)
    # Decide on the always-valid (sequential) p-value, which stays a true p-value however often
    # the rule looks; False: on the fixed-sample sign test's, which repeated looks make too eager.
    sequential: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ArmCounts:
    impressions: int = 0  # impression events on positions this arm contributed
    clicks: int = 0  # click events credited to this arm
    wins: int = 0  # interleaved searches where this arm got more clicks


@dataclass
class CanaryStats:
    searches: int = 0  # interleaved searches logged
    serving: ArmCounts = field(default_factory=ArmCounts)
    candidate: ArmCounts = field(default_factory=ArmCounts)
    ties: int = 0  # searches with clicks, as many for each arm
    decided: int = 0  # searches with a winner
    p_value: float = 1.0  # two-sided sign test of candidate wins against serving wins
    p_sequential: float = 1.0  # always-valid p-value of the same (`sequential_p`)

    def arm(self, name: str) -> ArmCounts:
        return self.serving if name == "serving" else self.candidate

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CanaryReview:
    canary: CanaryRecord
    stats: CanaryStats
    action: str | None  # promote | stop | superseded | None (keep going)
    why: str


def sign_test_p(wins_a: int, wins_b: int) -> float:
    """Two-sided exact binomial (sign) test of `wins_a` against `wins_b` with p = 1/2."""
    n = wins_a + wins_b
    if n == 0:
        return 1.0
    low = min(wins_a, wins_b)
    # P(X <= low) in log space: n! overflows floats long before a canary's counts do.
    log_half = n * math.log(0.5)
    log_n = math.lgamma(n + 1)
    tail = sum(math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half) for i in range(low + 1))
    return min(1.0, 2.0 * tail)


# The mixing prior of the sequential test: win rates Beta(a, a) around 1/2 (sd about 0.08 at 20),
# where the differences between two working models lie.
SEQUENTIAL_PRIOR = 20.0


def sequential_p(wins_a: int, wins_b: int, prior: float = SEQUENTIAL_PRIOR) -> float:
    """Always-valid p-value of "each search is a fair coin" (a mixture sequential probability ratio
    test, Robbins 1970; Johari et al. 2017): 1 / the Bayes factor of win rates ~ Beta(prior, prior)
    against 1/2. By Ville's inequality it falls below alpha at any time, for any number of looks,
    with probability at most alpha when both rankings are as good."""
    n = wins_a + wins_b
    log_beta = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
    log_factor = log_beta(prior + wins_a, prior + wins_b) - log_beta(prior, prior) + n * math.log(2.0)
    return min(1.0, math.exp(-log_factor)) if log_factor > -700 else 1.0


def credit(arms: list, offset: int, positions: Iterable[int]) -> dict[str, int]:
    """Events per arm: a 1-based `position` of a search served from `offset` on is the arm there."""
    counts = dict.fromkeys(ARMS, 0)
    for position in positions:
        index = position - offset - 1
        if 0 <= index < len(arms) and arms[index] in counts:
            counts[arms[index]] += 1
    return counts


def tally(searches: Iterable[CanarySearch], into: CanaryStats | None = None) -> CanaryStats:
    """Per-arm impressions, clicks and wins over interleaved searches, and the p-values; `into`:
    add them to the counts of earlier searches (a running tally)."""
    stats = into if into is not None else CanaryStats()
    for search in searches:
        stats.searches += 1
        shown = credit(search.arms, search.offset, search.impressions)
        clicked = credit(search.arms, search.offset, search.clicks)
        for name in ARMS:
            stats.arm(name).impressions += shown[name]
            stats.arm(name).clicks += clicked[name]
        if clicked["serving"] > clicked["candidate"]:
            stats.serving.wins += 1
        elif clicked["candidate"] > clicked["serving"]:
            stats.candidate.wins += 1
        elif clicked["serving"]:
            stats.ties += 1
    stats.decided = stats.serving.wins + stats.candidate.wins
    stats.p_value = round(sign_test_p(stats.candidate.wins, stats.serving.wins), 6)
    stats.p_sequential = round(sequential_p(stats.candidate.wins, stats.serving.wins), 6)
    return stats


def decide(stats: CanaryStats, policy: CanaryPolicy) -> tuple[str | None, str]:
    """(promote | stop | None, why) under `policy`."""
    p = stats.p_sequential if policy.sequential else stats.p_value
    summary = (f"candidate won {stats.candidate.wins}, serving {stats.serving.wins} of {stats.decided} interleaved "
               f"searches with a winner ({stats.ties} ties), {'sequential ' if policy.sequential else ''}p = {p:.4g}")
    if stats.decided < policy.min_queries:
        return None, f"{summary}; no decision before {policy.min_queries}"
    if p < policy.alpha:
        if stats.candidate.wins > stats.serving.wins:
            return "promote", f"{summary} < {policy.alpha}: the candidate wins"
        return "stop", f"{summary} < {policy.alpha}: the candidate loses"
    if stats.decided >= policy.max_queries:
        return "stop", f"{summary}; no significant difference after {policy.max_queries}"
    return None, f"{summary}; not significant at {policy.alpha} yet"


def canary_stats(store: Store, canary: CanaryRecord) -> CanaryStats:
    return tally(store.canary_searches(canary.id))


def start_canary(store: Store, version: str, fraction: float, *, policy: CanaryPolicy = CanaryPolicy(),
                 started_by: str = "cli", training_run_id: int | None = None,
                 expected_serving: str | None = None) -> CanaryRecord:
    """Start interleaving `fraction` of searches with `version` (an index version, or a model
    version's newest index version). Raises `CanaryError` (fraction), `UnknownVersionError`,
    `CanaryConflictError` (one is running, or `version` is what serves) and, with
    `expected_serving`, `ActiveVersionChangedError` when another version serves now."""
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise CanaryError(f"the fraction of searches to interleave must be in (0, 1], not {fraction!r}")
    candidate = resolve_version(store, version)
    record = store.start_canary(candidate_index_version=candidate.index_version, fraction=float(fraction),
                                policy=policy.to_dict(), started_by=started_by, training_run_id=training_run_id,
                                expected_serving=expected_serving)
    log.info("canary %d started: %s (model %s) on %.1f%% of searches, against %s", record.id,
             record.candidate_index_version, record.candidate_model_version, fraction * 100,
             record.serving_index_version)
    return record


def stop_canary(store: Store, *, by: str = "cli", reason: str = "stopped by an operator",
                canary: CanaryRecord | None = None) -> CanaryReview:
    """Stop the running canary, or `canary` (a record the caller checked) only if it still runs;
    the serving version stays. `CanaryConflictError` when none runs, or `canary` ended meanwhile:
    a stop aimed at one canary must never end the next one."""
    canary = canary or store.running_canary()
    if canary is None:
        raise CanaryConflictError("no canary is running")
    stats = canary_stats(store, canary)
    ended = store.finish_canary(canary.id, status="stopped", finished_by=by, reason=reason, result=stats.to_dict())
    return CanaryReview(ended, stats, "stop", reason)


def review_canary(store: Store, *, by: str = "review") -> CanaryReview | None:
    """Apply the running canary's rule to the evidence so far: promote it, stop it, or keep going.
    None when no canary runs (or another process ended it meanwhile)."""
    canary = store.running_canary()
    if canary is None:
        return None
    stats = canary_stats(store, canary)
    active = store.active_index_version()
    try:
        if active is None or active.index_version != canary.serving_index_version:
            return _superseded(store, canary, stats, active.index_version if active else None, by)
        action, why = decide(stats, CanaryPolicy(**canary.policy))
        if action is None:
            return CanaryReview(canary, stats, None, why)
        promote = action == "promote"
        try:
            ended = store.finish_canary(canary.id, status="promoted" if promote else "stopped", finished_by=by,
                                        reason=why, result=stats.to_dict(), promote=promote)
        except ActiveVersionChangedError as exc:
            return _superseded(store, canary, stats, exc.active, by)
    except CanaryConflictError:
        return None  # ended by another process first: its outcome stands
    log.info("canary %d %s: %s", canary.id, ended.status, why)
    return CanaryReview(ended, stats, action, why)


def _superseded(store: Store, canary: CanaryRecord, stats: CanaryStats, active: str | None, by: str) -> CanaryReview:
    why = (f"index version {active} was activated while canary {canary.id} compared against "
           f"{canary.serving_index_version}: that activation stands and the canary ends")
    ended = store.finish_canary(canary.id, status="superseded", finished_by=by, reason=why, result=stats.to_dict())
    return CanaryReview(ended, stats, "superseded", why)


class CanaryReviewer:
    """Reviews the running canary at most every `interval_s` (servers call it after storing events:
    the decision follows the evidence without a job of its own)."""

    def __init__(self, store: Store, interval_s: float):
        self.store = store
        self.interval_s = interval_s
        self._last = float("-inf")
        self._busy = threading.Lock()

    def maybe_review(self) -> CanaryReview | None:
        now = time.monotonic()
        if now < self._last + self.interval_s or not self._busy.acquire(blocking=False):
            return None
        try:
            self._last = now
            return review_canary(self.store)
        except Exception:  # the events are stored; a failed review is retried on the next batch
            log.exception("canary review failed")
            return None
        finally:
            self._busy.release()
