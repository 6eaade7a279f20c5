"""The one place where exceptions become HTTP responses.

``RaglineError`` subclasses carry their status (see ragline.errors); request
validation failures become 422 with the offending field named; anything else
is a 500 whose body never includes internals or secrets (the traceback goes to
the log at ERROR level).
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ragline import metrics
from ragline.errors import RaglineError, RateLimited, ServiceUnavailable, UpstreamError

log = logging.getLogger("ragline.server")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    metrics.ERRORS.labels(code).inc()
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def public_message(exc: RaglineError) -> str:
    """The message a client may read: an upstream's URL and reply excerpts stay in the log."""
    return exc.client_message if isinstance(exc, UpstreamError) else exc.message


def describe_validation(exc: RequestValidationError) -> str:
    """One line naming each bad field and what is expected, e.g. "body.k: must be ≤ 100"."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(RaglineError)
    async def _ragline(_: Request, exc: RaglineError) -> Response:
        headers = None
        if isinstance(exc, RateLimited | ServiceUnavailable) and exc.retry_after is not None:
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        message = public_message(exc)
        if isinstance(exc, UpstreamError):
            log.warning("%s: %s", exc.code, exc.message)
        elif exc.status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        return error_response(exc.status, exc.code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_request", describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the server log")
