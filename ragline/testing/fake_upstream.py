"""A controllable fake OpenAI-compatible upstream for tests, benchmarks and users.

Why it exists: every path that talks to an LLM or a remote embedder (retries,
Retry-After, timeouts, streaming, the gateway, the cache's "a hit saves
seconds" claim) must be testable and measurable without a real model.  This
server speaks the OpenAI wire format closely enough for the official clients
and for ``ragline.llm.openai.OpenAILLM``:

* ``POST /v1/chat/completions`` — non-streaming and SSE streaming (role chunk,
  one chunk per token, a finish chunk, a ``usage`` chunk with empty
  ``choices`` when ``stream_options.include_usage`` is set, then
  ``data: [DONE]``).  Without ``include_usage`` the finish chunk itself carries
  ``usage``, so naive clients still see token counts.
* ``POST /v1/embeddings`` — deterministic unit vectors seeded by a hash of each
  input (``float`` lists or ``base64`` float32, ``dimensions`` honoured).
* ``GET /v1/models``.

Timing is ``latency_ms`` before the first token, then ``tps`` tokens per
second (``0`` = unlimited), so a reply of *n* tokens takes
``latency + n / tps`` seconds, streamed or not.  Faults can be queued
(``fail_next("429", 2, retry_after=1)``) or drawn at random
(``failure_rate``); kinds are ``"429"`` (with ``Retry-After``), any 5xx status
such as ``"500"``/``"503"``, ``"timeout"`` (hang until the client gives up,
``hang_s`` at most) and ``"malformed"`` (a 200 that is not valid JSON/SSE).

Control it in-process through ``FakeUpstream`` (a context manager that serves
on ``127.0.0.1`` on a free port in a background thread) or, from another
process, over HTTP: ``POST /_control`` (JSON with any config field, plus
``fail_next: {kind, count, retry_after}``), ``GET /_stats`` and
``POST /_reset``.  Standalone::

    python -m ragline.testing.fake_upstream --port 8001 --latency-ms 200 --tps 50

The app is raw ASGI (no framework) so that benchmarks measure the client and
not the fake: a non-streaming reply costs a few tens of microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import random
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, field, fields, replace
from types import TracebackType
from typing import Any

import numpy as np
import orjson

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]

FAULT_KINDS = ("429", "timeout", "malformed")
"""Fault kinds besides 5xx statuses (any string "500".."599")."""

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass
class UpstreamConfig:
    """Everything that shapes the fake's answers; every field is settable via ``/_control``."""

    model: str = "fake-model"
    latency_ms: float = 0.0
    """Delay before the first token (streaming) or before the whole reply."""
    tps: float = 0.0
    """Tokens per second after the first-token latency; 0 means unlimited."""
    reply: str | None = None
    """Fixed reply text; ``None`` derives a deterministic reply from the last user message."""
    embedding_dim: int = 384
    failure_rate: float = 0.0
    """Probability that a request (chat or embeddings) fails with ``failure_kind``."""
    failure_kind: str = "500"
    retry_after: float | None = 1.0
    """``Retry-After`` seconds sent with random 429s (``None`` omits the header)."""
    hang_s: float = 300.0
    """How long a ``timeout`` fault hangs at most (it ends early when the client disconnects)."""
    seed: int = 0
    """Seeds the random failure draws, so a benchmark run is reproducible."""

    def update(self, values: dict[str, Any]) -> UpstreamConfig:
        """A copy with ``values`` applied; unknown keys or bad kinds raise ``ValueError``."""
        names = {f.name for f in fields(self)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        new = replace(self, **values)
        _check_kind(new.failure_kind)
        if not 0.0 <= new.failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        if new.embedding_dim < 1 or new.tps < 0 or new.latency_ms < 0:
            raise ValueError("embedding_dim must be >= 1; tps and latency_ms >= 0")
        return new


@dataclass(frozen=True)
class Fault:
    """One queued failure; ``route`` limits it to ``"chat"`` or ``"embeddings"``."""

    kind: str
    retry_after: float | None = None
    route: str | None = None


def _check_kind(kind: str) -> None:
    if kind in FAULT_KINDS or (kind.isdigit() and 500 <= int(kind) <= 599):
        return
    raise ValueError(f"unknown fault kind {kind!r}: use 429, 5xx, timeout or malformed")


@dataclass
class _Stats:
    total: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    clients: set[tuple[str, int]] = field(default_factory=set)


def default_reply(messages: list[dict[str, Any]]) -> str:
    """A deterministic answer to the last user message that cites source [1].

    It quotes the question (the text after ``Question:`` in ragline's prompt, or
    the whole message) so tests can tell replies apart and check citations.
    """
    content = ""
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            content = c if isinstance(c, str) else ""
            break
    _, sep, question = content.rpartition("Question: ")
    words = (question if sep else content).split()[:16]
    topic = " ".join(words) if words else "your question"
    return f"According to the sources, the answer to {topic} is given in the first source [1]."


def tokenize(text: str) -> list[str]:
    """Split a reply into stream tokens: words with their leading space."""
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)] if text else []


