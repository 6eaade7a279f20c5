"""The storage-tier extension point and what the built-in tiers share (DESIGN.md §2–3).

Values are opaque ``bytes`` everywhere: callers serialise once with orjson and
the exact-hit path hands the stored bytes straight to the HTTP response.

* :class:`CacheTier` is the protocol every tier implements: ``get_many /
  set_many / delete_many`` plus ``clear`` and the lifecycle/introspection
  members, and the two in-place updates invalidation needs (``mark_many``,
  ``replace``: see :mod:`ragline.cache.marks`), which no combination of the
  other three can do atomically.  Tiers never raise on a backend failure: they return misses and
  drop writes (FAIL OPEN, §3.5) and report it through ``healthy`` and their
  counters.
* :class:`TTLTier` is the optional capability of reporting each hit's
  remaining TTL, so a promotion never outlives the original entry.  Every
  built-in tier has it; :class:`~ragline.cache.tiered.TieredCache` checks for it
  once, when it is built.
* :class:`PendingDeletes` and :data:`MISS` are shared by the Redis and disk
  tiers: deletes owed after a failure, and the "did not happen" sentinel.

Built-in tiers: :class:`~ragline.cache.memory.MemoryTier` (L1),
:class:`~ragline.cache.redis.RedisTier` (L2), :class:`~ragline.cache.disk.DiskTier` (L3).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")

__all__ = ["MISS", "CacheTier", "Miss", "PendingDeletes", "TTLTier"]


@runtime_checkable
class CacheTier(Protocol):
    """One storage tier.  Implementations must never raise on backend failure.

    ``name`` labels metrics and ``CacheInfo.tier``; ``shared`` is True when the
    tier is shared between instances (Redis), which decides what a remote
    invalidation must drop locally.
    """

    name: str
    shared: bool

    @property
    def healthy(self) -> bool:
        """False while the backend is failing (breaker open, disk errors)."""
        ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The values found, by key; absent, expired and unreachable keys are left out."""
        ...

    async def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        """Store every item for ``ttl`` seconds (best effort)."""
        ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove the keys (best effort; a failing shared tier remembers them, see RedisTier)."""
        ...

    async def mark_many(self, keys: Sequence[str], token: bytes) -> None:
        """Mark the present keys in place (:func:`ragline.cache.marks.mark`), keeping their TTL.

        Atomic per key against concurrent writes. A tier that cannot mark must delete the keys
        instead (never leave an unmarked copy of an entry a change may affect)."""
        ...

    async def replace(self, key: str, expected: bytes, value: bytes) -> bool:
        """Compare-and-set: store ``value`` (same TTL) only if ``key`` holds exactly ``expected``."""
        ...

    async def clear(self, prefix: str | None = None) -> int:
        """Remove every ragline key starting with ``prefix`` (all of them for None); returns a count."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters and gauges for metrics: bytes, entries, evictions, errors, healthy …"""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


@runtime_checkable
class TTLTier(CacheTier, Protocol):
    """A tier that can also report each hit's remaining TTL (seconds, None = no expiry),
    so that a promotion to a faster tier never outlives the original entry."""

    async def get_many_ttl(self, keys: Sequence[str]) -> dict[str, tuple[bytes, float | None]]: ...


class Miss:
    """Sentinel: the backend call did not happen or failed (fail open)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS: Final = Miss()


class PendingDeletes:
    """Deletes a tier could not apply (backend down / locked), kept until they are.

    While a key (or a prefix) is pending, reads of it from that tier are answered
    as misses, so an invalidation that failed can never let a stale value through
    (§3.1).  Bounded: past ``max_keys`` keys or 1,000 prefixes it collapses into
    "everything", which blocks every read of the tier until a full clear succeeds.
    """

    __slots__ = ("all", "keys", "max_keys", "prefixes")

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.keys: set[str] = set()
        self.prefixes: set[str] = set()
        self.all = False

    def __bool__(self) -> bool:
        return self.all or bool(self.keys) or bool(self.prefixes)

    def size(self) -> int:
        """Keys + prefixes owed; -1 once collapsed into "everything".  (Not ``__len__``,
        which Python requires to be >= 0.)"""
        return -1 if self.all else len(self.keys) + len(self.prefixes)

    def add(self, keys: Iterable[str] = (), prefix: str | None = None) -> None:
        if self.all:
            return
        if prefix is not None:
            self.prefixes.add(prefix)
        self.keys.update(keys)
        if len(self.keys) > self.max_keys or len(self.prefixes) > 1000:
            self.keys.clear()
            self.prefixes.clear()
            self.all = True

    def blocks(self, key: str) -> bool:
        return self.all or key in self.keys or any(key.startswith(p) for p in self.prefixes)

    def filter(self, found: dict[str, T]) -> dict[str, T]:
        return {k: v for k, v in found.items() if not self.blocks(k)}
