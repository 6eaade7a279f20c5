"""Early load shedding: a request that would only be refused is refused before routing (DESIGN §3.6).

At 4x capacity three requests in four are refused, so what a refusal costs decides how much CPU is
left for the admitted ones.  Refused inside the pipeline (:meth:`ragline.infra.admission.Admission.slot`),
a request first pays for Starlette's routing, FastAPI's endpoint wrapper, query validation and the
exception handlers — measured at about 1.5x an exact cache hit.  So :class:`RequestGuard` asks
:class:`Shedder` first, with the body it has just read: while admission is :attr:`~Admission.full`
(every slot held, the queue full), an expensive request is answered 503 + ``Retry-After`` from here,
with a pre-built body: one header scan, one small JSON parse, one dict lookup.

Exact cache hits are not shed before misses: a ``/v1/query`` this process has answered before (its
answer key is memoised, :meth:`ragline.cache.layer.CacheLayer.known_answer_key`) goes on to the route,
which serves it from the cache without a slot (if the entry was evicted or invalidated meanwhile, the
route asks for a slot as usual and may be refused there).  What is shed: ``/v1/query`` that is new to
this process, asks with ``history`` or bypasses/refreshes the cache, and ``/v1/search`` (its
retrieval holds a slot, cached or not).  Anything the shedder cannot read (bad JSON, an unknown API
key) goes on to the route, which answers with the right 4xx.  A client's own limit (429) is decided
earlier still, by :class:`~ragline.server.limits.RequestLimits`, before the body is read.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.types import Scope, Send

from ragline import metrics
from ragline.errors import Unauthorized
from ragline.pipeline import AsyncRAG
from ragline.server.auth import Auth

__all__ = ["Shedder"]

_BODY = orjson.dumps(
    {
        "error": {
            "code": "unavailable",
            "message": "the server is at capacity (every admission slot held, the queue full); retry after Retry-After",
        }
    }
)
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())]
_SHED_PATHS = (("POST", "/v1/query"), ("POST", "/v1/search"))


class Shedder:
    """Decides, for a request whose body has been read, whether to refuse it now (see module docs)."""

    def __init__(self, pipeline: AsyncRAG, auth: Auth, default_k: int) -> None:
        self.pipeline = pipeline
        self.auth = auth
        self.default_k = default_k
        self.shed = 0
        self._counted = metrics.ERRORS.labels("unavailable")

    def should_shed(self, scope: Scope, body: bytes) -> bool:
        """True when admission is full and the request would need a slot (cheap when not full: one check)."""
        if not self.pipeline.admission.full:
            return False
        route = (scope["method"], scope["path"])
        if route not in _SHED_PATHS:
            return False
        if route[1] == "/v1/search":
            return True
        try:
            req: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False  # the route says what is wrong with it (400)
        if not isinstance(req, dict) or not isinstance(q := req.get("query"), str):
            return False
        cache = self.pipeline.cache
        if cache is None or req.get("history") or req.get("cache", "default") != "default":
            return True  # no answer cache to hit, or not one this request may use
        authorization = x_api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                x_api_key = value.decode("latin-1")
        try:
            tenant = self.auth.tenant(self.auth.key_from_headers(authorization, x_api_key))
        except Unauthorized:
            return False  # the route answers 401
        k = req.get("k")
        return cache.known_answer_key(tenant, q, self.default_k if k is None else k) is None

    async def refuse(self, send: Send) -> None:
        """503 with ``Retry-After`` (whole seconds, at least 1), the body built once at import."""
        self.shed += 1
        self._counted.inc()
        wait = max(1, math.ceil(self.pipeline.admission.refuse_early() - 1e-6))
        await send(
            {"type": "http.response.start", "status": 503, "headers": [*_HEADERS, (b"retry-after", b"%d" % wait)]}
        )
        await send({"type": "http.response.body", "body": _BODY})
