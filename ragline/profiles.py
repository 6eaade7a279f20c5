"""Named presets of settings: ``profile: throughput | latency | memory`` (README "Profiles").

A profile is a partial settings tree applied *beneath* everything the user gave: keyword arguments,
``RAGLINE_*`` variables and the YAML file all win over it, field by field; the defaults lose to it.
No preset touches a setting that changes what an answer contains (:meth:`ragline.config.Settings.fingerprint`
is the same under every profile), so switching profiles never invalidates cached answers: they trade
per-request latency, throughput and memory, not results.
"""

from __future__ import annotations

from typing import Any, Final, Literal

Profile = Literal["throughput", "latency", "memory"]

MiB: Final = 1024 * 1024

PROFILES: Final[dict[str, dict[str, dict[str, Any]]]] = {
    "throughput": {
        # many concurrent clients: fill each model call, keep more hits in memory, reuse connections
        "embedder": {"batch_size": 64, "micro_batch_wait_ms": 5.0},
        "cache": {"l1_max_bytes": 256 * MiB, "redis_max_connections": 128},
        "server": {"keep_alive_s": 30.0, "max_connections": 4096, "rate_limit_sync_s": 0.2},
        "limits": {"queue_timeout_s": 2.0},
    },
    "latency": {
        # one request as fast as possible: never wait for a batch to fill or behind a long ingest slice,
        # give up on a slow Redis or a full queue sooner (fail open / 503 instead of a slow answer); admit
        # one uncached request per core and queue none: at 4x capacity (benchmarks/overload.py) admitted p99
        # 1.59x unloaded at goodput 0.92, against 4.45x (goodput 0.95) at 2 per core with a queue
        "embedder": {"micro_batch_wait_ms": 0.0, "ingest_slice": 4},
        "cache": {"redis_timeout_s": 0.02, "singleflight_poll_s": 0.01, "l1_max_bytes": 128 * MiB},
        "server": {"keep_alive_s": 30.0},
        "limits": {"queue_timeout_s": 0.25, "work_per_core": 1.0, "max_queued_work": 0},
    },
    "memory": {
        # a small resident set: a small L1 (L3 on disk still caches), small model batches, fewer pools and jobs
        "embedder": {"batch_size": 8, "ingest_slice": 4},
        "cache": {"l1_max_bytes": 8 * MiB, "redis_max_connections": 16},
        "llm": {"max_connections": 16},
        "jobs": {"concurrency": 1, "batch_documents": 4},
        "limits": {"max_concurrent_work": 2},
        "server": {"max_connections": 256},
    },
}
"""Each profile's preset, as a settings tree (sections → fields).  README documents every entry and why."""


def preset(name: object) -> dict[str, Any]:
    """The preset tree of ``name`` (a deep copy); ``{}`` for None or an unknown name (the ``profile``
    field's own validation then names the allowed values)."""
    tree = PROFILES.get(name) if isinstance(name, str) else None
    return {section: dict(fields) for section, fields in (tree or {}).items()}
