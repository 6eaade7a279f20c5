"""The one way ragline talks to Redis (DESIGN.md §3.5).

Four components use Redis: the L2 tier (:mod:`ragline.cache.redis`), the
shared dependency index (:mod:`ragline.cache.deps_redis`), the invalidation
bus (:mod:`ragline.cache.bus`) and the gateway's shared upstream state
(:mod:`ragline.gateway.redis_state`).  All of them get their client from
:func:`make_client`, and the tier and the index guard their calls with a
:class:`RedisConn` (the client, a :class:`~ragline.infra.breaker.CircuitBreaker`
and the failure accounting).  Each component keeps its *own* client, timeouts
and breaker parameters — the tier answers the hot path within 50 ms and opens
after 3 failures, the index allows ≥ 1 s and opens on the first — because
those budgets differ on purpose; what is shared is the code, not the state.
The bus reconnects with its own capped back-off rather than a breaker (a
subscriber must keep trying, and a failed publish is queued, never skipped).

:func:`scan_unlink` is the one prefix delete (``SCAN MATCH`` through redis-py's
``scan_iter`` + ``UNLINK`` in batches) used by the tier and the index.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from ragline.infra.breaker import CircuitBreaker

T = TypeVar("T")

__all__ = ["RedisConn", "RedisUnavailable", "glob_escape", "make_client", "scan_unlink"]


def make_client(
    url: str,
    *,
    timeout_s: float = 0.05,
    connect_timeout_s: float = 1.0,
    max_connections: int = 64,
    socket_timeout_s: float | None = None,
) -> Redis:
    """An asyncio client on a bounded ``BlockingConnectionPool``.

    * a free connection is awaited at most ``timeout_s``;
    * ``socket_timeout_s`` bounds every read (default ``max(timeout_s,
      connect_timeout_s)``: callers that wrap each call in ``asyncio.timeout``
      rely on that deadline instead);
    * client-side retries: exactly one, immediate, and only on ``ConnectionError``:
      after a Redis restart every pooled socket is dead and fails once; the retry
      reconnects instead of turning each stale socket into a miss and a breaker
      failure.  Timeouts are never retried (the breaker is the retry policy).
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=max(timeout_s, 0.001),
        socket_timeout=max(timeout_s, connect_timeout_s) if socket_timeout_s is None else socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=0,
    )
    return Redis.from_pool(pool)


class RedisUnavailable(Exception):
    """Redis could not be used for this call (breaker open, error or timeout)."""


class RedisConn:
    """A client, its circuit breaker and its failure counters.

    :meth:`call` is the plain guarded call (the dependency index uses it):
    refused at once while the breaker is open, a failure is recorded and raised
    as :class:`RedisUnavailable`.  The L2 tier builds its own fail-open call on
    :attr:`breaker`, :meth:`failed` and :meth:`succeeded` (it adds a concurrency
    limit, per-call deadlines and a background probe).
    """

    __slots__ = ("breaker", "client", "errors", "last_error", "owns_client")

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        timeout_s: float = 0.05,
        connect_timeout_s: float = 1.0,
        max_connections: int = 64,
        socket_timeout_s: float | None = None,
        breaker: CircuitBreaker | None = None,
        failure_threshold: int = 3,
        reset_s: float = 1.0,
    ) -> None:
        if (url is None) == (client is None):
            raise ValueError("pass exactly one of url or client")
        self.owns_client = client is None
        if client is None:
            assert url is not None
            client = make_client(
                url,
                timeout_s=timeout_s,
                connect_timeout_s=connect_timeout_s,
                max_connections=max_connections,
                socket_timeout_s=socket_timeout_s,
            )
        self.client: Redis = client
        self.breaker = breaker or CircuitBreaker(failure_threshold, reset_s)
        self.errors = 0
        self.last_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.breaker.closed

    def failed(self, exc: BaseException, context: str = "") -> None:
        """Count a failed or timed-out call and tell the breaker."""
        self.errors += 1
        self.last_error = f"{context}{type(exc).__name__}: {exc}"
        self.breaker.record_failure()

    def succeeded(self) -> None:
        self.breaker.record_success()

    async def call(self, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """``await fn(client)`` behind the breaker; raises :class:`RedisUnavailable` instead of any failure."""
        if not self.breaker.allow():
            raise RedisUnavailable("breaker open")
        try:
            result = await fn(self.client)
        except Exception as exc:  # RedisError, OSError, timeouts, protocol surprises
            self.failed(exc)
            raise RedisUnavailable(str(exc)) from exc
        self.succeeded()
        return result

    async def close(self) -> None:
        """Close the client if this object created it (best effort)."""
        if self.owns_client:
            with contextlib.suppress(Exception):
                await self.client.aclose()


_GLOB_SPECIALS: Final = frozenset("*?[]\\")


def glob_escape(prefix: str) -> str:
    """``prefix`` with the glob characters of ``SCAN MATCH`` escaped."""
    return "".join("\\" + c if c in _GLOB_SPECIALS else c for c in prefix)


async def scan_unlink(client: Redis, prefix: str, *, timeout_s: float | None = None, batch: int = 1000) -> int:
    """UNLINK every key starting with ``prefix``; returns how many were removed.

    Keys come from ``scan_iter(match=prefix*, count=batch)`` and are unlinked
    ``batch`` at a time; each batch (its SCAN round trips and its UNLINK) is
    bounded by ``timeout_s`` (None: only the socket timeouts).  Raises on failure.
    """
    keys = aiter(client.scan_iter(match=glob_escape(prefix) + "*", count=batch))
    removed = 0
    done = False
    while not done:
        found: list[bytes | str] = []
        async with asyncio.timeout(timeout_s):
            while len(found) < batch:
                try:
                    found.append(await anext(keys))
                except StopAsyncIteration:
                    done = True
                    break
            if found:
                removed += int(await client.unlink(*found))
    return removed
