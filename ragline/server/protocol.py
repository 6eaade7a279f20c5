"""The HTTP protocol ``ragline serve`` runs: uvicorn's httptools protocol with a request read deadline.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has no deadline for reading a
request: a client that opens a connection and sends nothing, or sends its headers a byte at a time
(slowloris), holds the connection — and a file descriptor and a slot — for as long as it likes.
Here a timer runs from the moment a connection opens or a request starts until the request has
been read completely; when it fires, the connection is closed.  And the request head (request line
and headers) is bounded: past ``server.max_header_bytes`` the answer is 431 and the connection is
closed (httptools accepts any size).  Bodies are bounded by
:class:`~ragline.server.middleware.RequestGuard`.  Why hand-written: uvicorn exposes neither a read
deadline nor, for httptools, a head limit.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ReadDeadlineProtocol"]

READ_TIMEOUT_S = float(os.environ.get("RAGLINE_READ_TIMEOUT_S", "10"))
"""``ragline serve`` exports ``server.request_read_timeout_s`` as ``RAGLINE_READ_TIMEOUT_S`` (workers inherit it)."""
MAX_HEAD_BYTES = int(os.environ.get("RAGLINE_MAX_HEADER_BYTES", "16384"))
_BODY_431 = (
    b'{"error":{"code":"headers_too_large","message":"the request line and headers exceed server.max_header_bytes"}}'
)
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_BODY_431)).encode() + b"\r\n\r\n" + _BODY_431
)


class ReadDeadlineProtocol(HttpToolsProtocol):
    _read_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _in_head = True
    read_timeouts = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.transport.write(_TOO_LARGE)
                self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(READ_TIMEOUT_S, self._expire)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _expire(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            ReadDeadlineProtocol.read_timeouts += 1
            self.transport.close()
