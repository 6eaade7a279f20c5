"""Prometheus metrics of the cache, fed from plain-int counters off the hot path.

The hot path (an L1 hit) only bumps an ``int`` in the cache's counters
(~0.15 µs); a prometheus-client ``Counter.inc`` costs ~0.5 µs even on a bound
child.  :func:`sync` turns the ints into real metrics by adding the *deltas*
since the previous sync.  ``TieredCache.start()`` runs it every second,
``TieredCache.close()`` once more, and a ``/metrics`` handler may call
:func:`sync_all` before rendering.  Because these are ordinary
``Counter``/``Gauge`` objects, ``PROMETHEUS_MULTIPROC_DIR`` aggregation across
uvicorn workers works (a custom collector would only ever show one worker).

Metrics (default ``REGISTRY``):

* ``ragline_cache_requests_total{tier,kind,result}``  result = hit | miss; summed over tenants, because
  ``/metrics`` must not list tenant names (per-tenant counts are in the admin-only ``/v1/cache/stats``)
* ``ragline_cache_evictions_total{tier}``  L1 entries evicted to respect the byte bound
* ``ragline_cache_errors_total{tier}``  backend failures answered as misses (fail open)
* ``ragline_cache_undecryptable_total{tier}``  values that did not open (encryption at rest:
  a rotated-out key, tampering, a plaintext value while encryption is on), answered as misses
* ``ragline_cache_bytes{tier}``, ``ragline_cache_entries{tier}``  L1 size
* ``ragline_cache_healthy{tier}``  0 while a breaker is open / the disk fails

Creation is registry-safe: if the names are already registered (a test that
re-imports this module, or two copies of it) the existing collectors are reused
instead of raising "Duplicated timeseries".
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

from ragline.cache.counts import CountSources, merge_counts_by_tenant
from ragline.cache.tier import CacheTier


class MetricsSource(Protocol):
    """What :func:`sync` reads of a cache (a :class:`~ragline.cache.tiered.TieredCache`):
    its plain-int counters and its tiers' ``stats()``.  Must be hashable and weak-referenceable."""

    @property
    def count_sources(self) -> CountSources: ...

    @property
    def tiers(self) -> Sequence[CacheTier]: ...


__all__ = [
    "BYTES",
    "ENTRIES",
    "ERRORS",
    "EVICTIONS",
    "HEALTHY",
    "REQUESTS",
    "MetricsSource",
    "register",
    "sync",
    "sync_all",
]

M = TypeVar("M", bound=MetricWrapperBase)


def _get_or_create(cls: type[M], name: str, doc: str, labels: list[str], **kw: Any) -> M:
    """Create a metric in the default registry, or return the one already there."""
    try:
        return cls(name, doc, labels, **kw)
    except ValueError:  # "Duplicated timeseries in CollectorRegistry"
        existing = REGISTRY._names_to_collectors.get(name)
        if existing is None and cls is Counter:
            existing = REGISTRY._names_to_collectors.get(name + "_total")
        if isinstance(existing, cls):
            return existing
        raise


REQUESTS = _get_or_create(
    Counter, "ragline_cache_requests_total", "Cache lookups per tier, kind and result (hit|miss).",
    ["tier", "kind", "result"],
)  # fmt: skip
EVICTIONS = _get_or_create(
    Counter, "ragline_cache_evictions_total", "Entries evicted to respect a tier's byte bound.", ["tier"]
)
ERRORS = _get_or_create(
    Counter, "ragline_cache_errors_total", "Cache backend failures answered as misses (fail open).", ["tier"]
)
UNDECRYPTABLE = _get_or_create(
    Counter, "ragline_cache_undecryptable_total", "Stored values that did not decrypt, answered as misses.", ["tier"]
)
BYTES = _get_or_create(
    Gauge, "ragline_cache_bytes", "Bytes held by a bounded cache tier.", ["tier"], multiprocess_mode="livesum"
)
ENTRIES = _get_or_create(
    Gauge, "ragline_cache_entries", "Entries held by a cache tier.", ["tier"], multiprocess_mode="livesum"
)
HEALTHY = _get_or_create(
    Gauge, "ragline_cache_healthy", "1 if the cache tier is usable, 0 if degraded.", ["tier"],
    multiprocess_mode="livemin",
)  # fmt: skip

# Module state survives importlib.reload (tests): losing ``_last`` would re-add every count.
_lock: threading.RLock = globals().get("_lock") or threading.RLock()  # re-entrant: GC finalizers
_caches: weakref.WeakSet[MetricsSource] = globals().get("_caches") or weakref.WeakSet()
_last: weakref.WeakKeyDictionary[MetricsSource, dict[Any, float]] = (
    globals().get("_last") or weakref.WeakKeyDictionary()
)


def _flush_requests(counts: dict[tuple[str, str, str, str], int], last: dict[Any, float]) -> None:
    for labels, n in list(counts.items()):  # (tier, kind, tenant, result): deltas per tenant, no tenant label
        delta = n - last.get(labels, 0)
        if delta > 0:
            REQUESTS.labels(labels[0], labels[1], labels[3]).inc(delta)
            last[labels] = n


def sync(cache: MetricsSource) -> None:
    """Add ``cache``'s counter deltas since the last sync to the metrics; set the gauges."""
    with _lock:
        last = _last.setdefault(cache, {})
        _flush_requests(merge_counts_by_tenant(cache.count_sources), last)
        for tier in cache.tiers:
            st = tier.stats()
            name = tier.name
            for metric, stat in ((EVICTIONS, "evictions"), (ERRORS, "errors"), (UNDECRYPTABLE, "undecryptable")):
                if stat in st:
                    k = (stat, name)
                    delta = st[stat] - last.get(k, 0)
                    if delta > 0:
                        metric.labels(name).inc(delta)
                        last[k] = st[stat]
            if "bytes" in st:
                BYTES.labels(name).set(st["bytes"])
            if "entries" in st:
                ENTRIES.labels(name).set(st["entries"])
            HEALTHY.labels(name).set(st.get("healthy", 1))


def sync_all() -> None:
    """:func:`sync` every live registered cache (call before rendering ``/metrics``)."""
    with _lock:
        caches = list(_caches)
    for cache in caches:
        sync(cache)


def register(cache: MetricsSource) -> None:
    """Track ``cache`` for :func:`sync_all`; when it is garbage-collected, its last
    request counts are flushed so no increment is lost."""
    with _lock:
        if cache in _caches:
            return
        _caches.add(cache)
        last = _last.setdefault(cache, {})
    weakref.finalize(cache, _final_flush, cache.count_sources, last)


def _final_flush(sources: CountSources, last: dict[Any, float]) -> None:
    with _lock:
        _flush_requests(merge_counts_by_tenant(sources), last)