def embed_text(text: str, dim: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A unit vector seeded by blake2b(text): same input, same vector, in any process."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    v /= np.linalg.norm(v) or 1.0
    return v


def _fmt_seconds(s: float) -> bytes:
    return str(int(s) if float(s).is_integer() else s).encode()


class FakeUpstream:
    """The fake server: an ASGI app (``self.app``) plus in-process control.

    Use as a context manager to serve it on ``127.0.0.1`` in a background
    thread; ``url`` is then the OpenAI base URL (``http://127.0.0.1:PORT/v1``).
    All control methods are thread-safe, so a test thread can steer the server
    thread while requests are in flight.
    """

    def __init__(self, config: UpstreamConfig | None = None, **overrides: Any) -> None:
        self._initial = (config or UpstreamConfig()).update(overrides)
        self.config = self._initial
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._stats = _Stats()
        self._rng = random.Random(self.config.seed)
        self.requests: deque[tuple[str, dict[str, Any]]] = deque(maxlen=50)
        """The most recent (route, JSON body) pairs, oldest first."""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self._created = int(time.time())

    # ----------------------------------------------------------------- control
    def configure(self, **values: Any) -> None:
        """Change config fields (e.g. ``latency_ms=200, tps=50``) for the next requests."""
        with self._lock:
            self.config = self.config.update(values)
            if "seed" in values:
                self._rng = random.Random(self.config.seed)

    def fail_next(self, kind: str | int, count: int = 1, retry_after: float | None = None,
                  route: str | None = None) -> None:
        """Queue ``count`` failures of ``kind`` ("429", "500".."599", "timeout", "malformed").

        ``retry_after`` (seconds) is sent as a ``Retry-After`` header on 429 and 5xx.
        ``route`` ("chat" or "embeddings") restricts the fault to one route.
        """
        k = str(kind)
        _check_kind(k)
        if route not in (None, "chat", "embeddings"):
            raise ValueError("route must be 'chat', 'embeddings' or None")
        with self._lock:
            self._faults.extend(Fault(k, retry_after, route) for _ in range(count))

    def reset(self) -> None:
        """Back to the initial config; clear queued faults, counters and recorded bodies."""
        with self._lock:
            self.config = self._initial
            self._faults.clear()
            self._stats = _Stats()
            self._rng = random.Random(self.config.seed)
            self.requests.clear()

    @property
    def calls(self) -> int:
        """Requests received on the API routes (control routes not counted)."""
        return self._stats.total

    def route_calls(self, route: str) -> int:
        """Requests received on ``route``: "chat", "embeddings" or "models"."""
        return self._stats.routes[route]

    def outcome_calls(self, outcome: str) -> int:
        """Requests that ended in ``outcome``: "ok", "429", "500", "timeout", "malformed"..."""
        return self._stats.outcomes[outcome]

    @property
    def connections(self) -> int:
        """Distinct client TCP connections seen on the API routes (keep-alive reuse shows here)."""
        return len(self._stats.clients)

    @property
    def last_request(self) -> dict[str, Any] | None:
        """The JSON body of the most recent API request, or ``None``."""
        return self.requests[-1][1] if self.requests else None

    def stats(self) -> dict[str, Any]:
        """Counters, queued faults and current config, as served by ``GET /_stats``."""
        with self._lock:
            return {
                "total": self._stats.total,
                "routes": dict(self._stats.routes),
                "outcomes": dict(self._stats.outcomes),
                "connections": len(self._stats.clients),
                "pending_faults": [asdict(f) for f in self._faults],
                "config": asdict(self.config),
                "last_requests": [{"route": r, "body": b} for r, b in self.requests],
            }

    # ------------------------------------------------------------ serving
    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:43121/v1`` (after ``start``)."""
        if self.port is None:
            raise RuntimeError("FakeUpstream is not running; use it as a context manager")
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, port: int = 0, timeout_s: float = 10.0) -> FakeUpstream:
        """Serve on 127.0.0.1 (``port=0``: a free port) in a daemon thread; returns self."""
        import uvicorn

        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False,
                                interface="asgi3", timeout_graceful_shutdown=1, timeout_keep_alive=30)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake upstream failed to start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving and join the thread (hanging requests are cancelled)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None
        self.port = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --------------------------------------------------------------- ASGI app
    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point: route by method and path."""
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/")
        if path.startswith("/v1"):
            path = path[3:]
        body = await _read_body(receive) if method == "POST" else b""
        client = scope.get("client")
        if client and not path.startswith("/_"):
            with self._lock:
                self._stats.clients.add((client[0], client[1]))
        try:
            if method == "POST" and path == "/chat/completions":
                await self._chat(body, receive, send)
            elif method == "POST" and path == "/embeddings":
                await self._embeddings(body, receive, send)
            elif method == "GET" and path == "/models":
                self._count("models", "ok", None)
                await _respond(send, 200, {"object": "list", "data": [
                    {"id": self.config.model, "object": "model", "created": self._created,
                     "owned_by": "ragline-fake"}]})
            elif path == "/_control" and method == "POST":
                await self._control(body, send)
            elif path == "/_stats" and method == "GET":
                await _respond(send, 200, self.stats())
            elif path == "/_reset" and method == "POST":
                self.reset()
                await _respond(send, 200, {"ok": True})
            else:
                await _respond(send, 404, _error(f"no route {method} {scope['path']}", "not_found"))
        except _BadRequest as exc:
            await _respond(send, 400, _error(str(exc), "invalid_request_error"))

    def _count(self, route: str, outcome: str, body: dict[str, Any] | None) -> None:
        with self._lock:
            s = self._stats
            s.total += 1
            s.routes[route] += 1
            s.outcomes[outcome] += 1
            if body is not None:
                self.requests.append((route, body))

    def _draw_fault(self, route: str) -> Fault | None:
        """The next queued fault for ``route``, else a random one at ``failure_rate``."""
        with self._lock:
            for i, f in enumerate(self._faults):
                if f.route is None or f.route == route:
                    del self._faults[i]
                    return f
            cfg = self.config
            if cfg.failure_rate > 0 and self._rng.random() < cfg.failure_rate:
                return Fault(cfg.failure_kind, cfg.retry_after if cfg.failure_kind == "429" else None)
        return None

    async def _fail(self, fault: Fault, route: str, body: dict[str, Any], stream: bool,
                    receive: Receive, send: Send) -> None:
        self._count(route, fault.kind, body)
        if fault.kind == "timeout":
            watch = _Disconnect(receive)
            try:
                await watch.sleep(self.config.hang_s)
            finally:
                watch.close()
            return
        if fault.kind == "malformed":
            if stream:
                await send({"type": "http.response.start", "status": 200, "headers": _SSE})
                await send({"type": "http.response.body", "body": b"data: {not json\n\n"})
                await send({"type": "http.response.body", "body": b""})
            else:
                await _respond(send, 200, b"{\"choices\": [oops")
            return
        status = int(fault.kind)
        headers: list[tuple[bytes, bytes]] = []
        if fault.retry_after is not None:
            headers.append((b"retry-after", _fmt_seconds(fault.retry_after)))
        if status == 429:
            err = _error("Rate limit reached for requests (fake upstream).", "rate_limit_exceeded")
        else:
            err = _error(f"The server had an error while processing your request (fake {status}).",
                         "server_error")
        await _respond(send, status, err, headers)

    async def _chat(self, raw: bytes, receive: Receive, send: Send) -> None:
        body = _parse_json(raw)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty list")
        stream = bool(body.get("stream"))
        fault = self._draw_fault("chat")
        if fault is not None:
            await self._fail(fault, "chat", body, stream, receive, send)
            return
        self._count("chat", "ok", body)
        cfg = self.config
        text = cfg.reply if cfg.reply is not None else default_reply(messages)
        tokens = tokenize(text)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < len(tokens):
            tokens, finish = tokens[:max_tokens], "length"
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages
                            if isinstance(m, dict))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        model = str(body.get("model") or cfg.model)
        cid = "chatcmpl-" + hashlib.blake2b(raw, digest_size=12).hexdigest()
        watch = _Disconnect(receive)
        try:
            await self._reply(send, watch, cfg, stream, body, tokens, finish, usage, model, cid)
        finally:
            watch.close()

    async def _reply(self, send: Send, watch: _Disconnect, cfg: UpstreamConfig, stream: bool,
                     body: dict[str, Any], tokens: list[str], finish: str, usage: dict[str, int],
                     model: str, cid: str) -> None:
        """Send the completion, paced by latency and tps; stop early if the client went away."""
        created = int(time.time())
        if not stream:
            delay = cfg.latency_ms / 1000 + (len(tokens) / cfg.tps if cfg.tps > 0 else 0.0)
            if delay > 0 and not await watch.sleep(delay):
                return
            await _respond(send, 200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(tokens)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage, "system_fingerprint": "fake"})
            return
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fake"}

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

        def choice(delta: dict[str, Any], fin: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}]

        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        await _send_body(send, event(choice({"role": "assistant", "content": ""})))
        start = time.monotonic() + cfg.latency_ms / 1000
        for i, tok in enumerate(tokens):
            due = start + (i / cfg.tps if cfg.tps > 0 else 0.0)
            wait = due - time.monotonic()
            if wait > 0 and not await watch.sleep(wait):
                return
            await _send_body(send, event(choice({"content": tok})))
        end = start + (len(tokens) / cfg.tps if cfg.tps > 0 else 0.0)
        if (wait := end - time.monotonic()) > 0 and not await watch.sleep(wait):
            return
        if include_usage:
            tail = event(choice({}, finish), usage=None) + event([], usage=usage)
        else:
            tail = event(choice({}, finish), usage=usage)
        await _send_body(send, tail + b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b""})

    async def _embeddings(self, raw: bytes, receive: Receive, send: Send) -> None:
        body = _parse_json(raw)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise _BadRequest("'input' must be a string or a non-empty list")
        fault = self._draw_fault("embeddings")
        if fault is not None:
            await self._fail(fault, "embeddings", body, False, receive, send)
            return
        self._count("embeddings", "ok", body)
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
        if cfg.latency_ms > 0:
            await asyncio.sleep(cfg.latency_ms / 1000)
        model = str(body.get("model") or cfg.model)
        await _respond(send, 200, {"object": "list", "data": data, "model": model,
                                   "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    async def _control(self, raw: bytes, send: Send) -> None:
        body = _parse_json(raw)
        fail = body.pop("fail_next", None)
        try:
            if body:
                self.configure(**body)
            for f in [fail] if isinstance(fail, dict) else (fail or []):
                self.fail_next(str(f["kind"]), int(f.get("count", 1)), f.get("retry_after"),
                               f.get("route"))
        except (ValueError, TypeError, KeyError) as exc:
            raise _BadRequest(f"bad control request: {exc}") from None
        await _respond(send, 200, self.stats())


class _BadRequest(Exception):
    """A malformed request body: answered with an OpenAI-style 400."""


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(parts)


class _Disconnect:
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


async def _send_body(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _respond(send: Send, status: int, payload: Any,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    hdrs = [*_JSON, (b"content-length", str(len(data)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone (blocking) on ``--host``/``--port``."""
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m ragline.testing.fake_upstream",
                                description="A fake OpenAI-compatible upstream (see module docs).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before the first token")
    p.add_argument("--tps", type=float, default=0.0, help="tokens per second; 0 = unlimited")
    p.add_argument("--reply", default=None, help="fixed reply text (default: derived from the question)")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--embedding-dim", type=int, default=384)
    p.add_argument("--failure-rate", type=float, default=0.0)
    p.add_argument("--failure-kind", default="500", help="429, 5xx, timeout or malformed")
    p.add_argument("--retry-after", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    try:
        fake = FakeUpstream(latency_ms=a.latency_ms, tps=a.tps, reply=a.reply, model=a.model,
                            embedding_dim=a.embedding_dim, failure_rate=a.failure_rate,
                            failure_kind=a.failure_kind, retry_after=a.retry_after, seed=a.seed)
    except ValueError as exc:
        p.error(str(exc))
    print(f"fake upstream: http://{a.host}:{a.port}/v1  (control: POST /_control, GET /_stats, POST /_reset)",
          flush=True)
    uvicorn.run(fake.app, host=a.host, port=a.port, log_level=a.log_level, lifespan="off", interface="asgi3",
                access_log=False, timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
