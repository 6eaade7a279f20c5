"""Semantic lookup: a verified cached answer to a *different* query that serves this one (DESIGN.md §3.3).

Separate from :class:`~ragline.cache.layer.CacheLayer` only to keep that class small; it reads the
layer's semantic index, tiers and counters.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ragline.cache.guards import QueryFeatures
from ragline.cache.keys import canonical_query, make_key_for
from ragline.cache.marks import payload
from ragline.cache.semantic import Candidate
from ragline.cache.semantic_decision import cached_features, decide, guards_accept, load_model
from ragline.types import Vectors

if TYPE_CHECKING:
    from ragline.cache.deps import DepRecord
    from ragline.cache.layer import CacheLayer

__all__ = ["evidence_holds", "evidence_of", "load_semantic", "semantic_from_peer", "semantic_match"]


_CITATION_RE = re.compile(r"\[(\d{1,3})\]")
EVIDENCE_TOP = 3
"""Without citations in the answer, its evidence is its best-ranked sources, this many."""


def evidence_of(answer: Mapping[str, Any]) -> list[str]:
    """The chunk ids a cached answer rests on: the sources its text cites ("[2]"), else its top sources."""
    sources = answer.get("sources") or []
    ids = [str(s["chunk_id"]) for s in sources]
    cited: list[str] = []
    for m in _CITATION_RE.finditer(str(answer.get("answer", ""))):
        n = int(m.group(1))
        if 1 <= n <= len(ids) and ids[n - 1] not in cited:
            cited.append(ids[n - 1])
    return cited or ids[:EVIDENCE_TOP]


def evidence_holds(answer: Mapping[str, Any], context_ids: Sequence[str]) -> bool:
    """Retrieval verification of a semantic hit: every chunk the cached answer rests on is in this
    query's fresh context (so no evidence it used has gone or changed: a changed chunk drops its
    entries), and this query's best chunk was in the cached answer's context (it saw what this query
    would rest on first).  Ties moving at the bottom of either list no longer discard a stable answer."""
    if not context_ids:
        return False
    fresh = set(context_ids)
    cached = {str(s["chunk_id"]) for s in answer.get("sources") or []}
    return context_ids[0] in cached and all(c in fresh for c in evidence_of(answer))


def _accepts(layer: CacheLayer, tenant: str, query: str, qvec: Vectors, c: Candidate, fa: QueryFeatures) -> bool:
    cs = layer.cs
    if not cs.semantic_guards:
        return True
    profile = cs.semantic_profile(tenant)
    if cs.semantic_decision == "guards":
        return guards_accept(profile, query, c.query, c.similarity, fa, tuple(cs.semantic_guard_checks))
    return decide(load_model(), profile, query, c.query, c.similarity, qvec, c.vector, fa).accept


async def semantic_match(
    layer: CacheLayer, tenant: str, query: str, qvec: Vectors, context_ids: Sequence[str], exclude: str | None = None
) -> tuple[bytes, float, str] | None:
    """A cached answer for a *different* query that may serve this one, or None.

    Candidates come from the ANN index (cos ≥ ``semantic_min_cosine``); each must pass the accept
    decision (:mod:`ragline.cache.semantic_decision`), then retrieval verification
    (:func:`evidence_holds`).  Returns (stored body, similarity, matched query).
    """
    if not layer.cs.semantic:
        return None
    cands = layer.semantic.candidates(tenant, layer.fingerprint, qvec, layer.cs.semantic_min_cosine)
    if not cands:
        return None
    fa = cached_features(query)
    for c in cands:
        if c.answer_key == exclude:
            continue
        if not _accepts(layer, tenant, query, qvec, c, fa):
            layer.counters["semantic_rejected_guard"] += 1
            continue
        body, _tier = await layer.get(c.answer_key)
        if body is None:
            layer.semantic.remove([c.answer_key])
            continue
        if not layer.cs.semantic_verify_retrieval and not layer.fresh(body, tenant):
            continue  # a change may have moved its evidence: only verification can serve it
        body = payload(body)
        if layer.cs.semantic_verify_retrieval and not evidence_holds(orjson.loads(body), context_ids):
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
