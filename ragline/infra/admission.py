"""Admission control: a bounded amount of expensive work at once, a short queue, a deadline (DESIGN §3.6).

Past capacity a server that accepts everything slows every request down until all of them time out
(measured before this existed: 64 concurrent uncached queries, p99 7.25 s, no 429/503).  So the
expensive part of a request — embedding, retrieval, context packing: CPU — runs inside a
:meth:`Admission.slot`:

* at most ``limit`` at once;
* at most ``queue`` more waiting, each at most ``timeout_s``;
* beyond that, at once, ``AtCapacity`` (a ``ServiceUnavailable``: 503) with a Retry-After estimated from the measured
  time a slot is held and the queue ahead.

What is cheap stays outside: an exact cache hit never waits for a slot, so hits are not shed before
misses are; generation waits in the gateway's own limits (an LLM call costs this server nothing but
a socket while it runs).  A waiter whose request is cancelled (its client left) leaves the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

from ragline import metrics
from ragline.config import LimitSettings
from ragline.errors import AtCapacity

__all__ = ["Admission"]


class Admission:
    def __init__(self, limit: int, queue: int, timeout_s: float) -> None:
        if limit < 1 or queue < 0 or timeout_s <= 0:
            raise ValueError("limit must be >= 1, queue >= 0 and timeout_s > 0")
        self.limit = limit
        self.queue = queue
        self.timeout_s = timeout_s
        self._sem = asyncio.Semaphore(limit)
        self._waiting = 0
        self._held = 0
        self._hold_s = 0.05
        """EWMA of how long a slot is held, for Retry-After."""
        self.admitted = 0
        self.rejected = 0

    @classmethod
    def from_limits(cls, lim: LimitSettings) -> Admission:
        """``max_concurrent_work`` (0: ``work_per_core`` per CPU core), ``max_queued_work`` (-1: as many),
        ``queue_timeout_s``."""
        work = lim.max_concurrent_work or max(1, round(lim.work_per_core * (os.cpu_count() or 1)))
        return cls(work, work if lim.max_queued_work < 0 else lim.max_queued_work, lim.queue_timeout_s)

    @property
    def in_flight(self) -> int:
        return self._held

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def full(self) -> bool:
        """Whether a request asking for a slot now would be refused at once (every slot held, queue full)."""
        return self._waiting >= self.queue and self._sem.locked()

    def refuse_early(self) -> float:
        """Count a request refused before it asked for a slot (:mod:`ragline.server.shedding`); its Retry-After."""
        self.rejected += 1
        metrics.ADMISSION_REJECTED.labels("early").inc()
        return self.retry_after()

    def retry_after(self) -> float:
        """Seconds until the queue ahead would have drained, at least 1."""
        return max(1.0, (self._waiting + self._held) * self._hold_s / self.limit)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one unit of capacity for the block, or raise ``AtCapacity`` (see module docs)."""
        sem = self._sem
        if sem.locked():
            if self._waiting >= self.queue:
                self._reject("full")
            t0 = time.perf_counter()
            self._waiting += 1
            metrics.ADMISSION_QUEUED.inc()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await sem.acquire()
            except TimeoutError:
                self._reject("timeout")
            finally:
                self._waiting -= 1
                metrics.ADMISSION_QUEUED.dec()
            metrics.ADMISSION_WAIT.observe(time.perf_counter() - t0)
        else:
            await sem.acquire()
        self._held += 1
        self.admitted += 1
        metrics.ADMISSION_IN_FLIGHT.inc()
        t1 = time.perf_counter()
        try:
            yield
        finally:
            self._hold_s += 0.1 * (time.perf_counter() - t1 - self._hold_s)
            self._held -= 1
            metrics.ADMISSION_IN_FLIGHT.dec()
            sem.release()

    def _reject(self, why: str) -> None:
        self.rejected += 1
        metrics.ADMISSION_REJECTED.labels(why).inc()
        wait = self.retry_after()
        raise AtCapacity(
            f"the server is at capacity ({self._held} requests being worked on, {self._waiting} waiting); "
            f"retry after {round(wait)}s",
            wait,
        )
