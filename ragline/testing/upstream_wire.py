"""Raw-ASGI plumbing of the fake upstream: JSON bodies, OpenAI-style errors, SSE chunks and sleeps that
end when the client disconnects (split from ``fake_upstream`` to keep each module small)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

__all__ = [
    "JSON_HEADERS",
    "SSE_HEADERS",
    "ASGIMessage",
    "BadRequest",
    "Disconnect",
    "Receive",
    "Scope",
    "Send",
    "error_body",
    "parse_json",
    "read_body",
    "respond",
    "send_body",
]

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class BadRequest(Exception):
    """A malformed request body: answered with an OpenAI-style 400."""


def error_body(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


async def read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(parts)


class Disconnect:
    """Sleeps that end early when the client disconnects.

    A hung or slow reply must not outlive its client (a timed-out benchmark
    would otherwise pile up sleeping handlers and delay shutdown).  The
    watcher task is created on the first sleep only, so unpaced replies pay
    nothing for it.
    """

    __slots__ = ("_event", "_receive", "_task")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        assert self._event is not None
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._event.set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep ``seconds``; ``False`` as soon as the client has disconnected."""
        if self._event is None:
            self._event = asyncio.Event()
            self._task = asyncio.create_task(self._watch())
        if self._event.is_set():
            return False
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def send_body(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def respond(send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    hdrs = [*JSON_HEADERS, (b"content-length", str(len(data)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})
