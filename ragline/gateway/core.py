"""The gateway: route, admit, call, settle — over a group of upstreams, then its fallbacks.

``Gateway.call(group, fn, tokens)`` runs ``fn(upstream)`` (the wire call, supplied by the LLM or
embedder that owns the format) on one upstream of ``group``:

1. **rank** the group's upstreams with the router (untried ones first);
2. **admit**: ask the state for capacity on each in that order (Retry-After floor, breaker,
   in-flight, rpm, tpm); if none has it, wait for the soonest — but only while that fits in
   ``queue_timeout_s``; otherwise the group has no capacity in time;
3. **call** ``fn``; **settle** the outcome (releases the lease, feeds breaker, AIMD and the
   token count);
4. **retry** (tenacity, jittered exponential backoff) on another upstream when the failure is one a
   retry can fix — connection failures, timeouts, 5xx, 429, a misconfigured upstream (401/403/404) —
   never on a bad request (400/413/422), which would fail everywhere;
5. when the group is exhausted, the **fallback** groups in order; when all are, the last error
   (502/504, or 429 / 503 with Retry-After when nothing had capacity).

A successful call returns a :class:`Ticket`: the caller settles it when the work ends (at once for a
completion, at the end for a stream, so a stream holds its in-flight slot while it runs).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from ragline import metrics
from ragline.config import GatewaySettings
from ragline.errors import ConfigError, RaglineError, RateLimited, ServiceUnavailable, UpstreamError, UpstreamTimeout
from ragline.gateway.redis_state import RedisState
from ragline.gateway.router import Router
from ragline.gateway.state import FAILED, LIMITED, NEUTRAL, OK, Limits, LocalState, State, Verdict
from ragline.gateway.upstream import Upstream, safe_url

__all__ = ["Gateway", "Ticket", "classify"]

T = TypeVar("T")
log = logging.getLogger("ragline.gateway")

_BREAKER_CODE: Final = {"closed": 0, "half_open": 1, "open": 2}
_CLIENT_FAULTS: Final = frozenset({400, 413, 415, 422})
"""Statuses that say the request itself is wrong: the same request fails on every upstream."""


def classify(exc: BaseException) -> tuple[str, bool, float | None]:
    """(outcome for the state, may another attempt help, Retry-After) of a failed call."""
    if isinstance(exc, RateLimited):
        return LIMITED, True, exc.retry_after
    if isinstance(exc, UpstreamTimeout):
        return FAILED, True, None
    if isinstance(exc, UpstreamError):
        status = exc.upstream_status
        if status is not None and status in _CLIENT_FAULTS:
            return NEUTRAL, False, None
        return FAILED, True, None
    return NEUTRAL, False, None  # cancelled, or a bug in the caller's fn: not the upstream's doing


class _NoCapacity(Exception):
    def __init__(self, error: RaglineError) -> None:
        super().__init__(error.message)
        self.error = error


class Ticket:
    """An admitted, successful call; ``finish`` settles it (idempotent)."""

    __slots__ = ("_done", "charged", "gateway", "t0", "upstream", "verdict")

    def __init__(self, gateway: Gateway, upstream: Upstream, verdict: Verdict, t0: float, charged: int) -> None:
        self.gateway = gateway
        self.upstream = upstream
        self.verdict = verdict
        self.t0 = t0
        self.charged = charged
        self._done = False

    async def finish(
        self,
        outcome: str = OK,
        used: int | None = None,
        latency_s: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        if self._done:
            return
        self._done = True
        dt = time.perf_counter() - self.t0 if latency_s is None else latency_s
        await self.gateway.settle(self.upstream, self.verdict, outcome, self.charged, used, retry_after, dt)


class Gateway:
    """Upstreams grouped by model name, one router, one state (see the module docs)."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        state: State | None = None,
        kind: str = "llm",
        transport: Any = None,
    ) -> None:
        if not settings.upstreams:
            raise ConfigError(f"{kind}.gateway.upstreams is empty: configure at least one upstream")
        self.settings = settings
        self.kind = kind
        self.upstreams = [Upstream(u, settings.latency_alpha, transport) for u in settings.upstreams]
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ConfigError(f"{kind}.gateway.upstreams: names must be unique (got {', '.join(names)})")
        self.groups: dict[str, list[Upstream]] = {}
        for u in self.upstreams:
            self.groups.setdefault(u.group, []).append(u)
        unknown = [g for g in settings.fallbacks if g not in self.groups]
        if unknown:
            raise ConfigError(f"{kind}.gateway.fallbacks names unknown groups: {', '.join(unknown)}")
        self.limits = {
            u.name: Limits(
                u.settings.rpm,
                u.settings.tpm,
                u.settings.max_in_flight,
                settings.breaker_failures,
                settings.breaker_cooldown_s,
                settings.adaptive,
                settings.headroom,
                u.settings.timeout_s + 5.0,
            )
            for u in self.upstreams
        }
        self.state: State = state or (
            RedisState(settings.redis_url, prefix=f"ragline:gw:{kind}:", local_share=settings.local_share)
            if settings.redis_url
            else LocalState()
        )
        self.router = Router(settings.strategy, settings.latency_buffer)
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        """Breaker transitions and fallbacks, newest last (``/v1/upstreams`` shows them)."""
        self.retries = 0
        self.fallbacks = 0
        self._children = {
            u.name: (
                metrics.UPSTREAM_IN_FLIGHT.labels(u.name),
                metrics.UPSTREAM_LATENCY.labels(u.name),
                {o: metrics.UPSTREAM_REQUESTS.labels(u.name, o) for o in (OK, LIMITED, FAILED, NEUTRAL)},
                metrics.UPSTREAM_TOKENS.labels(u.name),
            )
            for u in self.upstreams
        }

    # ------------------------------------------------------------------ calls
    def chain(self, group: str) -> list[str]:
        """``group`` then the fallback groups, each once."""
        if group not in self.groups:
            raise ConfigError(f"no upstream serves model group {group!r} (configured: {', '.join(self.groups)})")
        return [group, *(g for g in self.settings.fallbacks if g != group)]

    async def call(self, group: str, fn: Callable[[Upstream], Awaitable[T]], tokens: int = 1) -> tuple[T, Ticket]:
        """``fn`` on an admitted upstream of ``group`` or of a fallback (see the module docs)."""
        chain = self.chain(group)
        deadline = time.monotonic() + self.settings.queue_timeout_s
        error: RaglineError | None = None
        starved = False  # the last group had no capacity in time (rather than failing)
        for i, g in enumerate(chain):
            if i:
                self.fallbacks += 1
                metrics.UPSTREAM_FALLBACKS.labels(chain[i - 1], g).inc()
                self._event("fallback", chain[i - 1], to=g, why=error.code if error else "")
            try:
                return await self._call_group(g, fn, tokens, deadline)
            except _NoCapacity as exc:
                error, starved = exc.error, True
            except RaglineError as exc:
                if not classify(exc)[1]:
                    raise
                error, starved = exc, False
        assert error is not None
        if starved:
            metrics.UPSTREAM_REJECTED.labels(group, str(error.status)).inc()
        raise error

    async def _call_group(
        self, group: str, fn: Callable[[Upstream], Awaitable[T]], tokens: int, deadline: float
    ) -> tuple[T, Ticket]:
        ups = self.groups[group]
        tried: list[Upstream] = []
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retries + 1),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(lambda e: isinstance(e, RaglineError) and classify(e)[1]),
            before_sleep=self._count_retry(group),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                up, verdict = await self._admit(ups, tried, tokens, deadline)
                t0 = time.perf_counter()
                up.inflight += 1
                up.started += 1
                up.requests += 1
                self._children[up.name][0].inc()
                try:
                    result = await fn(up)
                except BaseException as exc:
                    outcome, _, retry_after = classify(exc)
                    tried.append(up)
                    await self.settle(up, verdict, outcome, tokens, None, retry_after, time.perf_counter() - t0)
                    raise
                return result, Ticket(self, up, verdict, t0, tokens)
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _count_retry(self, group: str) -> Callable[[RetryCallState], None]:
        child = metrics.UPSTREAM_RETRIES.labels(group)

        def count(_: RetryCallState) -> None:
            self.retries += 1
            child.inc()

        return count

    async def _admit(
        self, ups: list[Upstream], tried: list[Upstream], tokens: int, deadline: float
    ) -> tuple[Upstream, Verdict]:
        """The first upstream with capacity, waiting for it while that fits before ``deadline``."""
        t_start = time.monotonic()
        state = self.state
        while True:
            fresh = [u for u in ups if u not in tried]
            again = [u for u in ups if u in tried]
            ranked: list[Upstream] = []
            for part in (fresh, again):
                if part:
                    counted = self.router.needs_counts and len(part) > 1  # one upstream: nothing to compare
                    counts = await state.in_flight([u.name for u in part]) if counted else None
                    ranked += self.router.rank(part, counts)
            soonest = math.inf
            reasons: list[str] = []
            for up in ranked:
                v = await state.acquire(up.name, self.limits[up.name], tokens, uuid.uuid4().hex)
                if v.ok:
                    waited = time.monotonic() - t_start
                    if waited > 0.0005:
                        metrics.UPSTREAM_QUEUE_SECONDS.observe(waited)
                    return up, v
                metrics.UPSTREAM_REFUSED.labels(up.name, v.reason).inc()
                reasons.append(v.reason)
                soonest = min(soonest, v.wait_s if v.wait_s > 0 else 0.005)
            remaining = deadline - time.monotonic()
            if soonest > remaining:
                raise _NoCapacity(self._no_capacity(ups[0].group, reasons, soonest))
            if all(r in ("busy", "single") for r in reasons):  # waiting for a call to end: wake when one does
                await state.wait_release(min(remaining, 0.05))
            else:
                await asyncio.sleep(soonest)

    def _no_capacity(self, group: str, reasons: list[str], soonest: float) -> RaglineError:
        wait = max(soonest, 0.001) if math.isfinite(soonest) else self.settings.breaker_cooldown_s
        if all(r == "open" for r in reasons):
            return ServiceUnavailable(
                f"every upstream of {group!r} is failing (circuit breakers open); retry after {wait:.1f}s", wait
            )
        why = ", ".join(sorted(set(reasons)))
        msg = (
            f"no upstream of {group!r} had capacity within {self.settings.queue_timeout_s:g}s ({why}); "
            f"retry after {wait:.1f}s"
        )
        return RateLimited(msg, wait, public=msg)  # names no URL: the client may read it

    async def settle(
        self,
        up: Upstream,
        verdict: Verdict,
        outcome: str,
        charged: int,
        used: int | None,
        retry_after: float | None,
        latency_s: float,
    ) -> None:
        """Release the call's lease and record what happened (also used by :class:`Ticket`)."""
        up.inflight -= 1
        gauge, hist, outcomes, tokens = self._children[up.name]
        gauge.dec()
        outcomes[outcome].inc()
        if outcome == OK:
            up.observe(latency_s)
            hist.observe(latency_s)
            if used:
                tokens.inc(used)
        elif outcome != NEUTRAL:
            up.errors += 1
        # shielded: a caller cancelled mid-settle must not leave the lease (or a probe) held
        transition = await asyncio.shield(
            self.state.settle(
                up.name,
                self.limits[up.name],
                verdict.lease,
                outcome,
                charged=charged,
                used=used,
                retry_after=retry_after,
                probe=verdict.probe,
            )
        )
        if transition:
            metrics.UPSTREAM_BREAKER_TRANSITIONS.labels(up.name, transition).inc()
            self._event(transition, up.name)
            log.warning("upstream %s: circuit breaker %s", up.name, transition)

    def _event(self, what: str, name: str, **extra: Any) -> None:
        self.events.append({"t": round(time.time(), 3), "event": what, "upstream": name, **extra})

    # --------------------------------------------------------------- operators
    async def snapshot(self) -> dict[str, Any]:
        """What ``GET /v1/upstreams`` shows; also refreshes the state gauges in ``/metrics``."""
        rows = []
        for up in self.upstreams:
            lim = self.limits[up.name]
            st = await self.state.snapshot(up.name, lim)
            pool = up.pool()
            metrics.UPSTREAM_BREAKER.labels(up.name).set(_BREAKER_CODE[st["breaker"]])
            metrics.UPSTREAM_RATE_FACTOR.labels(up.name).set(st["rate_factor"])
            metrics.UPSTREAM_POOL.labels(up.name, "open").set(pool["open"])
            metrics.UPSTREAM_POOL.labels(up.name, "idle").set(pool["idle"])
            rows.append(
                {
                    "name": up.name,
                    "group": up.group,
                    "model": up.model,
                    "base_url": safe_url(up.base_url),
                    "weight": up.weight,
                    "limits": {"rpm": lim.rpm, "tpm": lim.tpm, "max_in_flight": lim.max_in_flight},
                    "requests": up.requests,
                    "errors": up.errors,
                    "latency_ms": None if up.latency is None else round(up.latency * 1000, 2),
                    "in_flight_here": up.inflight,
                    "pool": pool,
                    **st,
                }
            )
        metrics.UPSTREAM_SHARED_STATE.set(1 if self.state.mode == "redis" else 0)
        return {
            "kind": self.kind,
            "strategy": self.router.strategy,
            "state": self.state.mode,
            "local_admissions": getattr(self.state, "fallbacks", 0),
            "fallbacks": list(self.settings.fallbacks),
            "retries": self.retries,
            "fallbacks_taken": self.fallbacks,
            "upstreams": rows,
            "events": list(self.events)[-50:],
        }

    async def aclose(self) -> None:
        for up in self.upstreams:
            await up.aclose()
        await self.state.aclose()
