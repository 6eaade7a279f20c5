"""L1: the in-process memory tier (DESIGN.md §2–3).

Bounded in *bytes*, LRU + TTL, with synchronous ``get``/``set`` so the hot path
needs no ``await``; the async :class:`~ragline.cache.tier.CacheTier` methods
wrap them without ever yielding.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from ragline.cache.marks import mark

__all__ = ["ENTRY_OVERHEAD", "MemoryTier"]

ENTRY_OVERHEAD: Final = 320
"""Bytes charged per L1 entry on top of ``len(key) + len(value)``.

Measured with tracemalloc for 1k–180k entries of an ``OrderedDict[str, (bytes,
float)]``: 268–301 bytes per entry (str and bytes headers, the tuple, the float,
the dict slot and the OrderedDict node).  320 keeps the real footprint at or
below ``max_bytes``.
"""


class MemoryTier:
    """In-process L1: bounded in bytes, LRU order, per-entry TTL.

    Every operation is O(1) (amortised).  Expired entries are never returned;
    they are dropped when touched or when they reach the LRU end (their bytes
    count against the bound until then, so the bound always holds).  Entries
    bigger than ``max_entry_bytes`` are not stored, so one huge value cannot
    flush the whole hot set.

    ``max_ttl_s`` caps every TTL: L1 copies on other instances are dropped by
    pub/sub invalidation events, and the cap bounds the damage of an event that
    was lost.
    """

    shared = False

    __slots__ = (
        "_clock",
        "_data",
        "bytes",
        "entry_overhead",
        "evictions",
        "expirations",
        "max_bytes",
        "max_entry_bytes",
        "max_ttl_s",
        "name",
        "rejected",
    )

    def __init__(
        self,
        max_bytes: int,
        *,
        name: str = "l1",
        max_ttl_s: float | None = None,
        max_entry_bytes: int | None = None,
        entry_overhead: int = ENTRY_OVERHEAD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.name = name
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes // 8 if max_entry_bytes is None else max_entry_bytes
        self.max_ttl_s = math.inf if max_ttl_s is None else max_ttl_s
        self.entry_overhead = entry_overhead
        self._clock = clock
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0
        self.expirations = 0
        self.rejected = 0

    # -- synchronous fast path ---------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The live value of ``key`` or None; a hit becomes most recently used."""
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            self._drop(key, entry)
            self.expirations += 1
            return None
        self._data.move_to_end(key)
        return entry[0]

    def get_ttl(self, key: str) -> tuple[bytes, float] | None:
        """Like :meth:`get`, also returning the remaining TTL in seconds."""
        entry = self._data.get(key)
        if entry is None:
            return None
        remaining = entry[1] - self._clock()
        if remaining <= 0:
            self._drop(key, entry)
            self.expirations += 1
            return None
        self._data.move_to_end(key)
        return entry[0], remaining

    def set(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` for ``min(ttl, max_ttl_s)`` seconds, evicting LRU entries to fit.

        Returns False (and stores nothing, dropping any old value) when the
        entry is too large or the TTL is not positive.
        """
        data = self._data
        old = data.pop(key, None)
        if old is not None:
            self.bytes -= len(key) + len(old[0]) + self.entry_overhead
        size = len(key) + len(value) + self.entry_overhead
        if ttl <= 0 or size > self.max_entry_bytes or size > self.max_bytes:
            self.rejected += 1
            return False
        data[key] = (value, self._clock() + min(ttl, self.max_ttl_s))
        self.bytes += size
        if self.bytes > self.max_bytes:
            self._shrink()
        return True

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was present."""
        entry = self._data.pop(key, None)
        if entry is None:
            return False
        self.bytes -= len(key) + len(entry[0]) + self.entry_overhead
        return True

    def clear_prefix(self, prefix: str | None = None) -> int:
        """Remove every key starting with ``prefix`` (everything for None); O(entries)."""
        if prefix is None:
            n = len(self._data)
            self._data.clear()
            self.bytes = 0
            return n
        doomed = [k for k in self._data if k.startswith(prefix)]
        for k in doomed:
            self.delete(k)
        return len(doomed)

    def purge_expired(self) -> int:
        """Drop every expired entry now (O(entries)); for an optional periodic sweep."""
        now = self._clock()
        doomed = [(k, e) for k, e in self._data.items() if e[1] <= now]
        for k, e in doomed:
            self._drop(k, e)
        self.expirations += len(doomed)
        return len(doomed)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def keys_lru(self) -> list[str]:
        """Keys from least to most recently used (tests, debugging)."""
        return list(self._data)

    def _drop(self, key: str, entry: tuple[bytes, float]) -> None:
        del self._data[key]
        self.bytes -= len(key) + len(entry[0]) + self.entry_overhead

    def _shrink(self) -> None:
        data = self._data
        overhead = self.entry_overhead
        while self.bytes > self.max_bytes and data:
            key, entry = data.popitem(last=False)
            self.bytes -= len(key) + len(entry[0]) + overhead
            self.evictions += 1

    # -- CacheTier (async wrappers: no awaits inside, so they never yield) -------------

    @property
    def healthy(self) -> bool:
        return True

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        get = self.get
        for k in keys:
            v = get(k)
            if v is not None:
                out[k] = v
        return out

    async def get_many_ttl(self, keys: Sequence[str]) -> dict[str, tuple[bytes, float | None]]:
        out: dict[str, tuple[bytes, float | None]] = {}
        for k in keys:
            hit = self.get_ttl(k)
            if hit is not None:
                out[k] = hit
        return out

    async def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        for k, v in items.items():
            self.set(k, v, ttl)

    async def delete_many(self, keys: Sequence[str]) -> None:
        for k in keys:
            self.delete(k)

    async def clear(self, prefix: str | None = None) -> int:
        return self.clear_prefix(prefix)

    async def mark_many(self, keys: Sequence[str], token: bytes) -> None:
        data = self._data
        for k in keys:
            entry = data.get(k)
            if entry is not None:  # in place: same expiry and LRU position; bytes re-counted
                value = mark(entry[0], token)
                data[k] = (value, entry[1])
                self.bytes += len(value) - len(entry[0])

    async def replace(self, key: str, expected: bytes, value: bytes) -> bool:
        entry = self._data.get(key)
        if entry is None or entry[0] != expected:
            return False
        self._data[key] = (value, entry[1])
        self.bytes += len(value) - len(expected)
        return True

    def stats(self) -> dict[str, float]:
        return {
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "entries": len(self._data),
            "evictions": self.evictions,
            "expirations": self.expirations,
            "rejected": self.rejected,
            "healthy": 1,
        }

    async def close(self) -> None:
        self.clear_prefix(None)
