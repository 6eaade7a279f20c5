"""Write-behind: cache writes that need not delay the response they come from.

A semantic hit is served from an answer already cached, yet storing it under the new query's key
(dependency record, then every tier) took about twice as long as finding it, and the retrieval entry
and the query's embedding were written the same way before the response went out.  Those writes only
speed up the *next* request, so they run as tasks here instead, and the response leaves at once.

Correctness does not move: an answer or retrieval write is still guarded by the corpus generation it
was computed at (checked before and after it lands, :meth:`ragline.cache.invalidation.Invalidation.put`),
and its dependency record still goes in before its value.  What changes is *when* it lands, so:

- a reader of a key whose write is still pending waits for that write first (:meth:`wait`): a client
  that asks again in the same process finds the entry exactly as if the write had been awaited;
- writes to one key run in the order they were submitted (each waits for the one before it);
- at most ``limit`` writes are pending: past that a write is awaited in place (back-pressure, bounded
  memory under overload);
- closing the cache drains every pending write first (:meth:`drain`), so none is lost at shutdown;
- a write of no key (a query vector's copies in the slow tiers: a pure function of its text, read by
  nobody who waits) starts only once no request is computing (:meth:`foreground`), or after
  ``defer_s``: it no longer shares the cores with the request that produced it.  Measured on the
  2-core machine: that request's retrieval took 1.73-1.89 ms instead of 1.98-2.70 ms when the
  vector's disk write was left out (docs/NOTES.md, stop 23).

A failed write is logged at debug level and dropped: the cache fails open, as for any write.  asyncio
has no keyed, bounded, draining task set: hence this small class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

__all__ = ["WriteBehind"]

log = logging.getLogger("ragline.cache")


class WriteBehind:
    def __init__(self, limit: int = 1024, defer_s: float = 0.25) -> None:
        self.limit = limit
        self.defer_s = defer_s
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._keyed: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.written = 0
        """Writes that ran behind their response (tests and stats read it)."""
        self.inline = 0
        """Writes awaited in place because ``limit`` were pending."""

    def __len__(self) -> int:
        return len(self._tasks)

    async def submit(self, key: str | None, write: Coroutine[Any, Any, None]) -> None:
        """Run ``write`` behind the caller; ``key`` (if any) is the cache key it writes, for :meth:`wait`."""
        if len(self._tasks) >= self.limit:
            self.inline += 1
            await self.wait(key)
            await self._run(write)
            return
        before = self._keyed.get(key) if key is not None else None
        defer = key is None and self._active > 0
        task = asyncio.get_running_loop().create_task(self._after(before, write, defer))
        self._tasks.add(task)
        if key is not None:
            self._keyed[key] = task
        task.add_done_callback(lambda t: self._done(key, t))

    @contextlib.asynccontextmanager
    async def foreground(self) -> AsyncIterator[None]:
        """Mark a request computing (a miss, a semantic hit, a retrieval): writes of no key wait for
        the last one to end."""
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def wait(self, key: str | None) -> bool:
        """Return once the pending write of ``key`` (if any) has landed or failed; whether there was one."""
        task = self._keyed.get(key) if key is not None else None
        if task is None:
            return False
        with contextlib.suppress(BaseException):
            await asyncio.shield(task)
        return True

    async def drain(self) -> None:
        """Wait for every pending write (before the tiers close)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _after(
        self, before: asyncio.Task[None] | None, write: Coroutine[Any, Any, None], defer: bool = False
    ) -> None:
        # one loop iteration first: the caller that produced this write gets its result in the
        # iteration this task would start in (single-flight resolves it then), so it goes out first
        await asyncio.sleep(0)
        if defer and not self._idle.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.defer_s)
        if before is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(before)
        await self._run(write)
        self.written += 1

    @staticmethod
    async def _run(write: Coroutine[Any, Any, None]) -> None:
        try:
            await write
        except Exception as exc:  # fail open: a lost cache write costs a later miss, never an error
            log.debug("cache write dropped: %s", type(exc).__name__)

    def _done(self, key: str | None, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if key is not None and self._keyed.get(key) is task:
            del self._keyed[key]
