"""The OpenAI wire routes of :class:`~ragline.testing.fake_upstream.FakeUpstream`.

Chat completions (plain and SSE), embeddings and fault injection, kept apart from the server's
control and lifecycle so each class stays small. ``OpenAIRoutes`` is a mixin: the server supplies
``config`` and the two bookkeeping methods declared here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Callable
from typing import Any

import orjson

from ragline.testing.upstream_model import (
    Fault,
    UpstreamConfig,
    default_reply,
    embed_text,
    fmt_seconds,
    tokenize,
)
from ragline.testing.upstream_wire import (
    SSE_HEADERS,
    BadRequest,
    Disconnect,
    Receive,
    Send,
    error_body,
    parse_json,
    respond,
    send_body,
)


class OpenAIRoutes:
    """``/v1/chat/completions`` and ``/v1/embeddings`` as the fake serves them."""

    # supplied by the server class that mixes this in (FakeUpstream)
    config: UpstreamConfig
    _count: Callable[..., None]
    _draw_fault: Callable[[str], Fault | None]
    _slots: asyncio.Semaphore | None = None

    def _slot(self) -> asyncio.Semaphore | None:
        """The processing slots when ``concurrency`` is set (made on the serving loop, on first use)."""
        n = self.config.concurrency
        if n <= 0:
            return None
        if self._slots is None or getattr(self._slots, "_ragline_n", 0) != n:
            self._slots = asyncio.Semaphore(n)
            self._slots._ragline_n = n  # type: ignore[attr-defined]
        return self._slots

    async def _fail(
        self, fault: Fault, route: str, body: dict[str, Any], stream: bool, receive: Receive, send: Send
    ) -> None:
        self._count(route, fault.kind, body, retry_after=fault.retry_after if fault.kind == "429" else None)
        if fault.kind == "timeout":
            watch = Disconnect(receive)
            try:
                await watch.sleep(self.config.hang_s)
            finally:
                watch.close()
            return
        if fault.kind == "malformed":
            if stream:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                await send({"type": "http.response.body", "body": b"data: {not json\n\n"})
                await send({"type": "http.response.body", "body": b""})
            else:
                await respond(send, 200, b'{"choices": [oops')
            return
        status = int(fault.kind)
        headers: list[tuple[bytes, bytes]] = []
        if fault.retry_after is not None:
            headers.append((b"retry-after", fmt_seconds(fault.retry_after)))
        if status == 429:
            err = error_body("Rate limit reached for requests (fake upstream).", "rate_limit_exceeded")
        else:
            err = error_body(f"The server had an error while processing your request (fake {status}).", "server_error")
        await respond(send, status, err, headers)

    async def _chat(self, raw: bytes, receive: Receive, send: Send) -> None:
        body = parse_json(raw)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        stream = bool(body.get("stream"))
        fault = self._draw_fault("chat")
        if fault is not None:
            await self._fail(fault, "chat", body, stream, receive, send)
            return
        cfg = self.config
        text = cfg.reply if cfg.reply is not None else default_reply(messages)
        tokens = tokenize(text)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < len(tokens):
            tokens, finish = tokens[:max_tokens], "length"
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages if isinstance(m, dict))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        self._count("chat", "ok", body, usage["total_tokens"])
        model = str(body.get("model") or cfg.model)
        cid = "chatcmpl-" + hashlib.blake2b(raw, digest_size=12).hexdigest()
        watch = Disconnect(receive)
        slots = self._slot()
        try:
            if slots is None:
                await self._reply(send, watch, cfg, stream, body, tokens, finish, usage, model, cid)
            else:
                async with slots:
                    await self._reply(send, watch, cfg, stream, body, tokens, finish, usage, model, cid)
        finally:
            watch.close()

    async def _reply(
        self,
        send: Send,
        watch: Disconnect,
        cfg: UpstreamConfig,
        stream: bool,
        body: dict[str, Any],
        tokens: list[str],
        finish: str,
        usage: dict[str, int],
        model: str,
        cid: str,
    ) -> None:
        """Send the completion, paced by latency and tps; stop early if the client went away."""
        created = int(time.time())
        if not stream:
            delay = cfg.latency_ms / 1000 + (len(tokens) / cfg.tps if cfg.tps > 0 else 0.0)
            if delay > 0 and not await watch.sleep(delay):
                return
            await respond(
                send,
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(tokens)},
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                    "system_fingerprint": "fake",
                },
            )
            return
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        head = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fake",
        }

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

        def choice(delta: dict[str, Any], fin: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}]

        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send_body(send, event(choice({"role": "assistant", "content": ""})))
        start = time.monotonic() + cfg.latency_ms / 1000
        for i, tok in enumerate(tokens):
            due = start + (i / cfg.tps if cfg.tps > 0 else 0.0)
            wait = due - time.monotonic()
            if wait > 0 and not await watch.sleep(wait):
                return
            await send_body(send, event(choice({"content": tok})))
        end = start + (len(tokens) / cfg.tps if cfg.tps > 0 else 0.0)
        if (wait := end - time.monotonic()) > 0 and not await watch.sleep(wait):
            return
        if include_usage:
            tail = event(choice({}, finish), usage=None) + event([], usage=usage)
        else:
            tail = event(choice({}, finish), usage=usage)
        await send_body(send, tail + b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b""})

    async def _embeddings(self, raw: bytes, receive: Receive, send: Send) -> None:
        body = parse_json(raw)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest("'input' must be a string or a non-empty list")
        fault = self._draw_fault("embeddings")
        if fault is not None:
            await self._fail(fault, "embeddings", body, False, receive, send)
            return
        cfg = self.config
        dims = body.get("dimensions")
        dim = dims if isinstance(dims, int) and dims > 0 else cfg.embedding_dim
        b64 = body.get("encoding_format") == "base64"
        data = []
        n_tokens = 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            n_tokens += len(text.split())
            v = embed_text(text, dim)
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        self._count("embeddings", "ok", body, n_tokens)
        delay = cfg.latency_ms / 1000 + len(inputs) * cfg.embed_ms_per_input / 1000
        slots = self._slot()
        if slots is None:
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            async with slots:
                if delay > 0:
                    await asyncio.sleep(delay)
        model = str(body.get("model") or cfg.model)
        await respond(
            send,
            200,
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            },
        )
