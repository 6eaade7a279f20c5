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
from ragline.errors import AtCapacity, RaglineError, RateLimited, ServiceUnavailable, UpstreamError

log = logging.getLogger("ragline.server")


def error_type(status: int) -> str:
    """The OpenAI error ``type`` of a status: every error body is also an OpenAI-shaped one."""
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, param: str | None = None
) -> Response:
    """``{"error": {"code", "message", "type", "param"}}``: ragline's shape and OpenAI's at once."""
    metrics.ERRORS.labels(code).inc()
    body = orjson.dumps({"error": {"code": code, "message": message, "type": error_type(status), "param": param}})
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
        elif exc.status >= 500 and not isinstance(exc, AtCapacity):
            log.error("%s: %s", exc.code, exc.message)  # not "at capacity, retry": counted, expected under load
        return error_response(exc.status, exc.code, message, headers, exc.param)

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


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            "required": ["code", "message"],
        }
    },
    "required": ["error"],
}
_DESCRIPTIONS = {
    400: "Invalid input: the message says what to fix",
    401: "An API key is required, or the one given is unknown",
    403: "The API key is not an admin key",
    404: "No such document or job for this tenant",
    413: "A size limit was exceeded (body, document, query, history)",
    415: "The body must be JSON (Content-Type: application/json)",
    422: "The body does not match the schema",
    429: "A rate limit refused the request; see Retry-After",
    502: "The model upstream failed",
    503: "At capacity or not ready; see Retry-After",
    504: "The model upstream did not answer in time",
}


def document_errors(app: FastAPI) -> None:
    """List, per route, the error statuses it can answer with (and their JSON shape) in ``/openapi.json``."""
    from fastapi.routing import APIRoute

    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        path, methods = route.path, route.methods or set()
        codes = {500}
        if path.startswith("/v1/"):
            codes |= {400, 401, 429, 503}
            if methods & {"POST", "PUT", "PATCH"}:
                codes |= {413, 415, 422}
        if path in ("/v1/cache/stats", "/v1/cache/invalidate", "/v1/upstreams"):
            codes |= {403}
        if "{" in path:
            codes |= {404}
        if path in ("/v1/query", "/v1/chat/completions", "/v1/documents", "/v1/jobs"):
            codes |= {502, 504}
        if path == "/readyz":
            codes |= {503}
        for code in sorted(codes):
            route.responses.setdefault(
                code,
                {
                    "description": _DESCRIPTIONS.get(code, "Internal error; details in the server log"),
                    "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                },
            )
