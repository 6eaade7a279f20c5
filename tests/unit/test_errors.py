"""The exception tree maps to HTTP statuses in one place, with JSON bodies."""

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ragline import errors
from ragline.server.errors import install


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.InvalidInput("x"), 400),
        (errors.PayloadTooLarge("x"), 413),
        (errors.UnsupportedFile("x"), 415),
        (errors.NotFound("x"), 404),
        (errors.Unauthorized("x"), 401),
        (errors.Forbidden("x"), 403),
        (errors.UpstreamError("x"), 502),
        (errors.UpstreamTimeout("x"), 504),
        (errors.RateLimited("x", 3), 429),
        (errors.ServiceUnavailable("x"), 503),
        (errors.StoreError("x"), 500),
    ],
)
def test_status_mapping(exc: errors.RaglineError, status: int) -> None:
    app = FastAPI()
    install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == status
    body = orjson.loads(r.content)
    assert body["error"]["code"] == exc.code
    if isinstance(exc, errors.UpstreamError):  # the upstream's details stay in the log
        assert body["error"]["message"] == exc.client_message and "x" not in body["error"]["message"]
    else:
        assert body["error"]["message"] == "x"
    if isinstance(exc, errors.RateLimited):
        assert r.headers["retry-after"] == "3"


def test_unexpected_error_hides_internals() -> None:
    app = FastAPI()
    install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("password=hunter2")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500
    assert b"hunter2" not in r.content


def test_every_error_is_a_ragline_error() -> None:
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            assert issubclass(obj, errors.RaglineError)


def test_upstream_errors_never_show_the_upstream_url_or_reply() -> None:
    app = FastAPI()
    install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise errors.UpstreamError("LLM upstream http://10.0.0.5:8000/v1 returned HTTP 500: secret stack", 500)

    body = TestClient(app, raise_server_exceptions=False).get("/boom").json()
    assert body["error"]["message"] == "the model upstream failed (HTTP 500); the server log has the details"
