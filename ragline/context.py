"""Context building: drop near-duplicates, pack to a token budget, trim history.

Pure logic over already-retrieved hits; token counts come from a callable (the
embedder's tokenizer, or the LLM's where known), so this module owns no model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ragline.types import Hit, Vectors

TokenCounter = Callable[[str], int]


def same_evidence(a: Iterable[str], b: Iterable[str]) -> bool:
    """Do two answer contexts (chunk ids) hold the same evidence?

    Equal as *sets*: this is what "a fresh run would retrieve the same context"
    means for a cached answer (DESIGN.md §3.1, §3.2).  The order of the same
    chunks is not compared, because RRF reorders near-tied chunks whenever a
    new chunk shifts ranks deep in either list, which changes no fact an answer
    rests on; in the SciFact churn benchmark such order-only changes were a
    third of all answer invalidations.  A chunk whose text changed keeps its id,
    so callers treat a changed chunk as removed (its entries are dropped) before
    comparing.  Retrieval results are rankings and are compared in order.
    """
    return set(a) == set(b)


def drop_near_duplicates(hits: Sequence[Hit], vectors: Vectors | None, threshold: float) -> list[int]:
    """Indices of hits to keep: a hit whose cosine to a kept one is ≥ threshold is dropped.

    Exact text duplicates are dropped even without vectors.
    """
    keep: list[int] = []
    seen_text: set[str] = set()
    for i, h in enumerate(hits):
        norm = " ".join(h.text.split()).casefold()
        if norm in seen_text:
            continue
        if vectors is not None and keep:
            sims = vectors[keep] @ vectors[i]
            if float(np.max(sims)) >= threshold:
                continue
        seen_text.add(norm)
        keep.append(i)
    return keep


def pack(
    hits: Sequence[Hit],
    count_tokens: TokenCounter,
    budget: int,
    max_sources: int,
    vectors: Vectors | None = None,
    near_duplicate: float = 0.95,
    per_source_overhead: int = 8,
) -> list[Hit]:
    """Best-first packing: take hits in rank order while they fit the budget.

    A hit that does not fit is skipped (a shorter, lower-ranked one may still
    fit) rather than truncated mid-sentence; ``per_source_overhead`` accounts
    for the "[n] title" header the prompt adds.
    """
    out: list[Hit] = []
    used = 0
    for i in drop_near_duplicates(hits, vectors, near_duplicate):
        if len(out) >= max_sources:
            break
        h = hits[i]
        cost = count_tokens(h.text) + (count_tokens(h.title) if h.title else 0) + per_source_overhead
        if used + cost > budget:
            continue
        out.append(h)
        used += cost
    return out


def trim_history(
    history: Sequence[dict[str, str]], count_tokens: TokenCounter, budget: int, max_turns: int
) -> list[dict[str, str]]:
    """Keep the most recent messages (at most ``max_turns`` user/assistant pairs) within budget."""
    recent = list(history)[-2 * max_turns :] if max_turns else []
    out: list[dict[str, str]] = []
    used = 0
    for msg in reversed(recent):
        cost = count_tokens(msg.get("content", "")) + 4
        if used + cost > budget:
            break
        out.append(msg)
        used += cost
    out.reverse()
    return out


def memo_counter(count: TokenCounter, max_chars: int = 4096) -> TokenCounter:
    """``count`` memoised for texts up to ``max_chars``: chunk texts recur across requests (and every
    re-verification packs again), so each is counted once, while the memo stays bounded in bytes
    (20,000 × 4 KB) whatever users send as history."""
    memo = functools.lru_cache(maxsize=20_000)(count)

    def counted(text: str) -> int:
        return memo(text) if len(text) <= max_chars else count(text)

    return counted
