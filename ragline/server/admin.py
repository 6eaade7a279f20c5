"""Admin routes for operations: hot reload (:mod:`ragline.server.reload`).

``POST /v1/admin/reload`` (admin key; audited) re-reads the configuration and plugins and swaps in a
new pipeline.  In one process it answers 200 with the reload report (what changed, what needs a
restart, the fingerprints, build and swap times).  Under ``ragline serve --workers N`` it checks the
configuration first (invalid: 400, nothing happens), then signals the master, which forwards SIGHUP
to every worker (each reloads itself, and logs the outcome): 202.  ``GET /v1/admin/reload``: this
worker's generation and its last reload report.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import orjson
from fastapi import FastAPI, Header, Request
from starlette.responses import Response

from ragline.server import audit
from ragline.server.auth import Auth
from ragline.server.reload import Live, supervisor_pid


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def install(app: FastAPI, live: Live, auth: Auth) -> None:
    @app.post("/v1/admin/reload", summary="Reload configuration and plugins without a restart (admin key only)")
    async def reload(
        request: Request, authorization: str | None = Header(None), x_api_key: str | None = Header(None)
    ) -> Response:
        key = auth.key_from_headers(authorization, x_api_key)
        async with audit.record(request, "admin.reload", key, {}) as entry:
            auth.require_admin(key)
            master = supervisor_pid()
            if master is not None:  # several workers: each must reload; the master tells them all
                live.load_settings()  # an invalid configuration is refused here, before any worker tries
                os.kill(master, signal.SIGHUP)
                entry["result"] = "signalled"
                return _json({"reloaded": "signalled", "workers": "every worker reloads itself; see the log"}, 202)
            report = await live.reload("api")
            entry["generation"] = report["generation"]
        return _json(report)

    @app.get("/v1/admin/reload", summary="This worker's pipeline generation and its last reload (admin key only)")
    async def reload_status(authorization: str | None = Header(None), x_api_key: str | None = Header(None)) -> Response:
        auth.require_admin(auth.key_from_headers(authorization, x_api_key))
        return _json({"generation": live.current.number, "pid": os.getpid(), "last": live.last})
