"""Hit/miss request counters of a tiered cache, as plain ints (DESIGN.md §2–3).

The hot path only bumps an ``int`` keyed by the key prefix ``rl:v1:{tenant}:{kind}``;
these helpers turn those counters into ``(tier, kind, tenant, result)`` labels off
the hot path, for :class:`~ragline.cache.tiered.TieredCache` and
:mod:`ragline.cache.metrics`.
"""

from __future__ import annotations

from typing import Final

from ragline.cache.keys import KEY_ROOT, KINDS

__all__ = ["CountSources", "key_prefix", "merge_counts", "merge_counts_by_tenant"]

CountSources = tuple[str, dict[str, int], dict[str, int], dict[tuple[str, str, str], int]]
"""(L1 name, L1 hits by key prefix, L1 misses by key prefix, (tier, key prefix, result) -> n)."""

DIGEST_SUFFIX: Final = 33  # ":" + 32 hex digits


def key_prefix(key: str) -> str:
    """``rl:v1:{tenant}:{kind}`` — one slice, no parsing, on the hot path."""
    return key[:-DIGEST_SUFFIX]


def _labels(prefix: str) -> tuple[str, str]:
    """(tenant, kind) of a key prefix; ("other", "other") for keys not made by ``make_key``."""
    parts = prefix.split(":")
    if len(parts) == 4 and parts[0] + ":" == KEY_ROOT and parts[3] in KINDS:
        return parts[2], parts[3]
    return "other", "other"


def merge_counts_by_tenant(sources: CountSources) -> dict[tuple[str, str, str, str], int]:
    """Flatten a cache's counters into ``(tier, kind, tenant, result) -> count`` (zeros omitted)."""
    l1_name, hits, misses, others = sources
    out: dict[tuple[str, str, str, str], int] = {}
    items: list[tuple[tuple[str, str, str], int]] = list(others.items())
    items += [((l1_name, p, "hit"), n) for p, n in list(hits.items())]
    items += [((l1_name, p, "miss"), n) for p, n in list(misses.items())]
    for (tier, prefix, result), n in items:
        if n:
            tenant, kind = _labels(prefix)
            k = (tier, kind, tenant, result)
            out[k] = out.get(k, 0) + n
    return out


def merge_counts(sources: CountSources) -> dict[tuple[str, str, str], int]:
    """Flatten a cache's counters into ``(tier, kind, result) -> count`` over all tenants."""
    out: dict[tuple[str, str, str], int] = {}
    for (tier, kind, _tenant, result), n in merge_counts_by_tenant(sources).items():
        out[(tier, kind, result)] = out.get((tier, kind, result), 0) + n
    return out
