"""Prometheus metrics: per route, per search stage, catalog changes, and what is serving.

With `prism serve --workers N`, PROMETHEUS_MULTIPROC_DIR is set before the workers start and
counters and histograms are aggregated across them; the serving gauges come from the worker
that answers the scrape (all workers converge on the same version within one query).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class _ServingCollector(Collector):
    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        ready = GaugeMetricFamily("prism_ready", "1 when an index version is loaded and serving")
        ready.add_metric([], 1.0 if stats else 0.0)
        yield ready
        if not stats:
            return
        info = InfoMetricFamily("prism_serving", "the model and index version serving queries")
        info.add_metric([], {"model_version": stats["model_version"], "index_version": stats["index_version"]})
        yield info
        precision = InfoMetricFamily("prism_encoder_precision", "precision queries are encoded at, and the serving index's")
        precision.add_metric([], {"encoder": stats["encoder_precision"], "index": stats["index_precision"]})
        yield precision
        vectors = GaugeMetricFamily(
            "prism_index_vectors", "vectors searchable, by modality and layer (index version or change overlay)",
            labels=["modality", "layer"],
        )
        for modality, n in stats["vectors"].items():
            vectors.add_metric([modality, "index"], n)
        for modality, n in stats["overlay_vectors"].items():
            vectors.add_metric([modality, "overlay"], n)
        yield vectors
        seq = GaugeMetricFamily("prism_catalog_seq", "newest catalog change applied by this worker")
        seq.add_metric([], stats["catalog_seq"])
        yield seq


class _QueryCacheCollector(Collector):
    """The query-vector cache's counts, read from the engine at scrape time (per process: with
    several workers, the one answering the scrape)."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        hits = CounterMetricFamily("prism_query_cache_hits", "query vectors served from the cache", labels=["kind"])
        misses = CounterMetricFamily("prism_query_cache_misses", "query vectors the cache did not hold", labels=["kind"])
        for kind in sorted(stats["hits"]):
            hits.add_metric([kind], stats["hits"][kind])
            misses.add_metric([kind], stats["misses"][kind])
        yield hits
        yield misses
        evictions = CounterMetricFamily("prism_query_cache_evictions", "cache entries dropped to stay within bounds")
        evictions.add_metric([], stats["evictions"])
        yield evictions
        entries = GaugeMetricFamily("prism_query_cache_entries", "query vectors cached now")
        entries.add_metric([], stats["entries"])
        yield entries
        size = GaugeMetricFamily("prism_query_cache_bytes", "memory the query-vector cache holds now")
        size.add_metric([], stats["bytes"])
        yield size


class _FastPathCollector(Collector):
    """What this process keeps off the request path: the hit-metadata cache and the queued
    search-log rows (per process, like the query-vector cache)."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        yield from _cache_families("prism_metadata_cache", stats["metadata_cache"],
                                   hits="hit product records served from the metadata cache",
                                   misses="hit product records read from the database",
                                   entries="product records cached now")
        yield from _cache_families("prism_result_cache", stats["result_cache"],
                                   hits="searches answered with a cached page (repeated text queries)",
                                   misses="text searches ranked afresh", entries="ranked pages cached now")
        written = stats["search_log"]
        queued = GaugeMetricFamily("prism_search_log_queued", "search-log rows answered but not yet written")
        queued.add_metric([], written["queued"])
        yield queued
        rows = CounterMetricFamily("prism_search_log_rows", "search-log rows by outcome", labels=["outcome"])
        rows.add_metric(["written"], written["rows_written"])
        rows.add_metric(["failed"], written["rows_failed"])
        yield rows
        groups = CounterMetricFamily("prism_search_log_groups", "search-log groups written (one transaction each)")
        groups.add_metric([], written["groups"])
        yield groups


class _CanaryCollector(Collector):
    """The running canary's per-arm evidence, read at scrape time (from SQL: every worker agrees)."""

    def __init__(self, stats: Callable[[], dict | None]):
        self.stats = stats

    def collect(self):
        running = GaugeMetricFamily("prism_canary_running", "1 while an interleaved canary runs")
        try:
            stats = self.stats()
        except Exception:  # a scrape must not fail for it; the canary routes report the error
            stats = None
        running.add_metric([], 1.0 if stats else 0.0)
        yield running
        if not stats:
            return
        info = InfoMetricFamily("prism_canary", "the running canary and what it compares")
        info.add_metric([], {"id": str(stats["id"]), "candidate_index_version": stats["candidate_index_version"],
                             "serving_index_version": stats["serving_index_version"]})
        yield info
        for name, what in (("impressions", "impression events on positions each arm contributed"),
                           ("clicks", "click events credited to each arm"),
                           ("wins", "interleaved searches each arm won (more credited clicks)")):
            family = CounterMetricFamily(f"prism_canary_{name}", what, labels=["arm"])
            for arm in ("serving", "candidate"):
                family.add_metric([arm], stats[arm][name])
            yield family
        searches = CounterMetricFamily("prism_canary_searches", "interleaved searches logged")
        searches.add_metric([], stats["searches"])
        yield searches
        p_value = GaugeMetricFamily("prism_canary_p_value", "two-sided sign test of candidate against serving wins")
        p_value.add_metric([], stats["p_value"])
        yield p_value


