"""Single-flight: N identical concurrent requests, one computation (DESIGN.md §2 step 2).

* :class:`SingleFlight` (in-process): the first caller of ``do(key, fn)`` starts
  ``fn()`` as a task; every concurrent caller with the same key waits for that
  same task and gets its result or its exception.  A caller that is cancelled
  (client went away) leaves the others undisturbed, the first caller included:
  the computation goes on for whoever still waits.  When the *last* waiter is
  cancelled the computation is cancelled too (nobody wants the LLM tokens).
  The key's entry is removed as soon as the task finishes, however it
  finishes, so nothing leaks.

  Each caller waits on a future of its own, which the task resolves as its last
  step, rather than on ``asyncio.shield(task)``: a shielded task's result reaches
  its caller two event-loop iterations after the task ends (task -> shield's
  outer future -> caller), and work queued meanwhile (the answer's write-behind)
  ran first.  A caller's own future is cancelled with it and touches nobody else,
  which is all the shield was for.  (An earlier stop ran ``fn()`` inline in the
  first caller instead: fast, but a cancelled first caller took the computation
  down with it, and its waiters computed again.)
* :class:`DistributedSingleFlight` (across instances): in front of the local
  one, a short Redis lock (redis-py's ``Lock``: ``SET NX PX`` to acquire, a
  compare-and-delete script to release, taken through the L2 tier's fail-open
  guard) elects one instance to compute.
  The others poll the cache through a callback until the value appears, the
  lock disappears (then they try to take it), or ``wait_s`` passes (then they
  compute themselves: a bounded wait, never a deadlock).  Redis being down
  means no lock: every instance computes (fail open), still deduplicated
  in-process.

  The lock is a *lease*: it expires ``lock_s`` after it was last renewed, and
  its holder renews it every ``lock_s / 3`` for as long as it computes.  A
  computation may thus run longer than the lease (a slow LLM answer), while an
  instance that dies mid-computation (SIGKILL, OOM, a lost machine) frees its
  keys within ``lock_s``, not after ``wait_s``: the other instances' waiters
  take the lock over and compute.  (Before stop 26 the lock was a fixed 30 s
  TTL, so every request for a key a dead instance had been computing waited
  the full 10 s ``wait_s``; the cluster kill test caught readers timing out.)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from redis.asyncio.lock import Lock

    from ragline.cache.redis import RedisTier

T = TypeVar("T")

__all__ = ["DistributedSingleFlight", "SingleFlight"]


class _Flight(Generic[T]):
    __slots__ = ("callers", "task")

    def __init__(self) -> None:
        self.callers: list[asyncio.Future[T]] = []
        self.task: asyncio.Task[None] | None = None


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self.calls = 0
        """Computations started."""
        self.shared = 0
        """Callers that joined a computation already in flight."""

    def __len__(self) -> int:
        """Keys currently in flight (0 when idle: entries never outlive their task)."""
        return len(self._flights)

    def in_flight(self, key: str) -> bool:
        return key in self._flights

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` once for all concurrent callers of ``key``; return or raise its outcome."""
        loop = asyncio.get_running_loop()
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            self._flights[key] = flight
            self.calls += 1
            flight.task = loop.create_task(self._run(key, flight, fn))
        else:
            self.shared += 1
        mine: asyncio.Future[T] = loop.create_future()
        flight.callers.append(mine)
        try:
            return await mine
        except asyncio.CancelledError:
            # our caller was cancelled (or the computation was): if nobody else waits, stop the work
            with contextlib.suppress(ValueError):
                flight.callers.remove(mine)
            task = flight.task
            if not flight.callers and task is not None and not task.done():
                task.cancel()
            raise

    async def _run(self, key: str, flight: _Flight[T], fn: Callable[[], Awaitable[T]]) -> None:
        try:
            result = await fn()
        except BaseException as exc:
            self._release(key, flight)
            cancelled = isinstance(exc, asyncio.CancelledError)
            for f in flight.callers:
                if not f.done():
                    if cancelled:
                        f.cancel()
                    else:
                        f.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancellation and interrupts propagate; errors went to the callers
            return
        self._release(key, flight)
        for f in flight.callers:
            if not f.done():
                f.set_result(result)

    def _release(self, key: str, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]


