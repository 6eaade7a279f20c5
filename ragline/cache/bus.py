"""Cross-instance cache invalidation over Redis pub/sub (DESIGN.md §3.1).

The instance that invalidates (an ingest changed a document) deletes the
entries from the shared tier itself and publishes an event; every other
instance's subscriber drops the same keys (or a whole prefix) from its local
tiers (L1, and L3 when that disk is not shared).

Pub/sub is fire-and-forget: a subscriber that is disconnected misses events.
So the subscriber calls ``on_resync`` whenever it (re)subscribes after a gap,
and the cache then drops its local copies (``TieredCache._on_resync``).  A
publish that fails is queued (bounded) and retried in the background; when the
queue overflows it collapses into a single "drop everything" event.

Delivery is at-least-once from the publisher's side (a PUBLISH that timed out
may still have reached Redis before the retry): dropping a key twice is
harmless, so no de-duplication is attempted.

Everything is bounded: message size, keys per message, every Redis call
(``asyncio.timeout``), the reconnect back-off, the callback's run time.  The
subscriber task never lets an exception escape; ``stop()`` ends it.

Wire format (orjson): ``{"o": origin, "k": [keys...]}`` or ``{"o": origin, "p": prefix}`` (drop), or
``{"o": origin, "a": [keys...], "f": tag}`` (announce: answers other instances may add to their semantic
index if their settings ``tag`` is the same).

Clients come from :func:`ragline.infra.redis_conn.make_client`, like the L2 tier's
and the dependency index's; the bus retries with its own capped back-off instead
of a circuit breaker (a subscriber must keep trying, a failed publish is queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ragline.cache.keys import KEY_ROOT
from ragline.infra.redis_conn import make_client

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = ["InvalidationBus", "OnInvalidate", "OnResync"]

OnInvalidate = Callable[[list[str] | None, str | None], Awaitable[None]]
"""``await cb(keys, prefix)``: exactly one of the two is set."""
OnResync = Callable[[], Awaitable[None]]
OnAdded = Callable[[list[str], str], Awaitable[None]]
"""``await cb(keys, tag)``: another instance cached these answers (for the semantic index); ``tag``
names the settings they were computed under."""


class InvalidationBus:
    """Publish and receive invalidation events on one Redis channel."""

    def __init__(
        self,
        redis_url: str,
        channel: str = "ragline:invalidate",
        *,
        timeout_s: float = 1.0,
        connect_timeout_s: float = 1.0,
        ping_interval_s: float = 5.0,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 5.0,
        callback_timeout_s: float = 5.0,
        max_keys_per_message: int = 1000,
        max_message_bytes: int = 1_000_000,
        max_pending: int = 1000,
    ) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.ping_interval_s = ping_interval_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.callback_timeout_s = callback_timeout_s
        self.max_keys_per_message = max_keys_per_message
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.instance_id = secrets.token_hex(8)
        self._publisher: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._pending: deque[bytes] = deque()
        self._on_invalidate: OnInvalidate | None = None
        self._on_resync: OnResync | None = None
        self._on_added: OnAdded | None = None
        self._stopping = False
        self.connected = False
        # counters
        self.published = 0
        self.publish_failures = 0
        self.received = 0
        self.ignored = 0
        self.errors = 0
        self.reconnects = 0
        self.resyncs = 0
        self.last_error: str | None = None

    # -- clients -------------------------------------------------------------------------

    def _client(self, max_connections: int) -> Redis:
        return make_client(
            self.redis_url,
            timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            max_connections=max_connections,
        )

    # -- publishing ----------------------------------------------------------------------

    def _encode(self, keys: Sequence[str] | None, prefix: str | None) -> list[bytes]:
        if prefix is not None:
            return [orjson.dumps({"o": self.instance_id, "p": prefix})]
        assert keys is not None
        step = self.max_keys_per_message
        return [orjson.dumps({"o": self.instance_id, "k": list(keys[i : i + step])}) for i in range(0, len(keys), step)]

    async def publish(self, keys: Sequence[str] | None = None, prefix: str | None = None) -> bool:
        """Tell every instance to drop ``keys`` or everything under ``prefix`` locally.

        Returns True if every message reached Redis now; otherwise they are queued
        and retried in the background (never raises)."""
        if (keys is None) == (prefix is None):
            raise ValueError("pass exactly one of keys or prefix")
        if keys is not None and not keys:
            return True
        messages = self._encode(keys, prefix)
        ok = True
        for i, m in enumerate(messages):
            if self._pending or not await self._send(m):
                for rest in messages[i:]:
                    self._enqueue(rest)
                ok = False
                break
        return ok

    async def announce(self, keys: Sequence[str], tag: str) -> None:
        """Tell the other instances these answers were cached (best effort: a lost announcement only
        costs a semantic hit elsewhere, never a wrong or stale one)."""
        if keys:
            msg = {"o": self.instance_id, "a": list(keys[: self.max_keys_per_message]), "f": tag}
            await self._send(orjson.dumps(msg))

    async def _send(self, message: bytes) -> bool:
        if self._publisher is None:
            self._publisher = self._client(max_connections=4)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._publisher.publish(self.channel, message)
        except Exception as exc:
            self.publish_failures += 1
            self.last_error = f"publish: {type(exc).__name__}: {exc}"
            return False
        self.published += 1
        return True

    def _enqueue(self, message: bytes) -> None:
        if len(self._pending) >= self.max_pending:
            # too much missed: one event that drops every ragline key everywhere
            self._pending.clear()
            message = orjson.dumps({"o": self.instance_id, "p": KEY_ROOT})
        self._pending.append(message)
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(self._retry_pending(), name="ragline-bus-retry")

    async def _retry_pending(self) -> None:
        delay = self.backoff_min_s
        while self._pending and not self._stopping:
            if await self._send(self._pending[0]):
                self._pending.popleft()
                delay = self.backoff_min_s
                continue
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.backoff_max_s)

    @property
    def pending(self) -> int:
        """Messages waiting to be re-published."""
        return len(self._pending)

    # -- subscribing ---------------------------------------------------------------------

    def start(
        self, on_invalidate: OnInvalidate, on_resync: OnResync | None = None, on_added: OnAdded | None = None
    ) -> None:
        """Start the subscriber task (idempotent).  Must be called inside the running loop."""
        self._on_invalidate = on_invalidate
        self._on_resync = on_resync
        self._on_added = on_added
        self._stopping = False
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._subscribe_loop(), name="ragline-bus-subscriber")

    async def wait_connected(self, timeout: float = 5.0) -> bool:
        """Wait until the subscription is live (tests and start-up ordering)."""
        deadline = time.monotonic() + timeout
        while not self.connected:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _subscribe_loop(self) -> None:
        backoff = self.backoff_min_s
        need_resync = False
        while not self._stopping:
            client: Redis | None = None
            pubsub: PubSub | None = None
            try:
                client = self._client(max_connections=1)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                async with asyncio.timeout(self.connect_timeout_s + self.timeout_s):
                    await pubsub.subscribe(self.channel)
                self.connected = True
                backoff = self.backoff_min_s
                if need_resync:
                    await self._resync()
                    need_resync = False
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                self.last_error = f"subscribe: {type(exc).__name__}: {exc}"
            finally:
                self.connected = False
                await self._close_quietly(pubsub, client)
            if self._stopping:
                break
            need_resync = True
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.backoff_max_s)

    async def _read(self, pubsub: PubSub) -> None:
        """Read until the connection fails or goes silent (no pong within 3 ping intervals)."""
        now = time.monotonic()
        last_seen = now
        last_ping = now
        poll = min(1.0, self.ping_interval_s)
        while not self._stopping:
            async with asyncio.timeout(poll + self.timeout_s):
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll)
            now = time.monotonic()
            if msg is not None:
                last_seen = now
                if msg.get("type") == "message":
                    await self._handle(msg.get("data"))
            if now - last_ping >= self.ping_interval_s:
                async with asyncio.timeout(self.timeout_s):
                    await pubsub.ping()
                last_ping = now
            if now - last_seen > 3 * self.ping_interval_s:
                raise ConnectionError("invalidation channel silent: no pong")

    async def _handle(self, data: Any) -> None:
        if not isinstance(data, bytes) or len(data) > self.max_message_bytes:
            self.ignored += 1
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.ignored += 1
            return
        if not isinstance(msg, dict):
            self.ignored += 1
            return
        if msg.get("o") == self.instance_id:
            return  # our own event: already applied locally
        keys = msg.get("k")
        prefix = msg.get("p")
        added, tag = msg.get("a"), msg.get("f")
        if isinstance(added, list) and all(isinstance(k, str) and k.startswith(KEY_ROOT) for k in added):
            if self._on_added is not None and isinstance(tag, str):
                with contextlib.suppress(Exception):  # a missed announcement costs a semantic hit, no more
                    async with asyncio.timeout(self.callback_timeout_s):
                        await self._on_added(added[: self.max_keys_per_message], tag)
            return
        if isinstance(prefix, str) and prefix.startswith(KEY_ROOT):
            args: tuple[list[str] | None, str | None] = (None, prefix)
        elif isinstance(keys, list) and all(isinstance(k, str) for k in keys):
            args = (keys[: self.max_keys_per_message], None)
        else:
            self.ignored += 1
            return
        self.received += 1
        cb = self._on_invalidate
        if cb is None:
            return
        try:
            async with asyncio.timeout(self.callback_timeout_s):
                await cb(*args)
        except Exception as exc:
            # the local drop failed: local copies can no longer be trusted
            self.errors += 1
            self.last_error = f"callback: {type(exc).__name__}: {exc}"
            await self._resync()

    async def _resync(self) -> None:
        self.resyncs += 1
        cb = self._on_resync
        if cb is None:
            return
        try:
            async with asyncio.timeout(self.callback_timeout_s):
                await cb()
        except Exception as exc:
            self.errors += 1
            self.last_error = f"resync: {type(exc).__name__}: {exc}"

    @staticmethod
    async def _close_quietly(pubsub: PubSub | None, client: Redis | None) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                if pubsub is not None:
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis 8.2
                if client is not None:
                    await client.aclose()

    async def stop(self) -> None:
        """Stop the subscriber and the retry task, close connections (bounded)."""
        self._stopping = True
        for task in (self._task, self._retry_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._task = self._retry_task = None
        if self._publisher is not None:
            await self._close_quietly(None, self._publisher)
            self._publisher = None

    def stats(self) -> dict[str, float]:
        return {
            "connected": 1 if self.connected else 0,
            "published": self.published,
            "publish_failures": self.publish_failures,
            "pending": len(self._pending),
            "received": self.received,
            "ignored": self.ignored,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "resyncs": self.resyncs,
        }
