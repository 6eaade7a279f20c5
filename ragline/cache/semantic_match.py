"""Semantic lookup: a verified cached answer to a *different* query that serves this one (DESIGN.md §3.3).

Separate from :class:`~ragline.cache.layer.CacheLayer` only to keep that class small; it reads the
layer's semantic index, tiers and counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from ragline.cache import guards
from ragline.cache.keys import canonical_query, make_key_for
from ragline.cache.marks import payload
from ragline.context import same_evidence
from ragline.types import Vectors

if TYPE_CHECKING:
    from ragline.cache.deps import DepRecord
    from ragline.cache.layer import CacheLayer

__all__ = ["load_semantic", "semantic_from_peer", "semantic_match"]


async def semantic_match(
    layer: CacheLayer, tenant: str, query: str, qvec: Vectors, context_ids: Sequence[str], exclude: str | None = None
) -> tuple[bytes, float, str] | None:
    """A cached answer for a *different* query that may serve this one, or None.

    Candidates come from the ANN index (cos ≥ τ); each must pass the guards,
    then retrieval verification: its context must hold the same chunks as this
    query's freshly retrieved one (:func:`~ragline.context.same_evidence`).
    Returns (stored body, similarity, matched query).
    """
    if not layer.cs.semantic:
        return None
    cands = layer.semantic.candidates(tenant, layer.fingerprint, qvec, layer.cs.semantic_threshold)
    if not cands:
        return None
    feats = guards.extract_features(query)
    for c in cands:
        if c.answer_key == exclude:
            continue
        if layer.cs.semantic_guards:
            ok, _ = guards.guards_pass(feats, guards.extract_features(c.query), layer.cs.semantic_guard_checks)
            if not ok:
                layer.counters["semantic_rejected_guard"] += 1
                continue
        body, _tier = await layer.get(c.answer_key)
        if body is None:
            layer.semantic.remove([c.answer_key])
            continue
        if not layer.cs.semantic_verify_retrieval and not layer.fresh(body, tenant):
            continue  # a change may have moved its evidence: only verification can serve it
        body = payload(body)
        if layer.cs.semantic_verify_retrieval:
            cached_ctx = [s["chunk_id"] for s in orjson.loads(body)["sources"]]
            if not same_evidence(cached_ctx, context_ids):
                layer.counters["semantic_rejected_verify"] += 1
                continue
        layer.counters["semantic_hits"] += 1
        return body, c.similarity, c.query
    return None


async def semantic_from_peer(layer: CacheLayer, keys: list[str], fingerprint: str) -> None:
    """Another instance cached these answers: index them for semantic lookups here too, if they
    were computed under the same settings (their records are in the shared dependency index)."""
    if not layer.cs.semantic or fingerprint != layer.fingerprint:
        return
    by_tenant: dict[str, list[str]] = {}
    for key in keys:
        if ":answer:" in key:
            by_tenant.setdefault(key.split(":")[2], []).append(key)
    for tenant, ks in by_tenant.items():
        for rec in await layer.deps.records(tenant, ks):
            layer.semantic.add(rec.tenant, layer.fingerprint, rec.entry_key, rec.query, rec.qvec)


async def load_semantic(layer: CacheLayer) -> None:
    """Rebuild the in-process semantic index from the persistent dependency records."""
    by_tenant: dict[str, list[str]] = {}
    for key in await layer.deps.all_keys():
        if ":answer:" in key:
            by_tenant.setdefault(key.split(":")[2], []).append(key)
    recs: list[DepRecord] = []
    for tenant, keys in by_tenant.items():  # one batched fetch per tenant (a round trip with Redis)
        recs.extend(await layer.deps.records(tenant, keys))

    def add_all() -> None:  # ANN inserts are CPU work: off the event loop
        for rec in recs:
            if _under_current_settings(layer, rec):
                layer.semantic.add(rec.tenant, layer.fingerprint, rec.entry_key, rec.query, rec.qvec)

    await asyncio.to_thread(add_all)


def _under_current_settings(layer: CacheLayer, rec: DepRecord) -> bool:
    """Was this answer cached under the layer's settings fingerprint?  Records do not store it, but a
    history-free answer's key is a pure function of (tenant, query, k, fingerprint): an answer cached
    under other settings (another LLM model, before a restart or hot reload) is never indexed, so it
    can never be served as a semantic hit under these."""
    material = {"q": canonical_query(rec.query), "k": rec.k, "fp": layer.fingerprint}
    return make_key_for(rec.tenant, "answer", material) == rec.entry_key
