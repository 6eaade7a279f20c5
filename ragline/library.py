"""The library surface ``AsyncRAG`` inherits beyond the query flow: batch queries (``ask_many``) and
``@rag.cached`` (:mod:`ragline.cache.functions`), kept here so the pipeline module stays about the flow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar, overload

from ragline.cache.functions import CachedFunction, FunctionCache, bind_default, cached, unbind_default
from ragline.errors import ConfigError, InvalidInput
from ragline.types import DEFAULT_TENANT, Answer, CacheMode, Message, Query

if TYPE_CHECKING:
    from ragline.cache.layer import CacheLayer
    from ragline.infra.admission import Admission

__all__ = ["MAX_CONCURRENT", "CachedFunction", "LibrarySurface", "run_many"]

T = TypeVar("T")
R = TypeVar("R")

MAX_CONCURRENT: Final = 1024
"""Upper bound of ``ask_many(max_concurrent=...)``."""


async def run_many(
    call: Callable[[T], Awaitable[R]], items: Sequence[T], max_concurrent: int, return_exceptions: bool
) -> list[Any]:
    """``call`` over ``items``, at most ``max_concurrent`` at once, results in input order.

    ``return_exceptions=False``: the first failure cancels the calls in flight, starts no more, and is
    raised.  ``True``: each failure (an ``Exception``) takes its item's place in the results."""
    if not isinstance(max_concurrent, int) or not 1 <= max_concurrent <= MAX_CONCURRENT:
        raise InvalidInput(f"max_concurrent must be an integer from 1 to {MAX_CONCURRENT}, got {max_concurrent!r}")
    results: list[Any] = [None] * len(items)
    pending = iter(enumerate(items))  # shared by the workers: each takes the next item when free

    async def worker() -> None:
        for i, item in pending:
            try:
                results[i] = await call(item)
            except Exception as exc:
                if not return_exceptions:
                    raise
                results[i] = exc

    workers = [asyncio.ensure_future(worker()) for _ in range(min(max_concurrent, len(items)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    return results


class _Pipeline(Protocol):
    """What the mixin needs of ``AsyncRAG``."""

    cache: CacheLayer | None
    ready: bool
    admission: Admission
    _functions: FunctionCache | None

    async def ask(
        self,
        query: str | Query,
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        history: Sequence[Message] = (),
        cache_mode: CacheMode = "default",
    ) -> Answer: ...


class LibrarySurface:
    """``ask_many``, ``cached`` and ``function_cache`` of :class:`~ragline.pipeline.AsyncRAG`."""

    _functions: FunctionCache | None = None

    @overload
    async def ask_many(
        self: _Pipeline,
        queries: Iterable[str | Query],
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        max_concurrent: int | None = None,
        cache_mode: CacheMode = "default",
        return_exceptions: Literal[False] = False,
    ) -> list[Answer]: ...

    @overload
    async def ask_many(
        self: _Pipeline,
        queries: Iterable[str | Query],
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        max_concurrent: int | None = None,
        cache_mode: CacheMode = "default",
        return_exceptions: Literal[True],
    ) -> list[Answer | Exception]: ...

    async def ask_many(
        self: _Pipeline,
        queries: Iterable[str | Query],
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        max_concurrent: int | None = None,
        cache_mode: CacheMode = "default",
        return_exceptions: bool = False,
    ) -> list[Answer] | list[Answer | Exception]:
        """``ask`` each query (a str, or a ``Query`` with its own k/tenant/history), at most
        ``max_concurrent`` at once (default: the admission limit, ``limits.max_concurrent_work``, so a batch
        alone never queues past it), answers in input order.  Identical queries in flight share one
        computation (single-flight), repeated ones are cache hits.  Errors: by default the first one
        (e.g. ``InvalidInput`` for an empty query) cancels the rest and is raised; with
        ``return_exceptions=True`` each failed query's exception stands in its place in the list."""
        items = list(queries)
        limit = self.admission.limit if max_concurrent is None else max_concurrent
        return await run_many(lambda q: self.ask(q, k, tenant, cache_mode=cache_mode), items, limit, return_exceptions)

    # -- @rag.cached ---------------------------------------------------------------------
    def cached(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        ttl: float | None = None,
        tenant: str | Callable[..., str] = DEFAULT_TENANT,
        key: Callable[..., object] | None = None,
        version: str = "",
    ) -> Any:
        """``@rag.cached(ttl=...)``: :func:`ragline.cached` on this pipeline's tiers."""
        wrap = cached(ttl=ttl, tenant=tenant, key=key, rag=self, version=version)
        return wrap(fn) if fn is not None else wrap

    @property
    def function_cache(self: _Pipeline) -> FunctionCache | None:
        """The tiers ``@cached`` functions of this pipeline use (None: ``cache.enabled`` is false)."""
        if not self.ready:
            raise ConfigError("this RAG is not started: `async with AsyncRAG(...)` or `await rag.start()` first")
        return self._functions

    async def _start_cache(self: _Pipeline) -> None:
        """On start (in the pipeline's loop): start the cache; its tiers become ``@ragline.cached``'s default."""
        if self.cache is not None:
            await self.cache.start()
            fc = FunctionCache.of_layer(self.cache)
            fc.loop = asyncio.get_running_loop()
            self._functions = fc
            bind_default(fc)

    def _unbind_functions(self: _Pipeline) -> None:
        fc, self._functions = self._functions, None
        if fc is not None:
            fc.closed = True
            unbind_default(fc)
