"""AsyncRAG: the only place that composes components; RAG is its sync facade.

Query flow (DESIGN.md §2): validate → embed query (micro-batched) → hybrid
retrieval → context packing → generation → answer.  Ingest flow: load →
validate → skip unchanged documents (content hash) → chunk → embed only new
chunk texts (vectors of unchanged chunks are reused) → one atomic upsert per
batch, with the next batch's embedding overlapped with the previous upsert.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ragline import metrics, plugins
from ragline.config import EmbedderSettings, Settings
from ragline.context import pack, trim_history
from ragline.embed.base import Embedder, Vectors
from ragline.embed.batcher import MicroBatcher
from ragline.embed.local import resolve_model_dir
from ragline.errors import InvalidInput, NotFound, PayloadTooLarge
from ragline.ingest.chunking import Chunker, doc_hash
from ragline.ingest.loaders import iter_documents, validate_document
from ragline.llm.base import LLM, GenParams, Message
from ragline.llm.prompt import build_messages
from ragline.retrieve import HybridRetriever, Retrieval
from ragline.store.base import Store
from ragline.types import DEFAULT_TENANT, Answer, Chunk, Document, Hit, IngestReport, Usage

T = TypeVar("T")
Progress = Callable[[int], None]
"""Called with the number of documents just processed (for progress bars)."""

_INGEST_BATCH_CHUNKS = 256


class AsyncRAG:
    """The whole pipeline in-process.  Components are built from ``Settings``
    through the plugin registry unless passed in (tests, custom wiring)."""

    def __init__(self, settings: Settings | None = None, *, embedder: Embedder | None = None,
                 llm: LLM | None = None, store: Store | None = None) -> None:
        self.settings = settings or Settings.load()
        self._embedder = embedder
        self._llm = llm
        self._store = store
        self._chunker: Chunker | None = None
        self._batcher: MicroBatcher | None = None
        self._retriever: HybridRetriever | None = None
        self._start_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self.ready = False

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> AsyncRAG:
        """Load the model and open the store (idempotent; the server calls it at start-up)."""
        if self.ready:
            return self
        async with self._start_lock:
            if not self.ready:
                await asyncio.to_thread(self._build)
                self.ready = True
                self._update_gauges()
        return self

    def _build(self) -> None:
        s = self.settings
        if self._embedder is None:
            self._embedder = plugins.load("ragline.embedders", s.embedder.provider)(s.embedder)
        emb = self._embedder
        tok = getattr(emb, "tokenizer_file", None)
        # Chunk with the embedder's own tokenizer; remote embedders fall back to MiniLM's.
        model_dir = Path(tok).parent if tok is not None else resolve_model_dir(EmbedderSettings().model)
        self._chunker = Chunker.from_model_dir(model_dir, s.chunk)
        if self._store is None:
            factory = plugins.load("ragline.stores", s.store)
            self._store = factory(s.data_dir, emb.dim)
        if self._llm is None:
            self._llm = plugins.load("ragline.llms", s.llm.provider)(s.llm)
        self._batcher = MicroBatcher(emb, max_batch=s.embedder.batch_size,
                                     max_wait_ms=s.embedder.micro_batch_wait_ms)
        self._retriever = HybridRetriever(self._store, s.retrieval)

    async def aclose(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()
        if self._llm is not None:
            await self._llm.aclose()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
        self.ready = False

    async def __aenter__(self) -> AsyncRAG:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def embedder(self) -> Embedder:
        assert self._embedder is not None, "call start() first"
        return self._embedder

    @property
    def store(self) -> Store:
        assert self._store is not None, "call start() first"
        return self._store

    @property
    def llm(self) -> LLM:
        assert self._llm is not None, "call start() first"
        return self._llm

    @property
    def chunker(self) -> Chunker:
        assert self._chunker is not None, "call start() first"
        return self._chunker

    # -- validation ----------------------------------------------------------
    def _check_query(self, query: str, k: int | None) -> int:
        lim = self.settings.limits
        if not isinstance(query, str) or not query.strip():
            raise InvalidInput("query is empty: send a non-empty 'query' string")
        if len(query) > lim.max_query_chars:
            raise PayloadTooLarge(f"query has {len(query)} characters; the limit is {lim.max_query_chars}")
        k = self.settings.retrieval.k if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= lim.max_k:
            raise InvalidInput(f"k must be an integer between 1 and {lim.max_k}, got {k!r}")
        return k

    # -- ingest ----------------------------------------------------------------
    async def ingest(self, docs: Iterable[Document], tenant: str = DEFAULT_TENANT,
                     progress: Progress | None = None) -> IngestReport:
        """Upsert documents by id; unchanged ones cost a hash, changed ones replace their chunks."""
        await self.start()
        counts = {"documents": 0, "added": 0, "updated": 0, "unchanged": 0,
                  "chunks_added": 0, "chunks_removed": 0, "chunks_embedded": 0}
        async with self._write_lock:
            pending: asyncio.Task[None] | None = None
            for batch in _doc_batches(docs, self.chunker, self.settings, _INGEST_BATCH_CHUNKS):
                prepared = await self._prepare(batch, tenant, counts)
                if pending is not None:
                    await pending
                pending = asyncio.create_task(self._commit(tenant, prepared, len(batch), progress))
            if pending is not None:
                await pending
        self._update_gauges()
        return IngestReport(**counts)

    async def ingest_paths(self, paths: Sequence[str | Path], tenant: str = DEFAULT_TENANT,
                           progress: Progress | None = None) -> IngestReport:
        """Ingest files and folders (txt, md, html, pdf, BEIR jsonl)."""
        await self.start()
        return await self.ingest(iter_documents(paths, self.settings.limits), tenant, progress)

    async def _prepare(self, batch: list[tuple[Document, str, list[Chunk]]], tenant: str,
                       counts: dict[str, int]) -> list[tuple[Document, str, list[Chunk], Vectors]]:
        """Drop unchanged documents, reuse known vectors, embed the rest once per unique text."""
        store = self.store
        states = await asyncio.to_thread(store.doc_state, tenant, [d.id for d, _, _ in batch])
        changed: list[tuple[Document, str, list[Chunk]]] = []
        old_chunk_ids: list[str] = []
        for doc, h, chunks in batch:
            counts["documents"] += 1
            st = states.get(doc.id)
            if st is not None and st.content_hash == h:
                counts["unchanged"] += 1
                metrics.INGESTED.labels("unchanged").inc()
                continue
            if st is not None:
                counts["updated"] += 1
                counts["chunks_removed"] += len(st.chunk_ids)
                old_chunk_ids.extend(st.chunk_ids)
                metrics.INGESTED.labels("updated").inc()
            else:
                counts["added"] += 1
                metrics.INGESTED.labels("added").inc()
            changed.append((doc, h, chunks))
        known: dict[str, Vectors] = {}
        if old_chunk_ids:
            old = await asyncio.to_thread(store.chunks, tenant, old_chunk_ids)
            ids = list(old)
            vecs = await asyncio.to_thread(store.vectors, tenant, ids)
            known = {old[c].content_hash: vecs[i] for i, c in enumerate(ids)}
        todo: dict[str, str] = {}
        for _, _, chunks in changed:
            for ch in chunks:
                if ch.content_hash not in known:
                    todo.setdefault(ch.content_hash, ch.index_text)
        if todo:
            vecs = await asyncio.to_thread(self.embedder.embed, list(todo.values()))
            metrics.EMBEDDED.inc(len(todo))
            counts["chunks_embedded"] += len(todo)
            known.update(zip(todo.keys(), vecs, strict=True))
        out = []
        for doc, h, chunks in changed:
            counts["chunks_added"] += len(chunks)
            vec = (np.stack([known[c.content_hash] for c in chunks]) if chunks
                   else np.zeros((0, self.embedder.dim), np.float32))
            out.append((doc, h, chunks, vec))
        return out

    async def _commit(self, tenant: str, prepared: list[tuple[Document, str, list[Chunk], Vectors]],
                      n_docs: int, progress: Progress | None) -> None:
        if prepared:
            await asyncio.to_thread(self.store.upsert, tenant, prepared)
        if progress is not None:
            progress(n_docs)

    async def delete(self, doc_ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[str]:
        """Delete documents by id; NotFound if none of them exists. Returns removed chunk ids."""
        await self.start()
        if not doc_ids:
            raise InvalidInput("no document ids given")
        async with self._write_lock:
            states = await asyncio.to_thread(self.store.doc_state, tenant, list(doc_ids))
            missing = [d for d in doc_ids if d not in states]
            if len(missing) == len(doc_ids):
                raise NotFound(f"no document with id {missing[0]!r}" if len(missing) == 1
                               else f"none of the {len(missing)} document ids exist")
            removed = await asyncio.to_thread(self.store.delete, tenant, list(states))
        self._update_gauges()
        return removed

    def _update_gauges(self) -> None:
        if self._store is not None:
            st = self._store.stats()
            metrics.DOCUMENTS.set(st["documents"])
            metrics.CHUNKS.set(st["chunks"])

    # -- query -------------------------------------------------------------------
    async def embed_query(self, query: str, timings: dict[str, float] | None = None) -> Vectors:
        await self.start()
        assert self._batcher is not None
        with metrics.stage("embed", timings):
            return (await self._batcher.embed([query]))[0]

    async def retrieve(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, *,
                       doc_level: bool = False, mmr: bool | None = None, candidates: int | None = None,
                       timings: dict[str, float] | None = None) -> Retrieval:
        k = self._check_query(query, k)
        qvec = await self.embed_query(query, timings)
        assert self._retriever is not None
        with metrics.stage("retrieve", timings):
            return await self._retriever.retrieve(tenant, query, qvec, k, use_mmr=mmr,
                                                  doc_level=doc_level, candidates=candidates)

    async def search(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, *,
                     doc_level: bool = False, mmr: bool | None = False,
                     timings: dict[str, float] | None = None) -> list[Hit]:
        """Hybrid search; plain RRF order unless ``mmr`` (search is for ranking, not context)."""
        r = await self.retrieve(query, k, tenant, doc_level=doc_level, mmr=mmr, timings=timings)
        return r.hits

    async def _context(self, query: str, k: int | None, tenant: str, history: Sequence[Message],
                       timings: dict[str, float]) -> tuple[list[Hit], list[Message]]:
        r = await self.retrieve(query, k, tenant, timings=timings)
        s = self.settings.context
        count = self.chunker.count_tokens
        with metrics.stage("context", timings):
            vecs = (await asyncio.to_thread(self.store.vectors, tenant, [h.chunk_id for h in r.hits])
                    if r.hits else None)
            sources = pack(r.hits, count, s.token_budget, s.max_sources, vecs, s.near_duplicate)
            hist = trim_history(_check_history(history, self.settings.limits.max_history_messages),
                                count, s.token_budget // 2, s.history_turns)
            messages = build_messages(query, sources, hist)
        return sources, messages

    def gen_params(self) -> GenParams:
        s = self.settings.llm
        return GenParams(model=s.model, temperature=s.temperature, max_tokens=s.max_tokens, top_p=s.top_p)

    async def ask(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, *,
                  history: Sequence[Message] = ()) -> Answer:
        """Retrieve, pack, generate: a cited answer whose sources are numbered as cited."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        sources, messages = await self._context(query, k, tenant, history, timings)
        with metrics.stage("generate", timings):
            done = await self.llm.complete(messages, self.gen_params())
        metrics.LLM_TOKENS.labels("prompt").inc(done.usage.prompt_tokens)
        metrics.LLM_TOKENS.labels("completion").inc(done.usage.completion_tokens)
        timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
        return Answer(done.text, tuple(sources), done.usage, timings, model=done.model)

    async def ask_stream(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, *,
                         history: Sequence[Message] = ()) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events: ("sources", {...}) first, then ("delta", {"text"}) …, then ("done", {...}).

        Validation and retrieval happen before the first event, so bad input
        raises instead of producing a broken stream.
        """
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        sources, messages = await self._context(query, k, tenant, history, timings)
        return self._stream_events(sources, messages, timings, t0)

    async def _stream_events(self, sources: list[Hit], messages: list[Message], timings: dict[str, float],
                             t0: float) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "sources", {"sources": [h.to_dict() for h in sources]}
        usage = Usage()
        model = self.llm.id
        tg = time.perf_counter()
        first = True
        async for piece in self.llm.stream(messages, self.gen_params()):
            if first:
                timings["first_token"] = round((time.perf_counter() - tg) * 1000, 3)
                first = False
            if piece.delta:
                yield "delta", {"text": piece.delta}
            if piece.usage is not None:
                usage = piece.usage
        timings["generate"] = round((time.perf_counter() - tg) * 1000, 3)
        timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
        metrics.LLM_TOKENS.labels("prompt").inc(usage.prompt_tokens)
        metrics.LLM_TOKENS.labels("completion").inc(usage.completion_tokens)
        yield "done", {"usage": usage.to_dict(), "timings": timings, "model": model,
                       "cache": {"kind": "miss", "tier": None, "similarity": None, "matched_query": None}}

    def stats(self, tenant: str | None = None) -> dict[str, int]:
        return self.store.stats(tenant)


def _check_history(history: Sequence[Message], limit: int) -> list[Message]:
    if len(history) > limit:
        raise PayloadTooLarge(f"history has {len(history)} messages; the limit is {limit}")
    out: list[Message] = []
    for i, m in enumerate(history):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise InvalidInput(f"history[{i}] must be {{'role': 'user'|'assistant', 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _doc_batches(docs: Iterable[Document], chunker: Chunker, settings: Settings,
                 max_chunks: int) -> Iterator[list[tuple[Document, str, list[Chunk]]]]:
    """Validate, hash and chunk documents, in batches of about ``max_chunks`` chunks.

    Documents are tokenized in groups (one ``encode_batch`` call each).  A
    document id repeated within a batch is kept once: the last version wins.
    """
    batch: dict[str, tuple[Document, str, list[Chunk]]] = {}
    n = 0
    group: list[Document] = []

    def flush_group() -> None:
        nonlocal n
        for doc, chunks in zip(group, chunker.chunk_many(group), strict=True):
            if doc.id in batch:
                n -= len(batch[doc.id][2])
            batch[doc.id] = (doc, doc_hash(doc), chunks)
            n += len(chunks)
        group.clear()

    for doc in docs:
        validate_document(doc, settings.limits)
        group.append(doc)
        if len(group) >= 64:
            flush_group()
            if n >= max_chunks:
                yield list(batch.values())
                batch, n = {}, 0
    flush_group()
    if batch:
        yield list(batch.values())


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

    def search(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT,
               doc_level: bool = False) -> list[Hit]:
        return self._run(self.aio.search(query, k, tenant, doc_level=doc_level))

    def ask(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT,
            history: Sequence[Message] = ()) -> Answer:
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