class DistributedSingleFlight(Generic[T]):
    """Cross-instance single-flight over a Redis lock, fail-open.

    ``compute`` must *store* its result in the shared cache before returning,
    so that waiting instances find it with ``poll``; the lock is released right
    after ``compute`` returns (or fails), and in any case expires after
    ``lock_s`` if this instance dies.
    """

    def __init__(
        self,
        redis: RedisTier | None,
        *,
        lock_s: float = 3.0,
        wait_s: float = 10.0,
        poll_s: float = 0.05,
        first_poll_s: float = 0.005,
        local: SingleFlight[T] | None = None,
    ) -> None:
        self.redis = redis
        self.lock_s = lock_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.first_poll_s = min(first_poll_s, poll_s)
        self.local: SingleFlight[T] = local if local is not None else SingleFlight()
        self.computed = 0
        """Computations this instance ran."""
        self.waited = 0
        """Results obtained from another instance's computation."""
        self.timeouts = 0
        """Waits that ran out and computed anyway."""
        self.lockless = 0
        """Computations done without a lock because Redis was unavailable."""
        self.lost = 0
        """Leases lost while computing (not renewed in time): another instance may compute too."""

    @staticmethod
    def lock_name(key: str) -> str:
        """The Redis lock key of a cache key (never a cache entry itself)."""
        return f"{key}:sf"

    async def do(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        poll: Callable[[], Awaitable[T | None]],
    ) -> T:
        """Return ``compute()``'s result, computed by at most one instance at a time."""
        return await self.local.do(key, lambda: self._across(key, compute, poll))

    async def _across(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        poll: Callable[[], Awaitable[T | None]],
    ) -> T:
        redis = self.redis
        if redis is None:
            return await self._compute(compute)
        lock = redis.lock(self.lock_name(key), self.lock_s)
        token = secrets.token_hex(8)
        got = await redis.try_lock(lock, token)
        if got is None:
            self.lockless += 1
            return await self._compute(compute)
        if got:
            return await self._compute_locked(compute, lock)
        # another instance is computing: poll for its result, bounded
        deadline = time.monotonic() + self.wait_s
        delay = self.first_poll_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.timeouts += 1
                return await self._compute(compute)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, self.poll_s)
            value = await poll()
            if value is not None:
                self.waited += 1
                return value
            got = await redis.try_lock(lock, token)
            if got:  # the holder finished without a value, or died: our turn
                # it may have stored the value between our poll and our lock
                value = await poll()
                if value is not None:
                    await redis.unlock(lock)
                    self.waited += 1
                    return value
                return await self._compute_locked(compute, lock)
            if got is None:  # Redis went away while we waited
                self.lockless += 1
                return await self._compute(compute)

    async def _compute(self, compute: Callable[[], Awaitable[T]]) -> T:
        self.computed += 1
        return await compute()

    async def _compute_locked(self, compute: Callable[[], Awaitable[T]], lock: Lock) -> T:
        redis = self.redis
        assert redis is not None
        renewer = asyncio.get_running_loop().create_task(self._keep(redis, lock))
        try:
            return await self._compute(compute)
        finally:
            renewer.cancel()
            # release even on error/cancel so waiters stop polling and retry at once
            with contextlib.suppress(Exception):
                await asyncio.shield(redis.unlock(lock))

    async def _keep(self, redis: RedisTier, lock: Lock) -> None:
        """Renew the lease every third of it until cancelled.  A renewal that finds the
        lock gone (it expired during a stall, another instance took it) stops: that
        instance computes too, a duplicate but never a wrong value.  Redis being briefly
        unavailable is retried at the next tick."""
        period = self.lock_s / 3
        while True:
            await asyncio.sleep(period)
            if await redis.renew(lock) is False:
                self.lost += 1
                return
