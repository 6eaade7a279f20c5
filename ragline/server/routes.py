"""The HTTP routes: documents, search, query (the hot path), cache, operations.

``/v1/query`` parses its body with orjson and checks it by hand, and returns the
pipeline's pre-serialised answer bytes with ``cache``/``timings`` spliced in:
a cached answer pays for no model validation and no re-serialisation.  The
other routes take pydantic bodies (:mod:`ragline.server.schemas`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Header, Query, Request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from starlette.responses import Response, StreamingResponse

from ragline import metrics
from ragline.codec import response_bytes
from ragline.config import Settings
from ragline.errors import InvalidInput, PayloadTooLarge, RaglineError, ServiceUnavailable
from ragline.pipeline import AsyncRAG
from ragline.server import audit, conversation_routes, errors, jobs, profiling
from ragline.server import limits as api_limits
from ragline.server.auth import Auth
from ragline.server.schemas import CACHE_MODES, QUERY_FIELDS, DocumentsIn, InvalidateIn, QueryIn, SearchIn
from ragline.types import Document

_MAX_OFFSET = 2**31 - 1
"""Larger offsets overflow SQLite's integers (and no corpus has that many documents)."""


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def _read_json(request: Request) -> Any:
    return _parse_json(await request.body())


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


def query_body_bytes(settings: Settings) -> int:
    """The largest valid ``/v1/query`` body: query and history at 4 UTF-8 bytes per character, JSON
    escaping and the messages' keys included (a larger one is a 413 before it is parsed)."""
    lim = settings.limits
    return (lim.max_query_chars + lim.max_history_chars) * 6 + 100 * lim.max_history_messages + 4096


