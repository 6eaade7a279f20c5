"""``OpenAIEmbedder``: OpenAI-compatible ``/embeddings`` endpoints through the gateway
(``embedder.provider: openai``).

Every call goes through a :class:`~ragline.gateway.Gateway` (routing, shared limits, retries,
breakers, fallbacks), with the micro-batcher in front (:class:`~ragline.embed.cached.CachedEmbedder`
calls :meth:`aembed`): concurrent queries become one upstream call.  ``embedder.gateway.upstreams``
lists the endpoints; without it one is built from ``embedder.base_url`` / ``model`` / ``api_key``.

Vectors are L2-normalised here (servers differ on whether they normalise).  The width is
``embedder.dim``, or asked once at start-up with one embedding call.  The synchronous :meth:`embed`
(the ``Embedder`` protocol, for callers without an event loop) runs on the loop :meth:`aembed` was
first used on when there is one, else it makes one direct call per upstream in order, outside the
gateway's limits.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import numpy as np
import orjson

from ragline.config import EmbedderSettings, UpstreamSettings
from ragline.errors import ConfigError, RateLimited, UpstreamError, UpstreamTimeout
from ragline.gateway import Gateway
from ragline.gateway.state import OK, State
from ragline.gateway.upstream import Upstream, retry_after_of, safe_url
from ragline.types import Vectors

__all__ = ["OpenAIEmbedder"]


class OpenAIEmbedder:
    def __init__(self, settings: EmbedderSettings, *, state: State | None = None, transport: Any = None) -> None:
        gw = settings.gateway
        if not gw.upstreams:
            if not settings.base_url:
                raise ConfigError("embedder.provider openai needs embedder.base_url or embedder.gateway.upstreams")
            one = UpstreamSettings(base_url=settings.base_url, model=settings.model, api_key=settings.api_key)
            gw = gw.model_copy(update={"upstreams": (one,)})
        self.gateway = Gateway(gw, state=state, kind="embedder", transport=transport)
        groups = list(self.gateway.groups)
        self.group = settings.model if settings.model in self.gateway.groups else groups[0]
        self.id = f"openai:{self.group}"
        self.batch_size = settings.batch_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self.calls = 0
        """Upstream calls made (tests and benchmarks count them)."""
        self.dim = settings.dim or len(self._embed_direct(["dimension probe"])[0])

    async def aembed(self, texts: list[str]) -> Vectors:
        """Vectors of ``texts``: ``batch_size`` texts per upstream call, the calls concurrent."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.current_thread()
        if len(texts) <= self.batch_size:
            return await self._one(texts)
        parts = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(await asyncio.gather(*(self._one(p) for p in parts)))

    async def _one(self, texts: list[str]) -> Vectors:
        payload = orjson.dumps({"model": self.group, "input": texts, "encoding_format": "float"})

        async def call(up: Upstream) -> tuple[Vectors, int | None]:
            body = payload if up.model == self.group else _with_model(payload, up.model)
            self.calls += 1
            try:
                resp = await up.client.post(up.base_url + "/embeddings", content=body)
            except httpx.TimeoutException:
                raise UpstreamTimeout(f"embedding upstream {up.name} did not answer in time") from None
            except httpx.HTTPError as exc:
                raise UpstreamError(f"embedding upstream {up.name} failed: {type(exc).__name__}") from None
            return _parse(resp, up.name, len(texts))

        (vecs, used), ticket = await self.gateway.call(self.group, call, sum(len(t) for t in texts) // 4 + 1)
        await ticket.finish(OK, used)
        return vecs

    def embed(self, texts: list[str]) -> Vectors:
        loop = self._loop
        if loop is not None and loop.is_running() and threading.current_thread() is not self._loop_thread:
            return asyncio.run_coroutine_threadsafe(self.aembed(texts), loop).result()
        return self._embed_direct(texts)

    def _embed_direct(self, texts: list[str]) -> Vectors:
        """One synchronous call per upstream in order until one answers (start-up probe, no loop)."""
        error: Exception | None = None
        for up in self.gateway.upstreams:
            body = orjson.dumps({"model": up.model, "input": texts, "encoding_format": "float"})
            headers = {"content-type": "application/json"}
            if up.secret:
                headers["authorization"] = f"Bearer {up.secret}"
            try:
                resp = httpx.post(
                    up.base_url + "/embeddings", content=body, headers=headers, timeout=up.settings.timeout_s
                )
                return _parse(resp, up.name, len(texts))[0]
            except (httpx.HTTPError, UpstreamError) as exc:
                error = exc
        raise UpstreamError(
            f"no embedding upstream answered ({', '.join(safe_url(u.base_url) for u in self.gateway.upstreams)}): "
            f"{type(error).__name__}"
        )

    async def upstreams(self) -> dict[str, Any]:
        return await self.gateway.snapshot()

    async def aclose(self) -> None:
        await self.gateway.aclose()


def _with_model(payload: bytes, model: str) -> bytes:
    d = orjson.loads(payload)
    d["model"] = model
    return orjson.dumps(d)


def _parse(resp: httpx.Response, name: str, n: int) -> tuple[Vectors, int | None]:
    """Normalised vectors in input order and the reported token usage, or the ragline error."""
    if resp.status_code == 429:
        ra = retry_after_of(resp)
        raise RateLimited(f"embedding upstream {name} rate-limited the request (HTTP 429)", retry_after=ra)
    if resp.status_code >= 300:
        raise UpstreamError(f"embedding upstream {name} returned HTTP {resp.status_code}", resp.status_code)
    try:
        data = orjson.loads(resp.content)
        rows = sorted(data["data"], key=lambda r: r["index"])
        vecs = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
        usage = data.get("usage") or {}
        used = usage.get("total_tokens") if isinstance(usage, dict) else None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(f"embedding upstream {name} sent a malformed response ({type(exc).__name__})") from None
    if vecs.ndim != 2 or len(vecs) != n:
        raise UpstreamError(f"embedding upstream {name} returned {len(vecs)} vectors for {n} inputs")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs /= np.maximum(norms, 1e-12)
    return vecs, int(used) if isinstance(used, int | float) else None
