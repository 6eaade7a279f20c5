"""The OpenAI-compatible facade: ``POST /v1/chat/completions`` (streamed or not) and ``GET /v1/models``.

Any OpenAI client or tool can point its base URL at ragline.  The API key is ragline's (its tenant);
the last user message is the question and the messages before it are the history (or, with the
``conversation_id`` extension field, the history the server keeps).  The answer comes from the same
pipeline and caches as ``POST /v1/query`` (:mod:`ragline.conversation` condenses a follow-up first).

Extensions a plain OpenAI client ignores: ``sources`` (the cited chunks, numbered as the ``[n]``
citations in the text) on the response and on the final stream chunk, ``ragline`` (how the answer was
served: ``cache.kind`` is ``exact``/``semantic`` on a hit, plus the standalone question and the
conversation), and the response header ``x-ragline-cache``.  Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``), so clients raise their usual exceptions.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from ragline import metrics
from ragline.config import Settings
from ragline.conversation import Conversations, Event, Prepared
from ragline.errors import InvalidInput, NotFound, PayloadTooLarge, RaglineError
from ragline.server import errors
from ragline.server.auth import Auth
from ragline.server.schemas import CACHE_MODES
from ragline.types import CacheInfo, CacheMode, Message
from ragline.validate import check_history

__all__ = ["MODEL_ID", "install"]

MODEL_ID: Final = "ragline"
_IGNORED: Final = frozenset(
    """temperature top_p max_tokens max_completion_tokens stop presence_penalty frequency_penalty logit_bias user
    seed metadata store service_tier parallel_tool_calls reasoning_effort modalities prediction""".split()
)
"""OpenAI fields accepted and not applied: generation parameters come from the server's settings (they are
part of every cache key there), so a client's defaults do not split the cache."""
_EXTENSIONS: Final = frozenset({"conversation_id", "k", "cache"})
_KNOWN: Final = (
    _IGNORED
    | _EXTENSIONS
    | {
        "model",
        "messages",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
    }
)


CHAT_SCHEMA: Final = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "description": "ragline (GET /v1/models)"},
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                    "content": {"type": "string"},
                },
            },
        },
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "conversation_id": {"type": "string", "description": "extension: the history the server keeps"},
        "k": {"type": "integer", "minimum": 1, "description": "extension: chunks to retrieve"},
        "cache": {"type": "string", "enum": ["default", "bypass", "refresh"], "description": "extension"},
    },
}
"""The documented request body (``/docs``); the route parses the body by hand, as ``/v1/query`` does."""


