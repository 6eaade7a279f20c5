"""``OpenAILLM``: the LLM protocol over any OpenAI-compatible chat-completions server.

Works against OpenAI, vLLM, llama.cpp (``llama_cpp.server`` or ``llama-server``),
Ollama and ``ragline.testing.FakeUpstream``.  Design points:

* One pooled ``httpx.AsyncClient`` per instance (keep-alive connections are
  the cheapest latency win against a nearby model server); its size comes from
  ``LLMSettings.max_connections``, its connect and read deadlines from
  ``connect_timeout_s`` and ``timeout_s``.
* Retries (tenacity) on connection failures, 5xx and 429, at most
  ``settings.retries`` times, with exponential backoff and jitter.  A
  ``Retry-After`` (or ``retry-after-ms``) header is honoured; one longer than
  ``max_retry_after_s`` is not waited out but surfaced at once as
  ``RateLimited(retry_after=...)`` so the gateway can fall back instead of
  stalling a request.  Timeouts are *not* retried: the deadline is already spent.
* A stream is retried only until its first content delta reaches the caller;
  after that a failure is raised, never silently replayed.
* Failures leave as ``ragline.errors``: ``UpstreamTimeout``, ``RateLimited``
  or ``UpstreamError`` with the status and a short body excerpt.  The API key
  is only ever in the ``Authorization`` header: never in ``id``, logs or
  messages (it is also scrubbed from echoed response bodies).
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Any

import httpx
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from ragline.config import LLMSettings
from ragline.errors import ConfigError, RaglineError, RateLimited, UpstreamError, UpstreamTimeout
from ragline.gateway.upstream import http_client, parse_retry_after, retry_after_of, safe_url
from ragline.llm.base import Completion, GenParams, StreamChunk
from ragline.types import Message, Usage

__all__ = ["OpenAILLM", "parse_retry_after"]

_EXCERPT_CHARS = 200


class _StatusError(Exception):
    """A non-2xx answer, raised inside the retry loop and mapped to ragline errors after it."""

    def __init__(self, status: int, excerpt: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.excerpt = excerpt
        self.retry_after = retry_after


class _Malformed(Exception):
    """A 2xx answer that is not the expected JSON / SSE shape."""


class OpenAILLM:
    """A chat model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    ``settings.base_url`` is the API root including its version path, e.g.
    ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.  Counters
    (``calls``, ``requests``, ``retries``, ``failures``) are plain ints for
    metrics and tests.
    """

    def __init__(
        self,
        settings: LLMSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        client: httpx.AsyncClient | None = None,
        max_retry_after_s: float = 30.0,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 8.0,
    ) -> None:
        if not settings.base_url:
            raise ConfigError("llm.base_url is required for the openai provider")
        self.settings = settings
        self.model = settings.model
        self.base_url = safe_url(settings.base_url)
        self.id = f"openai:{settings.model}@{self.base_url}"
        self.max_retry_after_s = max_retry_after_s
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._secret = settings.api_key.get_secret_value() if settings.api_key else ""
        self._owns_client = client is None
        self._client = client or http_client(
            self._secret, settings.timeout_s, settings.connect_timeout_s, settings.max_connections, transport
        )
        self._stream_options = True
        """Cleared when the server rejects ``stream_options`` (older servers), then not sent again."""
        self.calls = 0
        """``complete`` / ``stream`` invocations."""
        self.requests = 0
        """HTTP requests sent, retries included."""
        self.retries = 0
        self.failures = 0
        """Calls that ended in an exception."""

    # ------------------------------------------------------------------ API
    async def complete(self, messages: list[Message], params: GenParams) -> Completion:
        """One non-streaming chat completion, retried per the policy in the module docs."""
        self.calls += 1
        payload = orjson.dumps(self._body(messages, params, stream=False))
        try:
            async for attempt in self._retrying():
                with attempt:
                    self.requests += 1
                    resp = await self._client.post(self._url, content=payload)
                    if resp.status_code >= 300:
                        raise self._status_error(resp, resp.content)
                    return self._parse_completion(resp.content, params)
        except RaglineError:
            self.failures += 1
            raise
        except Exception as exc:
            self.failures += 1
            raise self._map(exc) from _cause(exc)
        raise AssertionError("unreachable: the retry loop returns or raises")

    async def stream(self, messages: list[Message], params: GenParams) -> AsyncIterator[StreamChunk]:
        """Stream deltas; the last chunk has ``delta=""`` with ``usage`` and ``finish_reason``.

        Requests ``stream_options.include_usage``; when the server sends no
        usage, completion tokens are estimated as the number of deltas.
        """
        self.calls += 1
        resp: httpx.Response | None = None
        events: AsyncGenerator[dict[str, Any], None] | None = None
        try:
            buffered: list[dict[str, Any]] = []
            async for attempt in self._retrying():
                with attempt:
                    resp, events, buffered = await self._open_stream(messages, params)
            assert events is not None
            usage: Usage | None = None
            finish: str | None = None
            deltas = 0
            done = False
            async for ev in _chain(buffered, events):
                if ev.get("__done__"):
                    done = True
                    break
                text, fin, u = _parse_chunk(ev)
                if u is not None:
                    usage = u
                if fin:
                    finish = fin
                if text:
                    deltas += 1
                    yield StreamChunk(text)
            if not done and finish is None:
                raise _Malformed("the stream ended before [DONE] or a finish_reason")
            if usage is None:
                usage = Usage(_estimate_prompt_tokens(messages), deltas)
            yield StreamChunk("", usage=usage, finish_reason=finish or "stop")
            if done:  # read the (empty) rest of the body so the connection returns to the pool
                async for _ in events:
                    pass
        except RaglineError:
            self.failures += 1
            raise
        except Exception as exc:
            self.failures += 1
            raise self._map(exc) from _cause(exc)
        finally:
            if events is not None:
                await events.aclose()
            if resp is not None:
                await resp.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections (a client passed in belongs to its owner, who closes it)."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> OpenAILLM:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------ internals
    def _body(self, messages: list[Message], params: GenParams, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": params.model or self.model,
            "messages": messages,
            "temperature": params.temperature,
            "max_tokens": params.max_tokens,
            "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.extra:
            body.update(params.extra)
        if stream:
            body["stream"] = True
            if self._stream_options:
                body["stream_options"] = {"include_usage": True}
        return body

    async def _open_stream(
        self, messages: list[Message], params: GenParams
    ) -> tuple[httpx.Response, AsyncGenerator[dict[str, Any], None], list[dict[str, Any]]]:
        """One attempt: send, check the status, read events up to the first content delta.

        Everything up to that delta is inside the retry loop (nothing has
        reached the caller yet); the caller continues with the returned iterator.
        """
        self.requests += 1
        req = self._client.build_request(
            "POST", self._url, content=orjson.dumps(self._body(messages, params, stream=True))
        )
        resp = await self._client.send(req, stream=True)
        try:
            if resp.status_code >= 300:
                body = await resp.aread()
                if resp.status_code in (400, 422) and self._stream_options and b"stream_options" in body:
                    # An older server that rejects the field: drop it, retry at once, remember.
                    self._stream_options = False
                    await resp.aclose()
                    return await self._open_stream(messages, params)
                raise self._status_error(resp, body)
            events = _sse_events(resp)
            buffered: list[dict[str, Any]] = []
            async for ev in events:
                buffered.append(ev)
                if ev.get("__done__") or _has_content(ev):
                    break
            return resp, events, buffered
        except BaseException:
            await resp.aclose()
            raise

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.settings.retries + 1),
            wait=self._wait,
            retry=retry_if_exception(self._retryable),
            before_sleep=self._count_retry,
            reraise=True,
        )

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, _StatusError):
            if exc.status != 429 and exc.status < 500:
                return False
            return exc.retry_after is None or exc.retry_after <= self.max_retry_after_s
        # Connection refused/reset, a connect timeout, or a pooled keep-alive
        # connection the server closed: nothing was processed, so resending is safe.
        return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.RemoteProtocolError)

    def _wait(self, state: RetryCallState) -> float:
        """Retry-After when the server gave one (plus ≤10 % jitter), else full-jitter backoff."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _StatusError) and exc.retry_after is not None:
            return exc.retry_after * (1.0 + 0.1 * random.random())
        cap = min(self._backoff_max, self._backoff_initial * 2.0 ** (state.attempt_number - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    def _count_retry(self, state: RetryCallState) -> None:
        self.retries += 1

    def _status_error(self, resp: httpx.Response, body: bytes) -> _StatusError:
        retry_after = retry_after_of(resp) if resp.status_code == 429 or resp.status_code >= 500 else None
        return _StatusError(resp.status_code, self._excerpt(body), retry_after)

    def _excerpt(self, body: bytes) -> str:
        """A one-line, bounded, secret-free excerpt of a response body for error messages."""
        text = body[: _EXCERPT_CHARS * 4].decode("utf-8", "replace")
        try:  # prefer the OpenAI error message when the body is the usual {"error": {...}}
            err = orjson.loads(body).get("error")
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                text = err["message"]
            elif isinstance(err, str):
                text = err
        except (orjson.JSONDecodeError, AttributeError):
            pass
        text = " ".join(text.split())
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:_EXCERPT_CHARS] + ("…" if len(text) > _EXCERPT_CHARS else "")

    def _parse_completion(self, raw: bytes, params: GenParams) -> Completion:
        try:
            data = orjson.loads(raw)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError("message.content is not a string")
            finish = choice.get("finish_reason") or "stop"
            usage = _parse_usage(data.get("usage"))
            model = str(data.get("model") or params.model or self.model)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _Malformed(f"{type(exc).__name__}: {self._excerpt(raw)}") from None
        if usage is None:
            usage = Usage(0, len(text.split()))
        return Completion(text, usage, model, finish)

    def _map(self, exc: Exception) -> Exception:
        """Translate whatever ended the call into the ragline error tree."""
        where = f"LLM upstream {self.base_url}"
        if isinstance(exc, _StatusError):
            if exc.status == 429:
                wait = "" if exc.retry_after is None else f"; retry after {exc.retry_after:g}s"
                return RateLimited(
                    f"{where} rate-limited the request (HTTP 429{wait}): {exc.excerpt}", retry_after=exc.retry_after
                )
            return UpstreamError(f"{where} returned HTTP {exc.status}: {exc.excerpt}", exc.status)
        if isinstance(exc, _Malformed):
            return UpstreamError(f"{where} sent a malformed response: {exc}")
        if isinstance(exc, httpx.TimeoutException):
            kind = type(exc).__name__
            limit = (
                self.settings.connect_timeout_s if isinstance(exc, httpx.ConnectTimeout) else self.settings.timeout_s
            )
            return UpstreamTimeout(f"{where} did not answer in time ({kind} after {limit:g}s)")
        if isinstance(exc, httpx.HTTPError):
            detail = str(exc).replace(self._secret, "***") if self._secret else str(exc)
            return UpstreamError(f"{where} failed: {type(exc).__name__}: {detail[:_EXCERPT_CHARS]}")
        return UpstreamError(f"{where} failed: {type(exc).__name__}")


def _cause(exc: Exception) -> BaseException | None:
    """Keep transport exceptions as ``__cause__`` for debugging; drop internal markers."""
    return None if isinstance(exc, _StatusError | _Malformed) else exc


async def _chain(first: list[dict[str, Any]], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for ev in first:
        yield ev
    async for ev in rest:
        yield ev


async def _sse_events(resp: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
    """Parsed ``data:`` payloads of an SSE response; ``[DONE]`` becomes ``{"__done__": True}``.

    Multi-line ``data:`` fields are joined per the SSE spec; comments and
    other fields (``event:``, ``id:``) are ignored.  Resumed after ``[DONE]``,
    it drains the body without yielding, so the connection can be reused.  An ``{"error": ...}``
    payload mid-stream raises ``_Malformed`` with its message.
    """
    data: list[str] = []
    lines = resp.aiter_lines()
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
            continue
        if line or not data:
            continue
        payload = "\n".join(data)
        data.clear()
        if payload.strip() == "[DONE]":
            yield {"__done__": True}
            async for _ in lines:  # resumed only to drain: nothing follows [DONE]
                pass
            return
        yield _decode_event(payload)
    if data:  # the last event was not followed by a blank line
        payload = "\n".join(data)
        yield {"__done__": True} if payload.strip() == "[DONE]" else _decode_event(payload)


def _decode_event(payload: str) -> dict[str, Any]:
    try:
        ev = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise _Malformed(f"invalid JSON in stream event: {' '.join(payload.split())[:80]}") from None
    if not isinstance(ev, dict):
        raise _Malformed("stream event is not a JSON object")
    if "error" in ev and "choices" not in ev:
        err = ev["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise _Malformed(f"error event in stream: {' '.join(str(msg).split())[:_EXCERPT_CHARS]}")
    return ev


def _has_content(ev: dict[str, Any]) -> bool:
    choices = ev.get("choices")
    if not choices:
        return False
    delta = choices[0].get("delta") or {}
    return bool(delta.get("content"))


def _parse_chunk(ev: dict[str, Any]) -> tuple[str, str | None, Usage | None]:
    """(delta text, finish_reason, usage) of one ``chat.completion.chunk``."""
    try:
        usage = _parse_usage(ev.get("usage"))
        choices = ev.get("choices") or []
        if not choices:
            return "", None, usage
        c = choices[0]
        delta = c.get("delta") or {}
        text = delta.get("content") or ""
        if not isinstance(text, str):
            raise TypeError("delta.content is not a string")
        return text, c.get("finish_reason"), usage
    except (AttributeError, TypeError, IndexError) as exc:
        raise _Malformed(f"unexpected stream chunk shape ({exc})") from None


def _parse_usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    try:
        return Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
    except (TypeError, ValueError):
        return None


def _estimate_prompt_tokens(messages: list[Message]) -> int:
    """Rough prompt size (≈4 characters per token) when the server reports no usage."""
    return sum(len(m.get("content") or "") for m in messages) // 4
