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
``GET /_arrivals`` (every request's arrival time, route, outcome and tokens, for rate checks; a
request arriving while a Retry-After the fake sent is still running counts as ``early_arrivals``) and
``POST /_reset``.  ``concurrency`` bounds the requests processed at once (the rest queue) and
``embed_ms_per_input`` makes a batch cost more than one text, like a real model server.  Standalone::

    python -m ragline.testing.fake_upstream --port 8001 --latency-ms 200 --tps 50

The app is raw ASGI (no framework) so that benchmarks measure the client and
not the fake: a non-streaming reply costs a few tens of microseconds.
"""

from __future__ import annotations

import argparse
import random
import socket
import threading
import time
from collections import deque
from dataclasses import asdict
from types import TracebackType
from typing import Any

from ragline.testing.upstream_model import (
    FAULT_KINDS,
    Fault,
    Stats,
    UpstreamConfig,
    check_kind,
    default_reply,
    embed_text,
    tokenize,
)
from ragline.testing.upstream_routes import OpenAIRoutes
from ragline.testing.upstream_wire import (
    BadRequest,
    Receive,
    Scope,
    Send,
    error_body,
    parse_json,
    read_body,
    respond,
)

__all__ = ["FAULT_KINDS", "FakeUpstream", "Fault", "UpstreamConfig", "default_reply", "embed_text", "main", "tokenize"]


class FakeUpstream(OpenAIRoutes):
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
        self._stats = Stats()
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

    def fail_next(
        self, kind: str | int, count: int = 1, retry_after: float | None = None, route: str | None = None
    ) -> None:
        """Queue ``count`` failures of ``kind`` ("429", "500".."599", "timeout", "malformed").

        ``retry_after`` (seconds) is sent as a ``Retry-After`` header on 429 and 5xx.
        ``route`` ("chat" or "embeddings") restricts the fault to one route.
        """
        k = str(kind)
        check_kind(k)
        if route not in (None, "chat", "embeddings"):
            raise ValueError("route must be 'chat', 'embeddings' or None")
        with self._lock:
            self._faults.extend(Fault(k, retry_after, route) for _ in range(count))

    def reset(self) -> None:
        """Back to the initial config; clear queued faults, counters and recorded bodies."""
        with self._lock:
            self.config = self._initial
            self._faults.clear()
            self._stats = Stats()
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
    def early_arrivals(self) -> int:
        """Requests that arrived before a Retry-After this fake had sent had passed."""
        return self._stats.early

    def arrivals(self) -> list[tuple[float, str, str, int]]:
        """(epoch seconds, route, outcome, tokens) of each API request as it arrived (``GET /_arrivals``);
        tokens are the prompt + completion tokens of a successful chat reply, the input tokens of embeddings."""
        with self._lock:
            return list(self._stats.arrivals)

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
                "early_arrivals": self._stats.early,
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
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            interface="asgi3",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"fake-upstream-{self.port}", daemon=True
        )
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

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --------------------------------------------------------------- ASGI app
    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point: route by method and path."""
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/")
        if path.startswith("/v1"):
            path = path[3:]
        body = await read_body(receive) if method == "POST" else b""
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
                await respond(
                    send,
                    200,
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": self.config.model,
                                "object": "model",
                                "created": self._created,
                                "owned_by": "ragline-fake",
                            }
                        ],
                    },
                )
            elif path == "/_control" and method == "POST":
                await self._control(body, send)
            elif path == "/_arrivals" and method == "GET":
                await respond(send, 200, {"arrivals": self.arrivals()})
            elif path == "/_stats" and method == "GET":
                await respond(send, 200, self.stats())
            elif path == "/_reset" and method == "POST":
                self.reset()
                await respond(send, 200, {"ok": True})
            else:
                await respond(send, 404, error_body(f"no route {method} {scope['path']}", "not_found"))
        except BadRequest as exc:
            await respond(send, 400, error_body(str(exc), "invalid_request_error"))

    def _count(
        self, route: str, outcome: str, body: dict[str, Any] | None, tokens: int = 0, retry_after: float | None = None
    ) -> None:
        now = time.time()
        with self._lock:
            s = self._stats
            if route != "models":
                s.arrivals.append((now, route, outcome, tokens))
                if now < s.retry_after_until:
                    s.early += 1
                if retry_after is not None:  # this reply tells the client to wait: later arrivals are early
                    s.retry_after_until = max(s.retry_after_until, now + retry_after)
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
                kind = self._rng.choice(cfg.failure_kinds) if cfg.failure_kinds else cfg.failure_kind
                return Fault(kind, cfg.retry_after if kind == "429" else None)
        return None

    async def _control(self, raw: bytes, send: Send) -> None:
        body = parse_json(raw)
        fail = body.pop("fail_next", None)
        try:
            if body:
                self.configure(**body)
            for f in [fail] if isinstance(fail, dict) else (fail or []):
                self.fail_next(str(f["kind"]), int(f.get("count", 1)), f.get("retry_after"), f.get("route"))
        except (ValueError, TypeError, KeyError) as exc:
            raise BadRequest(f"bad control request: {exc}") from None
        await respond(send, 200, self.stats())


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone (blocking) on ``--host``/``--port``."""
    import uvicorn

    p = argparse.ArgumentParser(
        prog="python -m ragline.testing.fake_upstream",
        description="A fake OpenAI-compatible upstream (see module docs).",
    )
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
        fake = FakeUpstream(
            latency_ms=a.latency_ms,
            tps=a.tps,
            reply=a.reply,
            model=a.model,
            embedding_dim=a.embedding_dim,
            failure_rate=a.failure_rate,
            failure_kind=a.failure_kind,
            retry_after=a.retry_after,
            seed=a.seed,
        )
    except ValueError as exc:
        p.error(str(exc))
    print(
        f"fake upstream: http://{a.host}:{a.port}/v1  (control: POST /_control, GET /_stats, POST /_reset)", flush=True
    )
    uvicorn.run(
        fake.app,
        host=a.host,
        port=a.port,
        log_level=a.log_level,
        lifespan="off",
        interface="asgi3",
        access_log=False,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
