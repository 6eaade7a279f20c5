"""Prometheus metrics and the stage timer.

Metrics live in the default registry (what ``/metrics`` exposes and what
multi-worker deployments aggregate with PROMETHEUS_MULTIPROC_DIR).  The stage
timer records into a histogram and, when asked, into the response's
``timings`` dict — the same measurement serves both.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

HTTP_DURATION = Histogram(
    "ragline_http_request_duration_seconds",
    "HTTP request duration by route",
    ["route", "method", "status"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_DURATION = Histogram(
    "ragline_stage_duration_seconds", "Pipeline stage duration", ["stage"], buckets=_LATENCY_BUCKETS
)
# with several workers each sets these from the store it reads: the merged value is the largest
DOCUMENTS = Gauge("ragline_documents_indexed", "Documents in the store (all tenants)", multiprocess_mode="max")
CHUNKS = Gauge("ragline_chunks_indexed", "Chunks in the store (all tenants)", multiprocess_mode="max")
INGESTED = Counter("ragline_ingest_documents_total", "Documents ingested by outcome", ["outcome"])
EMBEDDED = Counter("ragline_embedded_texts_total", "Texts sent to the embedding model")
LLM_TOKENS = Counter("ragline_llm_tokens_total", "LLM tokens used", ["kind"])
LLM_CALLS = Counter("ragline_llm_calls_total", "LLM calls by outcome", ["outcome"])
ERRORS = Counter("ragline_errors_total", "Errors returned to clients by code", ["code"])
REQUESTS_CANCELLED = Counter(
    "ragline_requests_cancelled_total", "Requests whose client disconnected before the answer: their work was stopped"
)
REQUESTS_FINISHED_AFTER_DISCONNECT = Counter(
    "ragline_requests_finished_after_disconnect_total",
    "Requests whose work ran to its end although their client had disconnected (a shared single-flight result)",
)

_STAGE_CHILDREN: dict[str, Any] = {}


@contextmanager
def stage(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Time a pipeline stage into the histogram (and ``timings`` in ms, if given)."""
    child = _STAGE_CHILDREN.get(name)
    if child is None:
        child = _STAGE_CHILDREN[name] = STAGE_DURATION.labels(name)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        child.observe(dt)
        if timings is not None:
            timings[name] = round(timings.get(name, 0.0) + dt * 1000.0, 3)


INVALIDATIONS = Counter("ragline_cache_invalidations_total", "Cache entries dropped by cause", ["cause"])
CACHE_MARKED = Counter(
    "ragline_cache_marked_total", "Cache entries a corpus change marked for re-verification on their next read"
)
CACHE_REVERIFY = Counter(
    "ragline_cache_reverify_total",
    "Entries verified on read, by outcome: kept or dropped (re-verified by retrieval), unaffected (no change "
    "touched their keyword terms since their stamp: no retrieval)",
    ["outcome"],
)
CACHE_REVERIFY_SECONDS = Histogram(
    "ragline_cache_reverify_seconds",
    "Time to re-verify a marked entry on read (a hit that needed it)",
    buckets=_LATENCY_BUCKETS,
)
LLM_SAVED = Counter("ragline_llm_calls_saved_total", "LLM calls answered from the LLM cache")
SEMANTIC_SIMILARITY = Histogram(
    "ragline_semantic_hit_similarity",
    "Cosine similarity of served semantic hits",
    buckets=(0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0),
)
ANSWERS = Counter("ragline_answers_total", "Answers served by cache outcome", ["outcome"])
"""No tenant label: ``/metrics`` must not list tenant names (per-tenant numbers belong in the tenant's own view)."""
RATE_LIMITED = Counter(
    "ragline_rate_limited_total",
    "Requests the API's own limits refused (429), by scope: key (an API key or anonymous client), tenant, "
    "invalidate (the admin invalidation limit)",
    ["scope"],
)

# --- the gateway (ragline.gateway): one series per upstream (names come from settings, not from requests)
UPSTREAM_REQUESTS = Counter(
    "ragline_upstream_requests_total",
    "Calls to an upstream by outcome: ok, limited (429), failed (5xx, timeout, connection), neutral",
    ["upstream", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "ragline_upstream_latency_seconds",
    "Successful upstream call duration (streams: to the first token)",
    ["upstream"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_IN_FLIGHT = Gauge(
    "ragline_upstream_in_flight", "Calls in flight to an upstream from this server", ["upstream"],
    multiprocess_mode="livesum",
)  # fmt: skip
UPSTREAM_BREAKER = Gauge(
    "ragline_upstream_breaker_state", "Circuit breaker of an upstream: 0 closed, 1 half-open, 2 open", ["upstream"],
    multiprocess_mode="mostrecent",
)  # fmt: skip
UPSTREAM_RATE_FACTOR = Gauge(
    "ragline_upstream_rate_factor",
    "Adaptive rate of an upstream as a fraction of its configured limits (halved on 429)",
    ["upstream"],
    multiprocess_mode="mostrecent",
)
UPSTREAM_SHARED_STATE = Gauge(
    "ragline_upstream_shared_state",
    "1 while the gateway's limits and breakers are shared through Redis, 0 while local",
    multiprocess_mode="min",
)
UPSTREAM_REFUSED = Counter(
    "ragline_upstream_refused_total",
    "Admissions an upstream refused, by reason: rpm, tpm, busy, retry_after, open",
    ["upstream", "reason"],
)
UPSTREAM_QUEUE_SECONDS = Histogram(
    "ragline_upstream_queue_seconds", "Time a call waited for upstream capacity", buckets=_LATENCY_BUCKETS
)
UPSTREAM_RETRIES = Counter("ragline_upstream_retries_total", "Further attempts within a group", ["group"])
UPSTREAM_FALLBACKS = Counter(
    "ragline_upstream_fallbacks_total", "Calls that moved on to a fallback group", ["from_group", "to_group"]
)
UPSTREAM_REJECTED = Counter(
    "ragline_upstream_rejected_total",
    "Calls that found no capacity within gateway.queue_timeout_s (answered 429 or 503 with Retry-After)",
    ["group", "status"],
)
UPSTREAM_BREAKER_TRANSITIONS = Counter(
    "ragline_upstream_breaker_transitions_total", "Breaker openings and closings", ["upstream", "to"]
)
UPSTREAM_POOL = Gauge(
    "ragline_upstream_pool_connections", "Connections in an upstream's httpx pool: open, idle", ["upstream", "state"],
    multiprocess_mode="livesum",
)  # fmt: skip
UPSTREAM_TOKENS = Counter(
    "ragline_upstream_tokens_total",
    "Tokens (prompt + completion, or embedding input) an upstream reported",
    ["upstream"],
)

# --- admission control (ragline.infra.admission)
ADMISSION_IN_FLIGHT = Gauge(
    "ragline_admission_in_flight", "Requests doing admitted work (embed, retrieve, pack)", multiprocess_mode="livesum"
)
ADMISSION_QUEUED = Gauge("ragline_admission_queued", "Requests waiting for admission", multiprocess_mode="livesum")
ADMISSION_WAIT = Histogram(
    "ragline_admission_wait_seconds", "Time a request waited for admission (when it had to)", buckets=_LATENCY_BUCKETS
)
ADMISSION_REJECTED = Counter(
    "ragline_admission_rejected_total",
    "Requests refused with 503 at capacity, by reason: early (before routing), full, timeout",
    ["reason"],
)
