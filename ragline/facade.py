"""The synchronous facade: :class:`RAG` runs an :class:`~ragline.pipeline.AsyncRAG` on its own event
loop in a thread, for scripts and notebooks that do not use asyncio.

Every public method of ``AsyncRAG`` has a blocking twin here with the same name and arguments (``aclose``
is ``close``; ``ask_stream`` yields events as a plain iterator); ``tests/unit/test_library.py`` keeps the two
in step.  ``rag.aio`` is the AsyncRAG itself, for what has no method (``jobs``, ``admission``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ragline.cache.functions import FunctionCache, cached
from ragline.cache.layer import CacheLayer
from ragline.config import Settings
from ragline.embed.base import Embedder
from ragline.ingest.chunking import Chunker
from ragline.llm.base import LLM
from ragline.pipeline import AsyncRAG, Progress
from ragline.results import Event, Timings
from ragline.store.base import Store
from ragline.types import (
    DEFAULT_TENANT,
    Answer,
    CacheInfo,
    CacheMode,
    Document,
    Hit,
    IngestReport,
    Message,
    Query,
    Retrieval,
    Vectors,
)

T = TypeVar("T")

__all__ = ["RAG"]


class RAG:
    """Synchronous facade over AsyncRAG, running its own event loop in a thread."""

    def __init__(self, settings: Settings | None = None, **components: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ragline-loop", daemon=True)
        self._thread.start()
        self.aio = AsyncRAG(settings, **components)
        self._run(self.aio.start())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> RAG:
        """Already done by the constructor (idempotent, as AsyncRAG.start)."""
        self._run(self.aio.start())
        return self

    # -- components and settings, as on AsyncRAG --------------------------------------------
    @property
    def settings(self) -> Settings:
        return self.aio.settings

    @property
    def cache(self) -> CacheLayer | None:
        return self.aio.cache

    @property
    def ready(self) -> bool:
        return self.aio.ready

    @property
    def embedder(self) -> Embedder:
        return self.aio.embedder

    @property
    def store(self) -> Store:
        return self.aio.store

    @property
    def llm(self) -> LLM:
        return self.aio.llm

    @property
    def chunker(self) -> Chunker:
        return self.aio.chunker

    @property
    def function_cache(self) -> FunctionCache | None:
        return self.aio.function_cache

    # -- writes ------------------------------------------------------------------------------
    def ingest(
        self, docs: Iterable[Document], tenant: str = DEFAULT_TENANT, progress: Progress | None = None
    ) -> IngestReport:
        return self._run(self.aio.ingest(docs, tenant, progress))

    def ingest_paths(
        self, paths: Sequence[str | Path], tenant: str = DEFAULT_TENANT, progress: Progress | None = None
    ) -> IngestReport:
        return self._run(self.aio.ingest_paths(paths, tenant, progress))

    def delete(self, doc_ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[str]:
        return self._run(self.aio.delete(doc_ids, tenant))

    def catch_up(self) -> None:
        self._run(self.aio.catch_up())

    def invalidate(
        self, *, tenant: str | None = None, doc_id: str | None = None, key: str | None = None, everything: bool = False
    ) -> int:
        return self._run(self.aio.invalidate(tenant=tenant, doc_id=doc_id, key=key, everything=everything))

    def upstreams(self) -> dict[str, Any]:
        return self._run(self.aio.upstreams())

    def stats(self, tenant: str | None = None) -> dict[str, int]:
        return self.aio.stats(tenant)

    # -- reads -------------------------------------------------------------------------------
    def search(
        self,
        query: str | Query,
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        doc_level: bool = False,
        mmr: bool | None = False,
        timings: Timings | None = None,
        cache_mode: CacheMode = "default",
    ) -> list[Hit]:
        return self._run(
            self.aio.search(query, k, tenant, doc_level=doc_level, mmr=mmr, timings=timings, cache_mode=cache_mode)
        )

    def retrieve(
        self,
        query: str | Query,
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        doc_level: bool = False,
        mmr: bool | None = None,
        candidates: int | None = None,
        timings: Timings | None = None,
        cache_mode: CacheMode = "default",
        qvec: Vectors | None = None,
    ) -> Retrieval:
        return self._run(
            self.aio.retrieve(query, k, tenant, doc_level=doc_level, mmr=mmr, candidates=candidates,
                              timings=timings, cache_mode=cache_mode, qvec=qvec)
        )  # fmt: skip

    def embed_query(self, query: str, tenant: str = DEFAULT_TENANT, timings: Timings | None = None) -> Vectors:
        return self._run(self.aio.embed_query(query, tenant, timings))

    def ask(
        self,
        query: str | Query,
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        history: Sequence[Message] = (),
        cache_mode: CacheMode = "default",
    ) -> Answer:
        return self._run(self.aio.ask(query, k, tenant, history=history, cache_mode=cache_mode))

    def ask_body(
        self,
        query: str | Query,
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        history: Sequence[Message] = (),
        cache_mode: CacheMode = "default",
        timings: Timings | None = None,
    ) -> tuple[bytes, CacheInfo]:
        return self._run(self.aio.ask_body(query, k, tenant, history=history, cache_mode=cache_mode, timings=timings))

    def ask_many(
        self,
        queries: Iterable[str | Query],
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        max_concurrent: int | None = None,
        cache_mode: CacheMode = "default",
        return_exceptions: bool = False,
    ) -> list[Any]:
        """AsyncRAG.ask_many, blocking: answers in input order (errors as documented there)."""
        return self._run(
            self.aio.ask_many(queries, k, tenant, max_concurrent=max_concurrent, cache_mode=cache_mode,
                              return_exceptions=return_exceptions)  # type: ignore[call-overload]
        )  # fmt: skip

    def ask_stream(
        self,
        query: str | Query,
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        history: Sequence[Message] = (),
        cache_mode: CacheMode = "default",
    ) -> Iterator[Event]:
        """The events of AsyncRAG.ask_stream as a plain iterator.  Bad input raises here, before the
        first event; leaving the loop early (``break``) stops the generation unless another caller shares it."""
        events = self._run(self.aio.ask_stream(query, k, tenant, history=history, cache_mode=cache_mode))
        return self._iterate(events)

    def _iterate(self, events: AsyncIterator[Event]) -> Iterator[Event]:
        closer = getattr(events, "aclose", None)
        try:
            while True:
                try:
                    yield self._run(_next(events))
                except StopAsyncIteration:
                    return
        finally:
            if closer is not None and self._loop.is_running():
                self._run(closer())

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

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.aio.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> RAG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _next(events: AsyncIterator[Event]) -> Event:
    return await events.__anext__()
