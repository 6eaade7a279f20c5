"""Prometheus view of the cache, computed at scrape time from plain-int counters.

The hot path (an L1 hit) only bumps an ``int`` in ``TieredCache.counts``; no
prometheus-client object is touched per request.  One collector, registered
once on the default ``REGISTRY``, turns the counters of every live
``TieredCache`` into:

* ``ragline_cache_requests_total{tier,kind,result}``  counter, result = hit | miss
* ``ragline_cache_bytes{tier}`` / ``ragline_cache_entries{tier}``  gauges (L1)
* ``ragline_cache_evictions_total{tier}``  counter (L1 LRU evictions)
* ``ragline_cache_errors_total{tier}``  counter (Redis / disk failures, fail-open)
* ``ragline_cache_healthy{tier}``  gauge, 0 while a breaker is open

Registration is idempotent: importing or calling :func:`register` again (tests
build many caches, pytest may re-import) never raises "Duplicated timeseries".
The request counters of a cache that is garbage-collected are folded into a
retired total so the counter stays monotonic.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from ragline.cache.tiers import TieredCache

__all__ = ["CacheCollector", "collector", "ensure_registered", "register", "unregister"]

_lock = threading.RLock()  # re-entrant: a GC finalizer may run while it is held
_caches: weakref.WeakSet[TieredCache] = weakref.WeakSet()
_retired: dict[tuple[str, str, str], int] = {}
_finalizers: dict[int, weakref.finalize[..., TieredCache]] = {}


def _retire(cache_id: int, counts: dict[tuple[str, str, str], int]) -> None:
    with _lock:
        fin = _finalizers.get(cache_id)
        if fin is not None and not fin.alive:
            del _finalizers[cache_id]
        for k, n in counts.items():
            _retired[k] = _retired.get(k, 0) + n


class CacheCollector(Collector):
    """Reads the live caches' counters on every scrape."""

    def collect(self) -> Iterator[Metric]:
        with _lock:
            caches = list(_caches)
            totals = dict(_retired)
        for cache in caches:
            for k, n in list(cache.counts.items()):
                totals[k] = totals.get(k, 0) + n
        requests = CounterMetricFamily(
            "ragline_cache_requests",
            "Cache lookups per tier, kind and result (hit|miss).",
            labels=["tier", "kind", "result"],
        )
        for (tier, kind, result), n in sorted(totals.items()):
            requests.add_metric([tier, kind, result], n)
        yield requests

        size = GaugeMetricFamily("ragline_cache_bytes", "Bytes held by a bounded tier.", labels=["tier"])
        entries = GaugeMetricFamily("ragline_cache_entries", "Entries held by a tier.", labels=["tier"])
        evictions = CounterMetricFamily(
            "ragline_cache_evictions", "Entries evicted to respect the byte bound.", labels=["tier"]
        )
        errors = CounterMetricFamily(
            "ragline_cache_errors", "Backend failures answered as misses (fail open).", labels=["tier"]
        )
        healthy = GaugeMetricFamily("ragline_cache_healthy", "1 if the tier is usable.", labels=["tier"])
        agg: dict[str, dict[str, float]] = {}
        for cache in caches:
            for t in cache.tiers:
                st = t.stats()
                a = agg.setdefault(t.name, {"healthy": 1.0})
                for name in ("bytes", "entries", "evictions", "errors"):
                    if name in st:
                        a[name] = a.get(name, 0.0) + float(st[name])
                a["healthy"] = min(a["healthy"], float(st.get("healthy", 1)))
        for tier_name, a in sorted(agg.items()):
            if "bytes" in a:
                size.add_metric([tier_name], a["bytes"])
            if "entries" in a:
                entries.add_metric([tier_name], a["entries"])
            if "evictions" in a:
                evictions.add_metric([tier_name], a["evictions"])
            if "errors" in a:
                errors.add_metric([tier_name], a["errors"])
            healthy.add_metric([tier_name], a["healthy"])
        yield size
        yield entries
        yield evictions
        yield errors
        yield healthy

    def describe(self) -> Iterator[Metric]:
        # Declaring the names lets the registry detect a genuine duplicate once, at
        # registration, instead of at every scrape.
        yield CounterMetricFamily("ragline_cache_requests", "", labels=["tier", "kind", "result"])
        yield GaugeMetricFamily("ragline_cache_bytes", "", labels=["tier"])
        yield GaugeMetricFamily("ragline_cache_entries", "", labels=["tier"])
        yield CounterMetricFamily("ragline_cache_evictions", "", labels=["tier"])
        yield CounterMetricFamily("ragline_cache_errors", "", labels=["tier"])
        yield GaugeMetricFamily("ragline_cache_healthy", "", labels=["tier"])


_collector = CacheCollector()
_registered: set[int] = set()


def collector() -> CacheCollector:
    """The process-wide collector (to register on a custom registry, too)."""
    return _collector


def ensure_registered(registry: CollectorRegistry = REGISTRY) -> None:
    """Register the collector on ``registry`` once; a no-op afterwards, and a no-op if an
    earlier import of this module (a test re-import) already registered the same names."""
    with _lock:
        if id(registry) in _registered:
            return
        # ValueError: names already registered by a previous incarnation of this module
        with contextlib.suppress(ValueError):
            registry.register(_collector)
        _registered.add(id(registry))


def register(cache: TieredCache) -> None:
    """Include ``cache``'s counters in the exported metrics for as long as it lives."""
    ensure_registered()
    with _lock:
        if cache in _caches:
            return
        _caches.add(cache)
        _finalizers[id(cache)] = weakref.finalize(cache, _retire, id(cache), cache.counts)


def unregister(cache: TieredCache) -> None:
    """Stop exporting ``cache``; its request counts so far move to the retired total."""
    with _lock:
        if cache not in _caches:
            return
        _caches.discard(cache)
        fin = _finalizers.pop(id(cache), None)
    if fin is not None:
        fin()  # runs _retire once and detaches
