"""The background-job routes: ``POST /v1/jobs`` (also ``POST /v1/documents?async=true``), ``GET /v1/jobs``,
``GET /v1/jobs/{id}``, ``DELETE /v1/jobs/{id}`` (cancel); and the bound on synchronous ingests.

A job runs in the server process (:mod:`ragline.ingest.jobs`); its record lives in the data dir, so
any worker of ``ragline serve --workers N`` answers for it.  A tenant sees only its own jobs: another
tenant's job id is a 404, as an unknown one is.

``POST /v1/documents`` ingests while the client waits, so its work is bounded: more than
``limits.max_sync_ingest_bytes`` of text is a 413 that says to submit a job instead.  The job route
parses and validates its (up to ``limits.max_request_bytes``) body in a worker thread, not on the
event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from ragline.config import LimitSettings, Settings
from ragline.errors import InvalidInput, PayloadTooLarge
from ragline.ingest.job_store import FINAL, OPEN
from ragline.pipeline import AsyncRAG
from ragline.server.auth import Auth
from ragline.server.schemas import DocumentsIn
from ragline.types import Document

__all__ = ["check_sync", "install", "submit_response"]

_STATES = (*OPEN, *FINAL)
_JOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "tenant": {"type": "string"},
        "state": {"type": "string", "enum": list(_STATES)},
        "source": {"type": "string"},
        "created_at": {"type": "number"},
        "started_at": {"type": ["number", "null"]},
        "finished_at": {"type": ["number", "null"]},
        "progress": {"type": "object"},
        "report": {"type": "object"},
        "error": {"type": ["string", "null"]},
        "cancel_requested": {"type": "boolean"},
        "resumes": {"type": "integer"},
    },
}
_JOB_RESPONSE = {"content": {"application/json": {"schema": _JOB_SCHEMA}}}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def check_sync(docs: Sequence[Document], limits: LimitSettings) -> None:
    """``PayloadTooLarge`` when a synchronous ingest carries more text than ``limits.max_sync_ingest_bytes``."""
    limit = limits.max_sync_ingest_bytes
    size = 0
    for d in docs:
        size += len(d.text.encode("utf-8", "surrogatepass")) + len(d.title.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise PayloadTooLarge(
                f"more than {limit:,} bytes of text in one synchronous ingest (limits.max_sync_ingest_bytes): "
                "submit it as a background job with POST /v1/jobs (same body) or POST /v1/documents?async=true, "
                "then follow GET /v1/jobs/{id}"
            )


async def submit_response(pipeline: AsyncRAG, docs: Sequence[Document], tenant: str) -> Response:
    """Submit a job; 202 with the job and its ``Location``."""
    job = await pipeline.jobs.submit(docs, tenant, source="api")
    return _json(job.to_dict(), 202, {"Location": f"/v1/jobs/{job.id}"})


def _parse(body: bytes) -> list[Document]:
    """The documents of a ``DocumentsIn`` body (in a worker thread: bodies run to megabytes)."""
    try:
        parsed = DocumentsIn.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    return [Document(d.id, d.text, d.title, d.metadata, source="api") for d in parsed.documents]


def install(app: FastAPI, pipeline: AsyncRAG, settings: Settings, auth: Auth) -> None:
    """Register the job routes on ``app``."""

    def tenant_of(request: Request) -> str:
        h = request.headers
        return auth.tenant(auth.key_from_headers(h.get("authorization"), h.get("x-api-key")))

    @app.post(
        "/v1/jobs",
        status_code=202,
        summary="Ingest documents as a background job (same body as POST /v1/documents)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": DocumentsIn.model_json_schema()}},
            }
        },
        responses={202: {"description": "Queued; follow the Location header", **_JOB_RESPONSE}},
    )
    async def create_job(request: Request) -> Response:
        tenant = tenant_of(request)
        docs = await asyncio.to_thread(_parse, await request.body())
        return await submit_response(pipeline, docs, tenant)

    @app.get("/v1/jobs", summary="This tenant's recent jobs, newest first")
    async def list_jobs(request: Request, limit: int = 20, state: str | None = None) -> Response:
        tenant = tenant_of(request)
        if state is not None and state not in _STATES:
            raise InvalidInput(f"state must be one of {', '.join(_STATES)}")
        jobs = await pipeline.jobs.recent(tenant, limit, state)
        return _json({"jobs": [j.to_dict() for j in jobs]})

    @app.get("/v1/jobs/{job_id}", summary="A job: state, progress, error, final report", responses={200: _JOB_RESPONSE})
    async def get_job(job_id: str, request: Request) -> Response:
        return _json((await pipeline.jobs.get(job_id, tenant_of(request))).to_dict())

    @app.delete(
        "/v1/jobs/{job_id}",
        summary="Cancel a job (it stops at its next step; what was ingested stays)",
        responses={200: _JOB_RESPONSE},
    )
    async def cancel_job(job_id: str, request: Request) -> Response:
        return _json((await pipeline.jobs.cancel(job_id, tenant_of(request))).to_dict())
