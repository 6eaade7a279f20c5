"""Per-key and per-tenant request limits on the API, the admin invalidation limit and the metrics token.

Every ``/v1/`` request is charged to two buckets of the gateway's admission state
(:meth:`ragline.gateway.state.LocalState.take_now`: GCRA with a burst, no slow start, no leases):

* **per key** (``server.rate_limit_per_key_rpm``): the bucket of its API key, named by a hash of it
  (:func:`key_id`; the raw key is never stored, logged or sent to Redis).  A request without a key
  (``require_api_key`` off) is charged to its client address instead;
* **per tenant** (``server.rate_limit_per_tenant_rpm``): the bucket of the key's tenant, so a tenant
  with several keys shares one budget; other tenants are unaffected.

Both are checked and charged in one step (a request one bucket refuses costs the other nothing);
``server.rate_limit_burst`` requests may come back to back.  A refused request gets 429 with
``Retry-After`` (whole seconds, rounded up: the earliest time it can succeed) and counts in
``ragline_rate_limited_total{scope}`` (scope key, tenant or invalidate; no tenant names).
``/healthz``, ``/readyz``, ``/metrics`` and the docs are never limited, and a request whose key
is unknown is left to the route (401) without touching a bucket.

With ``cache.redis_url`` the buckets live in Redis (one Lua call per request, on Redis' clock) and
hold across every worker and instance; when Redis is unreachable each process fails open to its own
buckets at ``server.rate_limit_local_share`` of each rate, like the gateway.  That call costs more
than an exact cache hit itself (``benchmarks/api_limits_overhead.py``), so ``server.rate_limit_sync_s``
> 0 trades exactness for it: each process admits from its own view of the buckets and exchanges its
counts with Redis in the background (:class:`SyncedBuckets`).  Without any limit configured the
middleware is not installed at all.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ragline import metrics
from ragline.config import Settings
from ragline.errors import RateLimited, Unauthorized
from ragline.gateway.redis_state import RedisState
from ragline.gateway.state import LocalState, Verdict
from ragline.server import audit, errors
from ragline.server.audit import key_id
from ragline.server.auth import Auth

__all__ = ["ApiLimits", "RequestLimits", "SyncedBuckets", "install", "key_id"]

log = logging.getLogger("ragline.server.limits")


def retry_after(wait_s: float) -> int:
    """Whole seconds until the request can succeed (rounded up, at least 1)."""
    return max(1, math.ceil(wait_s - 1e-6))


class ApiLimits:
    """The request limits of one app: which buckets a request is charged to, and where they live."""

    def __init__(self, settings: Settings, auth: Auth) -> None:
        s = settings.server
        self.auth = auth
        self.per_key = s.rate_limit_per_key_rpm
        self.per_tenant = s.rate_limit_per_tenant_rpm
        self.burst = s.rate_limit_burst
        self.invalidate_rpm = s.invalidate_rpm
        self.invalidate_burst = s.invalidate_burst
        url = settings.cache.redis_url
        wanted = self.per_key is not None or self.per_tenant is not None or self.invalidate_rpm is not None
        self.state: LocalState | RedisState = (  # the exact, shared buckets (invalidation always uses them)
            RedisState(
                url,
                prefix="ragline:api:",
                local_share=s.rate_limit_local_share,
                timeout_s=max(settings.cache.redis_timeout_s, 0.05),
            )
            if url and wanted
            else LocalState()
        )
        self.buckets: LocalState | RedisState | SyncedBuckets = self.state
        """Where API requests are charged: ``state``, or with ``rate_limit_sync_s`` > 0 this process'
        view of it, synchronised in the background."""
        if isinstance(self.state, RedisState) and s.rate_limit_sync_s > 0:
            self.buckets = SyncedBuckets(self.state, s.rate_limit_sync_s, s.rate_limit_local_share)
        self._ids: dict[str, str] = {}
        """key or tenant → bucket name; bounded: only keys the auth accepted and their tenants reach it."""
        token = s.metrics_token
        self._metrics_token = None if token is None else token.get_secret_value().encode("utf-8", "surrogateescape")
        self._refused = {scope: metrics.RATE_LIMITED.labels(scope) for scope in ("key", "tenant", "invalidate")}

    @property
    def enabled(self) -> bool:
        """Whether API requests are limited at all (else the middleware is not installed)."""
        return self.per_key is not None or self.per_tenant is not None

    async def check(self, key: str | None, tenant: str, client: str) -> tuple[Verdict, str]:
        """Charge one request of ``key`` (``None``: the anonymous ``client``) in ``tenant``; returns the
        verdict and, when refused, the scope that refused it ("key" or "tenant")."""
        buckets: list[tuple[str, float, int]] = []
        ids = self._ids
        if self.per_key is not None:
            if key is None:
                name = "a:" + client
            elif (name := ids.get(key, "")) == "":
                name = ids[key] = "k:" + key_id(key)
            buckets.append((name, self.per_key, self.burst))
        if self.per_tenant is not None:
            tkey = "\0" + tenant  # never an API key's entry
            if (name := ids.get(tkey, "")) == "":
                name = ids[tkey] = "t:" + key_id(tenant)
            buckets.append((name, self.per_tenant, self.burst))
        verdict = await self.buckets.take(buckets)
        if verdict.ok:
            return verdict, ""
        scope = "tenant" if verdict.reason.startswith("t:") else "key"
        self._refused[scope].inc()
        return verdict, scope

    async def admit_invalidation(self, key: str) -> None:
        """Charge one invalidation to the admin ``key``; raises :class:`RateLimited` past ``invalidate_rpm``."""
        if self.invalidate_rpm is None:
            return
        verdict = await self.state.take([("i:" + key_id(key), self.invalidate_rpm, self.invalidate_burst)])
        if not verdict.ok:
            self._refused["invalidate"].inc()
            wait = retry_after(verdict.wait_s)
            msg = (
                f"at most {self.invalidate_rpm} cache invalidations a minute per admin key "
                f"(server.invalidate_rpm); retry after {wait}s"
            )
            raise RateLimited(msg, wait, public=msg)

    def check_metrics_token(self, authorization: str | None) -> None:
        """With ``server.metrics_token`` set, ``/metrics`` needs ``Authorization: Bearer <token>`` (401 otherwise)."""
        if self._metrics_token is None:
            return
        sent = authorization[7:].strip() if authorization and authorization[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), self._metrics_token):
            raise Unauthorized("/metrics needs 'Authorization: Bearer <server.metrics_token>'")

    async def aclose(self) -> None:
        if isinstance(self.buckets, SyncedBuckets):
            await self.buckets.aclose()
        await self.state.aclose()


class SyncedBuckets:
    """Request buckets admitted in process and shared through Redis every ``sync_s`` seconds.

    Each request is admitted from this process' *view* of the shared buckets (a :class:`LocalState`,
    no Redis call on the request path); a background task sends what it admitted since the last
    exchange to Redis in one call (:meth:`RedisState.charge`, all touched buckets at once) and raises
    each bucket of the view to the debt Redis reports, which includes what the other processes
    admitted.  The view never owes less than this process charged, so a refusal is always right;
    an admission may not be: between two exchanges a process does not see the others' requests, so
    with N processes a client can get up to about N × (burst + rpm × sync_s / 60) requests more than
    its limit before the views catch up, once (the shared debt then holds everyone back).  A bucket
    this process has not exchanged for ``stale_s`` is read from Redis first (one call), so a client
    that moves to another instance finds its debt there.  While Redis is unusable the view alone
    decides, at ``local_share`` of each rate.
    """

    def __init__(self, shared: RedisState, sync_s: float, local_share: float = 1.0) -> None:
        self.shared = shared
        self.view = LocalState()
        self.sync_s = sync_s
        self.local_share = local_share
        self._pending: dict[str, list[float]] = {}
        """bucket → [rpm, requests admitted since the last exchange] (0: refused only; read its debt)."""
        self._since = 0.0
        """When (monotonic s) the first request of ``_pending`` was admitted."""
        self._fresh: dict[str, float] = {}
        """bucket → when (monotonic s) the view last learnt its debt from Redis."""
        self.stale_s = max(1.0, 10 * sync_s)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.syncs = 0
        self.failed_syncs = 0

    @property
    def mode(self) -> str:
        return self.shared.mode

    async def take(self, buckets: list[tuple[str, float, int]]) -> Verdict:
        fresh = self._fresh
        now = time.monotonic()
        stale = [b for b in buckets if fresh.get(b[0], -1e18) < now - self.stale_s]
        if stale and self.shared.mode == "redis":
            await self._learn([(name, rpm, 0) for name, rpm, _ in stale], now)
        if self.shared.mode != "redis" and self.local_share < 1.0:
            share = self.local_share
            verdict = self.view.take_now([(n, rpm * share, burst) for n, rpm, burst in buckets])
        else:
            verdict = self.view.take_now(buckets)
        pending = self._pending
        if not pending:
            self._since = now
        add = 1 if verdict.ok else 0
        for name, rpm, _ in buckets:
            entry = pending.get(name)
            if entry is None:
                pending[name] = [rpm, add]
            else:
                entry[1] += add
        if self._wake is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ragline-api-limits-sync")
        self._wake.set()
        return verdict

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.sync_s)  # gather one interval's requests into one call
            try:
                await self.sync()
            except Exception:  # never let the exchange die: the view keeps deciding meanwhile
                log.exception("request-limit sync failed")

    async def sync(self) -> None:
        """One exchange with Redis (the background task calls it every ``sync_s`` while requests come)."""
        sent, self._pending = self._pending, {}
        if not sent:
            return
        now = time.monotonic()
        if await self._learn([(name, rpm, int(n)) for name, (rpm, n) in sent.items()], now, now - self._since):
            self.syncs += 1
        else:
            self.failed_syncs += 1  # Redis is away: what was admitted meanwhile stays local

    async def _learn(self, charges: list[tuple[str, float, int]], now: float, age_s: float = 0.0) -> bool:
        """Send ``charges`` (admitted over the last ``age_s``) to Redis; raise the view to the debts it reports."""
        debts = await self.shared.charge(charges, age_s)
        if debts is None:
            return False
        since = self._pending  # admitted while the exchange was in flight: not in Redis' answer yet
        fresh = self._fresh
        if len(fresh) > 65_536:
            for old in [n for n, t in fresh.items() if t < now - self.stale_s]:
                del fresh[old]
        for (name, rpm, _), debt in zip(charges, debts, strict=True):
            later = since.get(name)
            self.view.raise_debt(name, debt + (later[1] * 60.0 / rpm if later else 0.0))
            fresh[name] = now
        return True

    async def aclose(self) -> None:
        """Stop the exchange, after sending what is still pending."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.sync()
        except Exception:
            log.exception("request-limit sync failed")


