"""The read side of the write path: other processes' changes, applied here (DESIGN.md §6).

Workers of one server, a CLI ingest into a live data dir and a second server on the same dir all
write through the store, which logs every change.  Before each read, :class:`Follower` checks the
store's version (a shared-memory read); when another process published a change, it has the store
catch up (indexes) and the cache drop what the change invalidated (this process's L1 holds copies
no other process can reach).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ragline.ingest.indexer import ChangeListener
from ragline.store.base import Store

__all__ = ["Follower"]


class Follower:
    def __init__(self, store: Store, changes: ChangeListener | None, after: Callable[[], None]) -> None:
        """``after``: run once a sync applied changes (e.g. refresh gauges)."""
        self.store = store
        self.changes = changes
        self.after = after
        self._lock = asyncio.Lock()
        self._version = store.version  # bound once: behind() runs before every exact hit
        self._synced = store.synced_version
        self.applied = 0
        """Changes of other processes applied so far."""

    def behind(self) -> bool:
        """Has another process published a change this one has not applied (or is one being applied)?"""
        return self._version() != self._synced() or self._lock.locked()

    async def catch_up(self) -> None:
        if not self.behind():
            return
        async with self._lock:
            store = self.store
            changes = await asyncio.to_thread(store.sync)
            for change in changes:
                if self.changes is not None:
                    added = list(change.added)
                    vecs = await asyncio.to_thread(store.vectors, change.tenant, added) if added else None
                    await self.changes.changed(change, vecs, foreign=True)
            self.applied += len(changes)
            if changes:
                self.after()