class Metrics:
    def __init__(
        self,
        serving_stats: Callable[[], dict],
        query_cache_stats: Callable[[], dict] | None = None,
        fast_path_stats: Callable[[], dict] | None = None,
        canary_stats: Callable[[], dict | None] | None = None,
    ):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        own = {"registry": self.registry}
        self.requests = Counter(
            "prism_http_requests", "HTTP requests by route template, method and status",
            ["method", "route", "status"], **own,
        )
        self.latency = Histogram(
            "prism_http_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route"], buckets=LATENCY_BUCKETS, **own,
        )
        self.stages = Histogram(
            "prism_search_stage_seconds", "time per search stage (sync, filter, facets, prepare, queue, encode, ann, metadata, log): "
            "SearchEngine.search measures them, the API adds log",
            ["stage"], buckets=STAGE_BUCKETS, **own,
        )
        self.searches = Counter(
            "prism_searches", "searches served by query kind and target", ["query_kind", "target"], **own
        )
        self.catalog_changes = Counter("prism_catalog_changes", "API catalog changes by operation", ["op"], **own)
        self.events = Counter("prism_events", "Feedback events received, by outcome (stored, duplicate, conflict)", ["outcome"], **own)
        self.rejected_images = Counter(
            "prism_rejected_images", "query or product images refused, by reason", ["reason"], **own
        )
        self._serving = _ServingCollector(serving_stats)
        self.registry.register(self._serving)
        self._query_cache = _QueryCacheCollector(query_cache_stats) if query_cache_stats is not None else None
        if self._query_cache is not None:
            self.registry.register(self._query_cache)
        self._fast_path = _FastPathCollector(fast_path_stats) if fast_path_stats is not None else None
        if self._fast_path is not None:
            self.registry.register(self._fast_path)
        self._canary = _CanaryCollector(canary_stats) if canary_stats is not None else None
        if self._canary is not None:
            self.registry.register(self._canary)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_search(self, query_kind: str, target: str, timings_ms: dict[str, float]) -> None:
        self.searches.labels(query_kind, target).inc()
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000.0)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self._serving)
        if self._query_cache is not None:
            registry.register(self._query_cache)
        if self._fast_path is not None:
            registry.register(self._fast_path)
        if self._canary is not None:
            registry.register(self._canary)
        return generate_latest(registry)


def _cache_families(prefix: str, counts: dict, *, hits: str, misses: str, entries: str):
    """A cache's hits and misses (counters) and its entries now (a gauge)."""
    for name, help_text, family in (("hits", hits, CounterMetricFamily), ("misses", misses, CounterMetricFamily),
                                    ("entries", entries, GaugeMetricFamily)):
        metric = family(f"{prefix}_{name}", help_text)
        metric.add_metric([], counts[name])
        yield metric