def _content(m: Any, i: int) -> str:
    """A message's text: a string, or text parts ``[{"type": "text", "text": ...}]`` joined."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in c):
        texts = [p.get("text") for p in c]
        if all(isinstance(t, str) for t in texts):
            return "\n".join(t for t in texts if isinstance(t, str))
    raise InvalidInput(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]")


def parse_request(body: Any, settings: Settings, models: list[str]) -> tuple[str, list[Message], dict[str, Any]]:
    """(question, history, options) of a chat request; ``InvalidInput`` naming the field otherwise."""
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object with 'model' and 'messages'")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise InvalidInput(f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput("'model' is required: one of GET /v1/models", param="model")
    if model not in models:
        raise NotFound(f"the model {model!r} does not exist; use one of {models}", param="model")
    unsupported = {
        "n": body.get("n") not in (None, 1),
        "tools": bool(body.get("tools")),
        "functions": bool(body.get("functions")),
        "logprobs": bool(body.get("logprobs")),
        "response_format": body.get("response_format") not in (None, {"type": "text"}),
    }
    for name, bad in unsupported.items():
        if bad:
            raise InvalidInput(f"'{name}' is not supported by ragline (one text answer with sources)", param=name)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidInput("'messages' must be a non-empty list of {role, content}", param="messages")
    lim = settings.limits
    if len(msgs) > lim.max_history_messages + 8:
        raise PayloadTooLarge(f"{len(msgs)} messages; the limit is {lim.max_history_messages + 1}", param="messages")
    turns: list[Message] = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer"):
            continue  # ragline's own instructions make the prompt (sources, citations)
        if role not in ("user", "assistant"):
            raise InvalidInput(
                f"messages[{i}].role must be 'system', 'user' or 'assistant' (tools are not supported)",
                param=f"messages[{i}].role",
            )
        turns.append({"role": role, "content": _content(m, i)})
    if not turns or turns[-1]["role"] != "user":
        raise InvalidInput("the last message must be the user's question (role 'user')", param="messages")
    question = turns.pop()["content"]
    history = list(check_history(turns, lim.max_history_messages, lim.max_history_chars)) if turns else []
    mode = body.get("cache", "default")
    if mode not in CACHE_MODES:
        raise InvalidInput("'cache' must be one of 'default', 'bypass', 'refresh'", param="cache")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInput("'stream' must be a boolean", param="stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise InvalidInput("'stream_options' must be an object", param="stream_options")
    opts = {
        "model": model,
        "stream": stream,
        "usage": so.get("include_usage") is True,
        "k": body.get("k"),
        "cache": mode,
        "conversation_id": body.get("conversation_id"),
    }
    return question, history, opts


def _sources(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"index": n, **h} for n, h in enumerate(raw, start=1)]


_CITED = re.compile(r"\[(\d{1,3})\]")


def _footer(text: str, sources: list[dict[str, Any]]) -> str:
    """The "Sources:" list of the sources ``text`` cites ([n] is ``sources[n - 1]``), in citation order."""
    cited = {int(n) for n in _CITED.findall(text)}
    lines = [f"[{s['index']}] {s.get('title') or s['doc_id']} ({s['doc_id']})" for s in sources if s["index"] in cited]
    return "\n\nSources:\n" + "\n".join(lines) if lines else ""


def _ragline(p: Prepared, info: dict[str, Any], model: str) -> dict[str, Any]:
    return {"cache": info, "model": model, **p.info()} | (
        {"conversation_id": p.conversation_id} if p.conversation_id else {}
    )


def install(app: FastAPI, conversations: Conversations, settings: Settings, auth: Auth) -> None:
    """Register ``/v1/chat/completions`` and ``/v1/models``."""
    lim = settings.limits
    body_limit = (lim.max_query_chars + lim.max_history_chars) * 6 + 400 * (lim.max_history_messages + 8) + 8192
    models = sorted({MODEL_ID, settings.llm.model})
    footer = settings.conversation.sources_in_text

    def tenant_of(request: Request) -> str:
        h = request.headers
        return auth.tenant(auth.key_from_headers(h.get("authorization"), h.get("x-api-key")))

    @app.get("/v1/models", summary="OpenAI-compatible: the model ids /v1/chat/completions answers as")
    async def list_models(request: Request) -> Response:
        tenant_of(request)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "ragline"} for m in models]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    @app.post(
        "/v1/chat/completions",
        summary="OpenAI-compatible chat completions, answered with cited sources",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": CHAT_SCHEMA}}}},
    )
    async def chat_completions(request: Request) -> Response:
        tenant = tenant_of(request)
        raw = await request.body()
        if len(raw) > body_limit:
            raise PayloadTooLarge(f"a chat request body is at most {body_limit:,} bytes; this one is {len(raw):,}")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        question, history, o = parse_request(body, settings, models)
        cid = o["conversation_id"]
        if cid is not None:
            cid = conversations.check_id(cid)
            history = []  # the server's history; the client's copy of it is not read twice
        mode: CacheMode = o["cache"]
        p = await conversations.prepare(
            tenant, question, conversation_id=cid, history=history, k=o["k"], cache_mode=mode
        )
        rid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        if o["stream"]:
            events = await conversations.ask_stream(p, o["k"], mode)
            return StreamingResponse(
                _stream(events, p, rid, created, o["model"], o["usage"], footer),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        answer, info = await conversations.ask_body(p, o["k"], mode, None)
        metrics.ANSWERS.labels(info.kind).inc()
        d = orjson.loads(answer)
        sources = _sources(d["sources"])
        text = d["answer"] + (_footer(d["answer"], sources) if footer else "")
        out = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": o["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": d["usage"],
            "sources": sources,
            "ragline": _ragline(p, info.to_dict(), d.get("model", "")),
        }
        return Response(orjson.dumps(out), media_type="application/json", headers=_cache_header(info))


def _cache_header(info: CacheInfo) -> dict[str, str]:
    return {"x-ragline-cache": info.kind + (f"; tier={info.tier}" if info.tier else "")}


async def _stream(
    events: AsyncIterator[Event], p: Prepared, rid: str, created: int, model: str, usage: bool, footer: bool
) -> AsyncIterator[bytes]:
    """The pipeline's events as chat.completion.chunk SSE: a role chunk, content deltas, a final chunk with
    ``finish_reason``, ``sources`` and ``ragline`` (and ``usage``, or a usage chunk with include_usage)."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        c = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        return b"data: " + orjson.dumps(c) + b"\n\n"

    sources: list[dict[str, Any]] = []
    said: list[str] = []
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for name, data in events:
            if name == "sources":
                sources = _sources(data["sources"])
            elif name == "delta":
                said.append(data["text"])
                yield chunk({"content": data["text"]})
            elif name == "done":
                tail = _footer("".join(said), sources) if footer else ""
                if tail:
                    yield chunk({"content": tail})
                ext = {"sources": sources, "ragline": _ragline(p, data.get("cache", {}), data.get("model", ""))}
                if usage:
                    yield chunk({}, "stop", **ext)
                    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
                    yield b"data: " + orjson.dumps({**head, "choices": [], "usage": data["usage"]}) + b"\n\n"
                else:
                    yield chunk({}, "stop", usage=data["usage"], **ext)
    except RaglineError as exc:
        body = {
            "message": errors.public_message(exc),
            "type": errors.error_type(exc.status),
            "param": exc.param,
            "code": exc.code,
        }
        yield b"data: " + orjson.dumps({"error": body}) + b"\n\n"
    except Exception:
        errors.log.exception("chat stream failed")
        body = {
            "message": "internal error; see the server log",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
        yield b"data: " + orjson.dumps({"error": body}) + b"\n\n"
    yield b"data: [DONE]\n\n"
