"""``cache.invalidation: eager``: re-verify every affected entry while the change is applied.

Kept as a setting and a baseline: the default (``lazy``) marks and re-verifies on read instead,
which spent ~4 s of ingest per churn run against 40–70 s for this (docs/NOTES.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ragline.cache.deps import DepRecord
from ragline.cache.layer import InvalidationReport
from ragline.types import Vectors

if TYPE_CHECKING:
    from ragline.cache.invalidation import Invalidation

__all__ = ["recheck"]


async def recheck(
    inv: Invalidation, tenant: str, removed_ids: Iterable[str], new_vectors: Vectors | None, changed_terms: set[str]
) -> InvalidationReport:
    """Apply one ingest/delete to the cache: drop exactly the entries whose context changed.

    ``changed_terms``: the keyword terms of every added and removed chunk.
    """
    cache = inv.cache
    report = InvalidationReport()
    removed = set(removed_ids)
    failures = cache.deps.lookup_failures
    by_chunk = await cache.deps.by_chunks(tenant, removed) if removed else set()
    dense = (
        await cache.deps.dense_entered(tenant, new_vectors) if new_vectors is not None and len(new_vectors) else set()
    )
    by_term = await cache.deps.by_terms(tenant, changed_terms) if changed_terms else set()
    by_term -= by_chunk | dense
    affected = by_chunk | dense | by_term
    if not affected:
        await cache.flush_if_incomplete(tenant, failures, report)
        return report
    records = await cache.deps.records(tenant, affected)
    drop: list[str] = []
    refreshed: list[DepRecord] = []
    for rec in records:
        report.checked += 1
        if removed.intersection(rec.context_ids):
            cause = "deleted_context"
        else:
            new = await inv.reverify(rec)
            if new is not None:
                refreshed.append(new)
                report.kept += 1
                continue
            cause = (
                "removed_candidate"
                if rec.entry_key in by_chunk
                else ("dense_entry" if rec.entry_key in dense else "keyword_entry")
            )
        drop.append(rec.entry_key)
        drop.extend(rec.extra_keys)
        report.causes[cause] = report.causes.get(cause, 0) + 1
    for rec in refreshed:
        if not await cache.deps.add(rec, time.time() + cache.ttl):
            # its new dependencies reached only this instance's index: other instances
            # could not invalidate it in the shared tier, so it goes
            drop.append(rec.entry_key)
            drop.extend(rec.extra_keys)
            report.kept -= 1
            report.causes["deps_unavailable"] = report.causes.get("deps_unavailable", 0) + 1
    await cache.drop(drop)
    report.dropped = len(drop)
    await cache.flush_if_incomplete(tenant, failures, report)
    cache.counters["invalidation_checked"] += report.checked
    cache.counters["invalidation_dropped"] += report.dropped
    cache.counters["invalidation_kept"] += report.kept
    return report
