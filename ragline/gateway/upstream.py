"""One upstream endpoint: its settings, its pooled httpx client and what this process saw of it.

The wire formats (chat completions, embeddings) live with their users (:mod:`ragline.llm.openai`,
:mod:`ragline.embed.remote`); the gateway only routes and admits.  ``Upstream`` is what the router
ranks: local request counts and a latency EWMA (per process: a latency sample is cheap to take and
only steers), while limits, in-flight counts and breaker state live in the shared
:mod:`~ragline.gateway.state`.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ragline.config import UpstreamSettings

__all__ = ["Upstream", "http_client", "parse_retry_after", "retry_after_of", "safe_url"]


def http_client(
    secret: str,
    timeout_s: float,
    connect_timeout_s: float,
    max_connections: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A pooled client that sends JSON and the bearer key (the key lives only in this header)."""
    headers = {"content-type": "application/json", "accept": "application/json"}
    if secret:
        headers["authorization"] = f"Bearer {secret}"
    return httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        transport=transport,
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value, or ``None`` if absent/invalid.

    Accepts delay-seconds (``"2"``, also the non-standard ``"1.5"``) and an
    HTTP date (``"Wed, 21 Oct 2015 07:28:00 GMT"``), which is turned into a
    delay from ``now`` (epoch seconds; default: the current time).  Negative
    results clamp to 0.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses as naive
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        return None
    return max(0.0, seconds)


def retry_after_of(resp: httpx.Response) -> float | None:
    """``retry-after-ms`` (OpenAI's precise form) if present, else ``Retry-After``."""
    ms = resp.headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    return parse_retry_after(resp.headers.get("retry-after"))


def safe_url(url: str) -> str:
    """``url`` without user-info, query or fragment, so it can appear in ids and messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


class Upstream:
    """An endpoint and this process's view of it (``inflight`` here is local; the shared count is
    the state's)."""

    __slots__ = (
        "alpha",
        "base_url",
        "client",
        "errors",
        "group",
        "inflight",
        "latency",
        "model",
        "name",
        "requests",
        "secret",
        "settings",
        "started",
        "weight",
    )

    def __init__(
        self, settings: UpstreamSettings, alpha: float = 0.3, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        self.model = settings.model
        self.group = settings.group or settings.model
        parts = urlsplit(settings.base_url)
        self.name = settings.name or f"{settings.model}@{parts.hostname}:{parts.port or ''}".rstrip(":")
        self.weight = settings.weight
        self.secret = settings.api_key.get_secret_value() if settings.api_key else ""
        self.client = http_client(
            self.secret, settings.timeout_s, settings.connect_timeout_s, settings.max_connections, transport
        )
        self.alpha = alpha
        self.latency: float | None = None
        """EWMA of successful call durations in seconds (None until the first)."""
        self.inflight = 0
        self.started = 0
        """Calls this process sent here (the least-busy tie-break: the least used goes first)."""
        self.requests = 0
        self.errors = 0

    def observe(self, seconds: float) -> None:
        """Fold one successful call's duration into the latency EWMA."""
        prev = self.latency
        self.latency = seconds if prev is None else prev + self.alpha * (seconds - prev)

    def pool(self) -> dict[str, int]:
        """Connections of the httpx pool: open, idle and the configured maximum (best effort:
        httpcore exposes its pool's connections, not a stable stats API)."""
        out = {"max": self.settings.max_connections, "open": 0, "idle": 0}
        transport: Any = getattr(self.client, "_transport", None)
        conns = getattr(getattr(transport, "_pool", None), "connections", None)
        if isinstance(conns, list):
            out["open"] = len(conns)
            out["idle"] = sum(1 for c in conns if getattr(c, "is_idle", lambda: False)())
        return out

    async def aclose(self) -> None:
        await self.client.aclose()
