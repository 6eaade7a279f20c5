"""The exact-hit fast path: ``POST /v1/query`` answered from L1 in pure ASGI, everything else by FastAPI.

Measured with wrk (docs/NOTES.md, "HTTP hot path"): an exact hit through FastAPI's router, its
request/response objects, dependency solving and exception wrappers cost more CPU than the hit
itself, which is a dict lookup.  This middleware sits inside the per-key limits and the timer (a
hit is still charged, timed and counted under the route ``/v1/query``) and outside the request
guard, and serves a request itself only when all of this holds:

* the body is at most the route's own limit, JSON by its content type, and a JSON object whose
  ``query`` is a string, with no field but ``query``, an integer ``k``, ``cache`` (absent or
  ``"default"``), a boolean ``timings``, an empty ``history`` and a false ``stream``;
* the key (``Authorization: Bearer`` or ``X-API-Key``, the first of each, as the route reads them)
  names a tenant;
* :func:`ragline.pipeline.exact_l1` returns the stored answer.

Any other request — a miss, a bad body, an unknown key, every error — goes on, body replayed, to
the guard and the FastAPI route, which answer exactly as before.  So the answers are the same
bytes, with ``cache`` and ``timings`` spliced in the same way; a hit awaits nothing, so there is no
work to cancel when its client goes (the guard's watcher is not needed).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragline import metrics
from ragline.codec import CACHE_L1, response_bytes
from ragline.errors import Unauthorized
from ragline.pipeline import AsyncRAG, exact_l1
from ragline.server.auth import Auth
from ragline.server.middleware import _is_json

__all__ = ["ExactHitPath"]

_JSON_HEADER = (b"content-type", b"application/json")
_PLAIN = frozenset({"query", "k", "cache", "timings", "history", "stream"})
"""The only fields a body served here may have (``history`` only empty, ``stream`` only false); any other
(``conversation_id``, ``profile``, a misspelt one) needs the route, which validates it or answers differently."""


class ExactHitPath:
    """Pure-ASGI middleware answering ``POST /v1/query`` exact L1 hits (see the module docstring)."""

    def __init__(self, app: ASGIApp, pipeline: AsyncRAG, auth: Auth, max_body: int, route: Any = None) -> None:
        self.app = app
        self.pipeline = pipeline
        self.auth = auth
        self.max_body = max_body
        """The route's own body limit (smaller than the guard's): past it the route answers 413."""
        self.route = route
        """The FastAPI route of ``/v1/query``, put in the scope so the timer labels a hit by its path."""
        self._exact = metrics.ANSWERS.labels("exact")
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/query" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        authorization = x_api_key = None
        ctype = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_body:
                    await self.app(scope, receive, send)  # the guard or the route answers
                    return
            elif name == b"content-type":
                ctype = value
            elif name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name == b"x-api-key" and x_api_key is None:
                x_api_key = value.decode("latin-1")
        msg = await receive()
        if msg["type"] != "http.request":  # the client left before sending its body
            return
        raw: bytes = msg.get("body", b"")
        more = bool(msg.get("more_body", False))
        if more:
            chunks = [raw]
            size = len(raw)
            while more and size <= self.max_body:
                msg = await receive()
                if msg["type"] != "http.request":
                    return
                part = msg.get("body", b"")
                chunks.append(part)
                size += len(part)
                more = bool(msg.get("more_body", False))
            raw = b"".join(chunks)
        body = None if more or len(raw) > self.max_body else self._answer(raw, ctype, authorization, x_api_key)
        if body is None:
            await self.app(scope, _replay({"type": "http.request", "body": raw, "more_body": more}, receive), send)
            return
        if self.route is not None:
            scope["route"] = self.route
        self.served += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), _JSON_HEADER],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _answer(self, raw: bytes, ctype: bytes, authorization: str | None, x_api_key: str | None) -> bytes | None:
        """The response body of an exact L1 hit, or ``None``: let the route answer."""
        if not _is_json(ctype):
            return None
        auth = self.auth
        try:
            tenant = auth.tenant(auth.key_from_headers(authorization, x_api_key))
            d = orjson.loads(raw)
        except (Unauthorized, orjson.JSONDecodeError):
            return None
        if (
            type(d) is not dict
            or not _PLAIN.issuperset(d)  # conversation_id, history, stream, profile, unknown: the route decides
            or type(q := d.get("query")) is not str
            or d.get("cache", "default") != "default"
            or ((k := d.get("k")) is not None and type(k) is not int)  # k: true or "5" is the route's 400
            or type(d.get("timings", True)) is not bool
            or d.get("history", []) != []
            or d.get("stream", False) is not False
        ):
            return None
        t0 = time.perf_counter()
        stored = exact_l1(self.pipeline, q, k, tenant)
        if stored is None:
            return None
        self._exact.inc()
        if d.get("timings", True) is False:
            return response_bytes(stored, CACHE_L1, None)
        return response_bytes(stored, CACHE_L1, {"total": round((time.perf_counter() - t0) * 1000, 3)})


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` with the message already read given back first."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return first
        return await receive()

    return replay
