"""The audit log of the admin API: who did what, when, and what came of it.

One JSON line per call of an audited route (today ``POST /v1/cache/invalidate``), allowed or refused::

    {"time": "2025-01-01T12:00:00.123456+00:00", "action": "cache.invalidate", "key_id": "3f9a…",
     "client": "10.0.0.7", "params": {"tenant": "acme", "doc_id": null, "key": null, "all": false},
     "status": 200, "result": "ok", "invalidated": 12}

``key_id`` is :func:`key_id` of the key that was sent (never the key; ``null``
without one); ``result`` is ``ok`` or the error code that refused the call (``unauthorized``,
``forbidden``, ``rate_limited``, …).  The file (``server.audit_log``, default ``data_dir/audit.log``)
is opened in append mode for each line, created ``0600``, and each line is written with one
``write`` and ``fsync``-ed, so several workers can share it and a line that was written survives a
crash.  A line is written after the action (it carries the result); if writing fails the action
stands and the failure is logged at ERROR (the server log also gets every line at INFO, on
``ragline.audit``).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from fastapi import Request

from ragline.errors import RaglineError

__all__ = ["AuditLog", "key_id", "record"]

log = logging.getLogger("ragline.audit")


def key_id(key: str) -> str:
    """A key's public name: 16 hex digits of its BLAKE2b hash (what the audit log and Redis see)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8, person=b"ragline-key").hexdigest()


class AuditLog:
    """Appends audit entries to ``path`` (JSON lines), off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    async def write(self, entry: dict[str, Any]) -> None:
        line = orjson.dumps(entry, default=str) + b"\n"
        log.info("%s", line[:-1].decode())
        try:
            await asyncio.to_thread(self._append, line)
        except OSError as exc:
            log.error("audit log %s not written: %s", self.path, exc)

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


@asynccontextmanager
async def record(
    request: Request, action: str, key: str | None, params: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """Audit one call: yields the entry (the route adds its results to it), written when the block
    ends, with ``status``/``result`` from the error that ended it, if any (which is re-raised)."""
    client = request.client
    entry: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(),
        "action": action,
        "key_id": None if key is None else key_id(key),
        "client": client.host if client else None,
        "params": params,
        "status": 200,
        "result": "ok",
    }
    try:
        yield entry
    except RaglineError as exc:
        entry["status"], entry["result"] = exc.status, exc.code
        raise
    except asyncio.CancelledError:
        entry["status"], entry["result"] = 499, "cancelled"  # the client left
        raise
    except BaseException:
        entry["status"], entry["result"] = 500, "error"
        raise
    finally:
        audit: AuditLog = request.app.state.audit
        await audit.write(entry)
