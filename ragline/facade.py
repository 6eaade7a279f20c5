"""The synchronous facade: :class:`RAG` runs an :class:`~ragline.pipeline.AsyncRAG` on its own event
loop in a thread, for scripts and notebooks that do not use asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.types import DEFAULT_TENANT, Answer, Document, Hit, IngestReport, Message

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

    def ingest(self, docs: Iterable[Document], tenant: str = DEFAULT_TENANT) -> IngestReport:
        return self._run(self.aio.ingest(docs, tenant))

    def ingest_paths(self, paths: Sequence[str | Path], tenant: str = DEFAULT_TENANT) -> IngestReport:
        return self._run(self.aio.ingest_paths(paths, tenant))

    def delete(self, doc_ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[str]:
        return self._run(self.aio.delete(doc_ids, tenant))

    def search(
        self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, doc_level: bool = False
    ) -> list[Hit]:
        return self._run(self.aio.search(query, k, tenant, doc_level=doc_level))

    def ask(
        self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, history: Sequence[Message] = ()
    ) -> Answer:
        return self._run(self.aio.ask(query, k, tenant, history=history))

    def stats(self, tenant: str | None = None) -> dict[str, int]:
        return self.aio.stats(tenant)

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.aio.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> RAG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