class RequestLimits:
    """Pure-ASGI middleware applying :class:`ApiLimits` to every ``/v1/`` request before its body is read.

    On the exact-hit hot path it costs one header scan, one or two BLAKE2b hashes and the bucket
    step (in-process, or one Redis round trip)."""

    def __init__(self, app: ASGIApp, limits: ApiLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        authorization = x_api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                x_api_key = value.decode("latin-1")
        auth = self.limits.auth
        key = auth.key_from_headers(authorization, x_api_key)
        try:
            tenant = auth.tenant(key)
        except Unauthorized:  # the route answers 401; an unknown key gets no bucket
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        verdict, which = await self.limits.check(key, tenant, client[0] if client else "-")
        if verdict.ok:
            await self.app(scope, receive, send)
            return
        wait = retry_after(verdict.wait_s)
        rpm = self.limits.per_key if which == "key" else self.limits.per_tenant
        who = {"tenant": "this tenant", "key": "this API key" if key is not None else "this client"}[which]
        setting = f"server.rate_limit_per_{which}_rpm"
        await errors.error_response(
            429,
            "rate_limited",
            f"{who} may send {rpm} requests a minute ({setting}); retry after {wait}s",
            {"Retry-After": str(wait)},
        )(scope, receive, send)


def of(request: Request) -> ApiLimits:
    """The limits :func:`install` put on the request's app."""
    limits: ApiLimits = request.app.state.api_limits
    return limits


def install(app: FastAPI, settings: Settings) -> None:
    """Attach the limits (and the audit log) to ``app``; add the middleware when a request limit is set.

    Call it after the middleware it should run outside of (so a limited request is refused before
    its body is read).  The Redis client, if any, is closed when the app's lifespan ends."""
    limits = ApiLimits(settings, Auth(settings.server))
    app.state.api_limits = limits
    app.state.audit = audit.AuditLog(settings.server.audit_log or settings.data_dir / "audit.log")
    if limits.enabled:
        app.add_middleware(RequestLimits, limits=limits)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        try:
            async with inner(a) as state:
                yield state
        finally:
            await limits.aclose()

    app.router.lifespan_context = lifespan
