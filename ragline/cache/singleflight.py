"""Single-flight: N identical concurrent requests, one computation (DESIGN.md §2 step 2).

* :class:`SingleFlight` (in-process): the first caller of ``do(key, fn)`` runs
  ``fn()`` itself; every concurrent caller with the same key awaits its outcome
  and gets the same result or exception.  A joined caller that is cancelled
  (client went away) leaves the others undisturbed.  If the first caller is
  cancelled, its computation stops with it; a caller still waiting then starts
  it again (the first of them leads, the others join it), so every caller still
  gets a result.  The key's entry is removed as soon as the computation ends,
  however it ends, so nothing leaks.

  Why the first caller computes in place rather than in a task that every caller
  awaits: a task's result reaches its awaiting caller only after two or three
  more event-loop iterations, and any work queued meanwhile runs first, e.g. the
  write-behind of the answer just computed.  On the 2-core machine that delay was
  0.2-0.4 ms of a ~10 ms semantic hit (docs/NOTES.md, stop 24).  The cost moves
  to a rare case: the first caller's client leaves while others wait for the
  same key; they compute again instead of receiving the rest of its work.
* :class:`DistributedSingleFlight` (across instances): in front of the local
  one, a short Redis lock (redis-py's ``Lock``: ``SET NX PX`` to acquire, a
  compare-and-delete script to release, taken through the L2 tier's fail-open
  guard) elects one instance to compute.
  The others poll the cache through a callback until the value appears, the
  lock disappears (then they try to take it), or ``wait_s`` passes (then they
  compute themselves: a bounded wait, never a deadlock).  Redis being down
  means no lock: every instance computes (fail open), still deduplicated
  in-process.
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


class _LeaderGone(Exception):
    """The caller computing a key was cancelled: a caller waiting for it starts again."""


class _Flight(Generic[T]):
    __slots__ = ("outcome", "waiters")

    def __init__(self, outcome: asyncio.Future[T]) -> None:
        self.outcome = outcome
        self.waiters = 0


class SingleFlight(Generic[T]):
    """Deduplicate concurrent async computations by key, within one event loop."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self.calls = 0
        """Computations started."""
        self.shared = 0
        """Callers that joined a computation already in flight."""

    def __len__(self) -> int:
        """Keys currently in flight (0 when idle: entries never outlive their computation)."""
        return len(self._flights)

    def in_flight(self, key: str) -> bool:
        return key in self._flights

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` once for all concurrent callers of ``key``; return or raise its outcome."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(key, fn)
            self.shared += 1
            flight.waiters += 1
            try:
                # shield: this caller's cancellation must not cancel the outcome the others await
                return await asyncio.shield(flight.outcome)
            except _LeaderGone:
                continue  # the computing caller was cancelled: compute (or join whoever now does)
            finally:
                flight.waiters -= 1

    async def _lead(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        flight: _Flight[T] = _Flight(asyncio.get_running_loop().create_future())
        self._flights[key] = flight
        self.calls += 1
        try:
            result = await fn()
        except Exception as exc:
            self._fail(key, flight, exc)
            raise
        except BaseException:  # cancelled (or interrupted): the waiting callers start again
            self._fail(key, flight, _LeaderGone())
            raise
        self._release(key, flight)
        flight.outcome.set_result(result)
        return result

    def _release(self, key: str, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _fail(self, key: str, flight: _Flight[T], exc: BaseException) -> None:
        self._release(key, flight)
        flight.outcome.set_exception(exc)
        flight.outcome.exception()  # mark retrieved: no "exception was never retrieved" when nobody waits


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
        lock_s: float = 30.0,
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
        assert self.redis is not None
        try:
            return await self._compute(compute)
        finally:
            # release even on error/cancel so waiters stop polling and retry at once
            with contextlib.suppress(Exception):
                await asyncio.shield(self.redis.unlock(lock))
