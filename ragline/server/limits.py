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
buckets at ``server.rate_limit_local_share`` of each rate, like the gateway.  Without any limit
configured the middleware is not installed at all.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

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

__all__ = ["ApiLimits", "RequestLimits", "install", "key_id"]

_UNLIMITED: Final = ("/healthz", "/readyz", "/metrics")


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
        self.state: LocalState | RedisState = (
            RedisState(
                url,
                prefix="ragline:api:",
                local_share=s.rate_limit_local_share,
                timeout_s=max(settings.cache.redis_timeout_s, 0.05),
            )
            if url and wanted
            else LocalState()
        )
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
        if self.per_key is not None:
            buckets.append(("k:" + key_id(key) if key is not None else "a:" + client, self.per_key, self.burst))
        if self.per_tenant is not None:
            buckets.append(("t:" + key_id(tenant), self.per_tenant, self.burst))
        verdict = await self.state.take(buckets)
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
        await self.state.aclose()


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