def install(app: FastAPI, pipeline: AsyncRAG, settings: Settings, auth: Auth) -> None:
    """Register every route of the API on ``app``."""
    answer_counters: dict[str, Any] = {}
    query_body_limit = query_body_bytes(settings)

    def tenant_of(authorization: str | None, x_api_key: str | None) -> str:
        return auth.tenant(auth.key_from_headers(authorization, x_api_key))

    # -- documents ---------------------------------------------------------
    @app.post("/v1/documents", summary="Add or replace documents by id")
    async def add_documents(
        body: DocumentsIn,
        authorization: str | None = Header(None),
        x_api_key: str | None = Header(None),
        run_async: bool = Query(False, alias="async", description="run as a background job: 202, as POST /v1/jobs"),
    ) -> Response:
        tenant = tenant_of(authorization, x_api_key)
        docs = [Document(d.id, d.text, d.title, d.metadata, source="api") for d in body.documents]
        if run_async:
            return await jobs.submit_response(pipeline, docs, tenant)
        lim = settings.limits.max_documents_per_request
        if len(body.documents) > lim:
            raise PayloadTooLarge(f"{len(body.documents)} documents in one request; the limit is {lim}")
        jobs.check_sync(docs, settings.limits)  # more is a 413 that says to submit a job
        report = await pipeline.ingest(docs, tenant)
        return _json(report.to_dict())

    @app.get("/v1/documents", summary="List document ids")
    async def list_documents(
        limit: int = 100,
        offset: int = 0,
        authorization: str | None = Header(None),
        x_api_key: str | None = Header(None),
    ) -> Response:
        tenant = tenant_of(authorization, x_api_key)
        if not 1 <= limit <= 1000 or not 0 <= offset <= _MAX_OFFSET:
            raise InvalidInput(f"limit must be 1..1000 and offset 0..{_MAX_OFFSET}")
        ids = pipeline.store.document_ids(tenant, limit, offset)
        return _json({"ids": ids, **pipeline.stats(tenant)})

    @app.delete("/v1/documents/{doc_id:path}", summary="Delete a document and its chunks")
    async def delete_document(
        doc_id: str, authorization: str | None = Header(None), x_api_key: str | None = Header(None)
    ) -> Response:
        tenant = tenant_of(authorization, x_api_key)
        removed = await pipeline.delete([doc_id], tenant)
        return _json({"deleted": doc_id, "chunks_removed": len(removed)})

    # -- search and query ----------------------------------------------------
    @app.post("/v1/search", summary="Hybrid search (dense + BM25, RRF)")
    async def search(
        body: SearchIn, authorization: str | None = Header(None), x_api_key: str | None = Header(None)
    ) -> Response:
        tenant = tenant_of(authorization, x_api_key)
        timings: dict[str, float] = {}
        hits = await pipeline.search(
            body.query, body.k, tenant, doc_level=body.doc_level, mmr=body.mmr, timings=timings, cache_mode=body.cache
        )
        out: dict[str, Any] = {"hits": [h.to_dict() for h in hits]}
        if body.timings:
            out["timings"] = timings
        return _json(out)

    @app.post(
        "/v1/query",
        summary="Answer a question with cited sources",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": QueryIn.model_json_schema()}}}
        },
    )
    async def query(request: Request) -> Response:
        h = request.headers
        tenant = tenant_of(h.get("authorization"), h.get("x-api-key"))
        raw = await request.body()
        if len(raw) > query_body_limit:  # before parsing: a huge body would stall the loop in the parser
            raise PayloadTooLarge(
                f"a query body is at most {query_body_limit:,} bytes (limits.max_query_chars and "
                f"limits.max_history_chars); this one is {len(raw):,}"
            )
        body = _parse_json(raw)
        if not isinstance(body, dict):
            raise InvalidInput("request body must be a JSON object with a 'query' field")
        q = body.get("query")
        if not isinstance(q, str):
            raise InvalidInput("'query' is required and must be a string")
        k = body.get("k")
        history = body.get("history") or []
        if not isinstance(history, list):
            raise InvalidInput("'history' must be a list of {role, content} messages")
        mode = body.get("cache", "default")
        if mode not in CACHE_MODES:
            raise InvalidInput("'cache' must be one of 'default', 'bypass', 'refresh'")
        if not QUERY_FIELDS.issuperset(body):
            unknown = sorted(set(body) - QUERY_FIELDS)
            raise InvalidInput(f"unknown field(s) {unknown}; a query takes {sorted(QUERY_FIELDS)}", param=unknown[0])
        cid = body.get("conversation_id")
        if cid is not None:  # server-side history (ragline.conversation)
            if history:
                raise InvalidInput("send 'conversation_id' (history kept by the server) or 'history', not both")
            convs = request.app.state.conversations
            return await conversation_routes.query_turn(convs, tenant, q, k, cid, mode, body, _sse)
        profile = body.get("profile")
        if profile is not None and profile is not False:  # operators only: a pyinstrument + tracemalloc report
            auth.require_admin(auth.key_from_headers(h.get("authorization"), h.get("x-api-key")))
            if body.get("stream") is True:
                raise InvalidInput("'profile' is not available with 'stream'; profile the request unstreamed")
            spent: dict[str, float] = {}
            run = functools.partial(pipeline.ask_body, q, k, tenant, history=history, cache_mode=mode, timings=spent)
            (answer, info), report = await profiling.profiled(run, profiling.profile_format(profile))
            return _json({**orjson.loads(response_bytes(answer, info, spent)), "profile": report})
        if body.get("stream") is True:
            events = await pipeline.ask_stream(q, k, tenant, history=history, cache_mode=mode)
            return StreamingResponse(
                _sse(events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        t0 = time.perf_counter()
        timings: dict[str, float] | None = {} if body.get("timings", True) is not False else None
        answer, info = await pipeline.ask_body(q, k, tenant, history=history, cache_mode=mode, timings=timings)
        if timings is not None:
            timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
        counter = answer_counters.get(info.kind)
        if counter is None:
            counter = answer_counters[info.kind] = metrics.ANSWERS.labels(info.kind)  # no tenant names in /metrics
        counter.inc()
        return Response(response_bytes(answer, info, timings), media_type="application/json")

    # -- cache -----------------------------------------------------------------
    @app.get("/v1/cache/stats", summary="Cache tiers, hit counts, dependency and semantic entries (admin key only)")
    async def cache_stats(authorization: str | None = Header(None), x_api_key: str | None = Header(None)) -> Response:
        auth.require_admin(auth.key_from_headers(authorization, x_api_key))
        if pipeline.cache is None:
            return _json({"enabled": False})
        return _json({"enabled": True, **pipeline.cache.stats()})

    @app.post("/v1/cache/invalidate", summary="Invalidate cache entries (admin key only; rate-limited, audited)")
    async def cache_invalidate(
        request: Request,
        body: InvalidateIn,
        authorization: str | None = Header(None),
        x_api_key: str | None = Header(None),
    ) -> Response:
        key = auth.key_from_headers(authorization, x_api_key)
        async with audit.record(request, "cache.invalidate", key, body.model_dump()) as entry:
            auth.require_admin(key)
            assert key is not None
            await api_limits.of(request).admit_invalidation(key)
            n = await pipeline.invalidate(tenant=body.tenant, doc_id=body.doc_id, key=body.key, everything=body.all)
            entry["invalidated"] = n
        return _json({"invalidated": n})

    # -- operations ----------------------------------------------------------
    @app.get("/healthz", summary="Liveness")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz", summary="Readiness: model loaded, store open")
    async def readyz() -> Response:
        if not pipeline.ready:
            raise ServiceUnavailable("starting: the model and store are still loading")
        components: dict[str, Any] = {"store": "ok", "embedder": pipeline.embedder.id, "llm": pipeline.llm.id}
        status = "ready"
        if pipeline.cache is not None:
            health = pipeline.cache.health()
            components["cache"] = {tier: "ok" if ok else "degraded" for tier, ok in health.items()}
            if not all(health.values()):
                status = "degraded"  # still serving: the cache fails open to the other tiers
        return _json({"status": status, "components": components})

    @app.get("/v1/upstreams", summary="The gateways' upstreams: limits, breakers, in-flight, latency, pools")
    async def upstreams(authorization: str | None = Header(None), x_api_key: str | None = Header(None)) -> Response:
        if settings.server.admin_keys:  # with admin keys configured, operators' views need one
            auth.require_admin(auth.key_from_headers(authorization, x_api_key))
        return _json(await pipeline.upstreams())

    registry = _metrics_registry()

    @app.get("/metrics", summary="Prometheus metrics (summed over every worker with --workers N)")
    async def prometheus(request: Request, authorization: str | None = Header(None)) -> Response:
        api_limits.of(request).check_metrics_token(authorization)  # when server.metrics_token is set
        if pipeline.cache is not None:
            pipeline.cache.flush_metrics()
        if pipeline.ready:
            await pipeline.upstreams()  # refreshes the breaker, rate-factor and pool gauges
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _metrics_registry() -> CollectorRegistry:
    """The default registry, or with several workers (``PROMETHEUS_MULTIPROC_DIR``, set by ``ragline
    serve``) a registry that merges every worker's sample files: counters and histograms are sums
    over the workers, each gauge merged as its ``multiprocess_mode`` says."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


async def _sse(events: AsyncIterator[tuple[str, dict[str, Any]]]) -> AsyncIterator[bytes]:
    """Server-sent events; a failure mid-stream becomes a final ``error`` event."""
    try:
        async for name, data in events:
            yield b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    except RaglineError as exc:
        yield (
            b"event: error\ndata: " + orjson.dumps({"code": exc.code, "message": errors.public_message(exc)}) + b"\n\n"
        )
    except Exception:
        errors.log.exception("stream failed")
        yield (
            b"event: error\ndata: "
            + orjson.dumps({"code": "internal_error", "message": "internal error; see the server log"})
            + b"\n\n"
        )
