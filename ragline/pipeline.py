"""AsyncRAG: lifecycle plus the query flow of DESIGN.md §2 (one method per step); RAG is its sync facade.

Steps: 1 exact answer cache and 2 single-flight (``CacheLayer``), 3 ``CachedEmbedder``, 4 ``CachedRetriever``,
5 context packing, 6 semantic cache, 7 ``CachedLLM`` (completed or streamed), 8 answer + dependency record
(``cache.invalidation``).  ``ask``, ``ask_body`` and ``ask_stream`` share every step but how 7 is delivered.
The write path is ``ingest.indexer.Indexer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from ragline import metrics
from ragline.assembly import load_components, multi_query, term_clock, update_gauges, upstreams_of
from ragline.cache.invalidation import CachedRetriever, Invalidation
from ragline.cache.layer import CacheLayer
from ragline.codec import (
    CACHE_BYPASS,
    CACHE_L1,
    CACHE_MISS,
    answer_body,
)
from ragline.codec import exact as _exact_info
from ragline.config import Settings
from ragline.context import pack, trim_history
from ragline.embed.base import Embedder
from ragline.embed.cached import CachedEmbedder
from ragline.errors import InvalidInput
from ragline.infra.admission import Admission
from ragline.ingest.chunking import Chunker
from ragline.ingest.follow import Follower
from ragline.ingest.indexer import Indexer, Progress
from ragline.ingest.jobs import JobManager
from ragline.ingest.loaders import iter_documents
from ragline.library import LibrarySurface
from ragline.llm.base import FALLBACK_FINISH, LLM
from ragline.llm.cached import CachedLLM
from ragline.llm.prompt import PROMPT_VERSION, build_messages
from ragline.results import Event, Generated, Result, Timings, generated, start_stream
from ragline.retrieve import HybridRetriever
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
from ragline.validate import build_query

__all__ = ["AsyncRAG", "CacheMode", "Progress", "Query", "exact_l1"]

T = TypeVar("T")


class _Started(Generic[T]):
    """A component of a started pipeline: ``rag.store`` reads ``rag._store``, which start() sets."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = "_" + name

    def __get__(self, obj: object, owner: type | None = None) -> T:
        value: T | None = getattr(obj, self.attr)
        assert value is not None, "call start() first"
        return value


Deliver = Callable[[Query, list[Hit], list[Message], Timings | None], Awaitable[Generated]]
"""Step 7: generate an answer from its context (``complete`` for ask, a stream for ask_stream)."""


class AsyncRAG(LibrarySurface):
    """The whole pipeline in-process.  Components are built from ``Settings``
    through the plugin registry unless passed in (tests, custom wiring); ``ask_many``, ``cached``: ``library``."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        embedder: Embedder | None = None,
        llm: LLM | None = None,
        store: Store | None = None,
    ) -> None:
        self.settings = settings or Settings.load()
        self._embedder = embedder
        self._llm = llm
        self._store = store
        self._chunker: Chunker | None = None
        self._retrieve_cached: CachedRetriever | None = None
        self._embed: CachedEmbedder | None = None
        self._generate: CachedLLM | None = None
        self._indexer: Indexer | None = None
        self._invalidation: Invalidation | None = None
        self._follower: Follower | None = None
        self._count_tokens: Callable[[str], int] = len
        self.cache: CacheLayer | None = None
        self._cache_answers = False  # deterministic generation only, unless cache.cache_nonzero_temperature
        self._default_k = self.settings.retrieval.k
        self._start_lock = asyncio.Lock()
        self._sync_lock = asyncio.Lock()
        self.ready = False
        self.admission = Admission.from_limits(self.settings.limits)  # embed, retrieve, pack of uncached requests
        self.jobs = JobManager(self.settings, self.ingest)  # background ingest; a server also calls jobs.start()

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> AsyncRAG:
        """Load the model and open the store (idempotent; the server calls it at start-up)."""
        if self.ready:
            return self
        async with self._start_lock:
            if not self.ready:
                await asyncio.to_thread(_wire, self)  # blocking: model load, store open
                await self._start_cache()  # and bind @ragline.cached's default tiers
                self.ready = True
                update_gauges(self._store)
        return self

    async def aclose(self, keep: Sequence[object] = ()) -> None:  # keep: components a hot reload took over
        await _close(self, keep)

    async def catch_up(self) -> None:
        """Apply what other processes committed to this corpus here (:mod:`ragline.ingest.follow`)."""
        if self._follower is not None:
            await self._follower.catch_up()

    async def __aenter__(self) -> AsyncRAG:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    embedder: _Started[Embedder] = _Started()
    store: _Started[Store] = _Started()
    llm: _Started[LLM] = _Started()
    chunker: _Started[Chunker] = _Started()

    # -- writes ----------------------------------------------------------------
    async def ingest(
        self, docs: Iterable[Document], tenant: str = DEFAULT_TENANT, progress: Progress | None = None
    ) -> IngestReport:
        """Upsert documents by id; unchanged ones cost a hash, changed ones replace their chunks."""
        await self.start()
        assert self._indexer is not None
        await self.catch_up()
        report = await self._indexer.ingest(docs, tenant, progress)
        await self.catch_up()  # other processes' changes applied while this one waited for the tenant
        update_gauges(self._store)
        return report

    async def ingest_paths(
        self, paths: Sequence[str | Path], tenant: str = DEFAULT_TENANT, progress: Progress | None = None
    ) -> IngestReport:
        """Ingest files and folders (txt, md, html, pdf, BEIR jsonl)."""
        return await self.ingest(iter_documents(paths, self.settings.limits), tenant, progress)

    async def delete(self, doc_ids: Sequence[str], tenant: str = DEFAULT_TENANT) -> list[str]:
        """Delete documents by id; NotFound if none of them exists. Returns removed chunk ids."""
        await self.start()
        assert self._indexer is not None
        await self.catch_up()
        removed = await self._indexer.delete(doc_ids, tenant)
        await self.catch_up()
        update_gauges(self._store)
        return removed

    async def upstreams(self) -> dict[str, Any]:
        """The gateways' view of their upstreams (``GET /v1/upstreams``; refreshes their gauges)."""
        return {"llm": await upstreams_of(self._llm), "embedder": await upstreams_of(self._embedder)}

    async def invalidate(
        self, *, tenant: str | None = None, doc_id: str | None = None, key: str | None = None, everything: bool = False
    ) -> int:
        """Manual invalidation: everything, one key, one tenant, or one document of a tenant."""
        await self.start()
        cache = self.cache
        if cache is None:
            return 0
        if (key is not None) + bool(everything) + (tenant is not None or doc_id is not None) != 1:
            raise InvalidInput("give exactly one of: all, key, tenant (optionally with doc_id)")
        t = tenant or DEFAULT_TENANT
        assert self._indexer is not None
        chunk_ids = await self._indexer.chunk_ids(t, doc_id) if doc_id is not None else None
        return await cache.invalidate(tenant=t, chunk_ids=chunk_ids, key=key, everything=everything)

    def stats(self, tenant: str | None = None) -> dict[str, int]:
        return self.store.stats(tenant)

    # -- search ------------------------------------------------------------------
    async def search(
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
        """Hybrid search; plain RRF order unless ``mmr`` (search is for ranking, not context)."""
        return (
            await self.retrieve(query, k, tenant, doc_level=doc_level, mmr=mmr, timings=timings, cache_mode=cache_mode)
        ).hits

    async def retrieve(
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
        """Hybrid retrieval, served from the retrieval cache when its dependencies are unchanged."""
        q = build_query(
            self.settings, query, k, tenant, (), cache_mode, timings is not None, doc_level, mmr, candidates
        )
        await self.start()
        await self.catch_up()
        async with self.admission.slot(), _computing(self.cache):
            return await self._retrieve(q, qvec, timings, q.cache_mode)

    # -- ask: the query flow (DESIGN.md §2) ----------------------------------------
    async def ask_body(
        self,
        query: str | Query,
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        history: Sequence[Message] = (),
        cache_mode: CacheMode = "default",
        timings: Timings | None = None,
    ) -> tuple[bytes, CacheInfo]:
        """The answer as pre-serialised JSON (answer, sources, usage, model) plus how it was served.
        An exact L1 hit is validation, a memoised key and a dict lookup: nothing is built or awaited."""
        cache, key, follower = self.cache, None, self._follower
        if follower is not None and follower.behind():
            await follower.catch_up()  # another process changed the corpus: its invalidations first
        if cache is not None and not history and cache_mode == "default" and self._cache_answers:
            # a query asked before was validated then: its memoised key and one L1 lookup
            key = cache.known_answer_key(tenant, query, self._default_k if k is None else k)
            body = cache.get_l1(key, tenant) if key is not None else None
            if body is not None:
                return body, CACHE_L1
        q = build_query(self.settings, query, k, tenant, history, cache_mode, timings is not None)
        if key is None:  # not seen before: build the key and look in L1 once
            key = self._answer_key(q)
            if key is not None and q.cache_mode == "default":
                body = self.cache.get_l1(key, q.tenant)  # type: ignore[union-attr]  # a key implies a cache
                if body is not None:
                    return body, CACHE_L1
        r = await self._answer(q, key, timings, self._complete, l1_checked=True)
        return r.body, r.info

    async def ask(
        self,
        query: str | Query,
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        history: Sequence[Message] = (),
        cache_mode: CacheMode = "default",
    ) -> Answer:
        """Retrieve, pack, generate: a cited answer whose sources are numbered as cited."""
        t0 = time.perf_counter()
        timings: Timings = {}
        q = build_query(self.settings, query, k, tenant, history, cache_mode)
        r = await self._answer(q, self._answer_key(q), timings, self._complete)
        timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
        return r.answer(timings)

    async def _answer(
        self, q: Query, key: str | None, t: Timings | None, deliver: Deliver, l1_checked: bool = False
    ) -> Result:
        """Steps 1–2; a miss runs steps 3–8 once per key, however many callers ask at once."""
        await self.start()
        await self.catch_up()
        cache = self.cache
        if key is None or cache is None:  # answers are not cached (no cache, bypass, sampling)
            return await self._miss(q, None, t, deliver)
        if q.cache_mode == "default":
            hit = await self._exact(key, q.tenant, skip_l1=l1_checked)  # 1 exact
            if hit is not None:
                return hit
        if q.cache_mode == "refresh":
            return await self._miss(q, key, t, deliver)
        return await cache.single_flight(
            key, functools.partial(self._miss, q, key, t, deliver), functools.partial(self._exact, key, q.tenant)
        )  # 2 single-flight

    async def _miss(self, q: Query, key: str | None, t: Timings | None, deliver: Deliver) -> Result:
        inv = self._invalidation
        gen = inv.generation(q.tenant) if inv is not None else (0, 0)
        async with self.admission.slot(), _computing(self.cache):  # CPU work: bounded (503 past capacity)
            qvec = await self.embed_query(q.text, q.tenant, t)  # 3 embed
            r = await self._retrieve(q, qvec, t, "bypass" if q.cache_mode == "bypass" else "default", key is None)  # 4
            sources, messages = await self._context(q.text, q.tenant, r.hits, q.history, t, r.vectors)  # 5
        dep = None
        if key is not None and inv is not None:
            dep = inv.record(key, q.tenant, q.text, qvec, r, [h.chunk_id for h in sources], q.k or 0, bool(q.mmr))
            if q.cache_mode == "default" and not q.history:
                hit = await self._semantic(q, key, qvec, sources, t)  # 6 semantic
                if hit is not None:  # stored under this query's key behind the response
                    await inv.put_behind(gen, key, hit.body, dep, semantic=True)
                    return hit
        fresh = await deliver(q, sources, messages, t)  # 7 generate
        body = answer_body(fresh.text, sources, fresh.usage, fresh.model, fresh.upstream)
        if dep is not None and inv is not None and fresh.complete:
            await inv.put(gen, dep.entry_key, body, dep, semantic=not q.history)  # 8 store
        return Result(body, CACHE_BYPASS if self.cache is not None and q.cache_mode == "bypass" else CACHE_MISS, fresh)

    # -- the steps ---------------------------------------------------------------------
    def _answer_key(self, q: Query) -> str | None:
        cache = self.cache
        if cache is None or q.cache_mode == "bypass" or not self._cache_answers:
            return None
        return cache.answer_key(q.tenant, q.raw or q.text, q.k or 0, q.history, q.canonical or None)

    async def _exact(self, key: str, tenant: str, skip_l1: bool = False) -> Result | None:
        """Step 1: the answer cache, L1 → L2 → L3; an entry a change marked is re-verified first."""
        cache, inv = self.cache, self._invalidation
        assert cache is not None and inv is not None
        if not skip_l1:
            body = cache.get_l1(key, tenant)
            if body is not None:
                return Result(body, CACHE_L1)
        found, tier = await inv.read(key, tenant, skip_l1=True)
        return Result(found, _exact_info(tier)) if found is not None else None

    async def embed_query(self, query: str, tenant: str = DEFAULT_TENANT, timings: Timings | None = None) -> Vectors:
        """Step 3: the query vector, from the embedding cache or the micro-batched model."""
        await self.start()
        assert self._embed is not None
        with metrics.stage("embed", timings):
            return await self._embed.embed_query(tenant, query)

    async def _retrieve(
        self, q: Query, qvec: Vectors | None, t: Timings | None, mode: CacheMode, keep: bool = True
    ) -> Retrieval:
        """Step 4: the retrieval cache (``mode``), else hybrid retrieval; ``keep``: store a fresh one."""
        assert self._retrieve_cached is not None
        vec = qvec if qvec is not None else functools.partial(self.embed_query, q.text, q.tenant, t)
        r = self._retrieve_cached.retrieve
        return await r(q.tenant, q.text, vec, q.k or 0, bool(q.mmr), q.doc_level, q.candidates, mode, t, keep=keep)

    async def _context(
        self, query: str, tenant: str, hits: list[Hit], history: Sequence[Message], t: Timings | None,
        vecs: Vectors | None = None,
    ) -> tuple[list[Hit], list[Message]]:  # fmt: skip
        """Step 5 (:func:`_pack_context`); ``vecs``: the hits' vectors, when retrieval has them."""
        build = functools.partial(_pack_context, self.settings, self._count_tokens, self.store, tenant, query, hits)
        with metrics.stage("context", t):
            if vecs is not None and not history:  # light, GIL-bound work: inline (see _pack_context)
                return build((), vecs)
            return await asyncio.to_thread(build, history, vecs)  # a store read, the history's texts to count

    async def _context_of(self, tenant: str, query: str, hits: list[Hit]) -> list[Hit]:
        """The context a fresh request without history would build (re-verification)."""
        return (await self._context(query, tenant, hits, (), None))[0]

    async def _semantic(
        self, q: Query, key: str, qvec: Vectors, sources: list[Hit], t: Timings | None
    ) -> Result | None:
        """Step 6: a verified answer to a different query that serves this one."""
        assert self.cache is not None
        with metrics.stage("semantic", t):
            match = await self.cache.semantic_match(q.tenant, q.text, qvec, [h.chunk_id for h in sources], exclude=key)
        if match is None:
            return None
        body, sim, matched = match
        metrics.SEMANTIC_SIMILARITY.observe(sim)
        return Result(body, CacheInfo("semantic", None, round(sim, 4), matched))

    async def _complete(self, q: Query, sources: list[Hit], messages: list[Message], t: Timings | None) -> Generated:
        """Step 7 for ask: one completion, through the LLM response cache."""
        assert self._generate is not None
        done = await self._generate.complete(q.tenant, messages, q.cache_mode, t)
        return generated(done, sources, done.finish_reason != FALLBACK_FINISH)

    # -- streaming ----------------------------------------------------------------------
    async def ask_stream(
        self,
        query: str | Query,
        k: int | None = None,
        tenant: str = DEFAULT_TENANT,
        *,
        history: Sequence[Message] = (),
        cache_mode: CacheMode = "default",
    ) -> AsyncIterator[Event]:
        """Events: ("sources", {...}), ("delta", {"text"}) …, ("done", {...}); the steps of ``ask``, single-flight
        included (a joined generation is replayed).  Validation, cache lookup and retrieval happen before this
        returns, so bad input raises instead of breaking a stream; only a completed generation is stored."""
        t0 = time.perf_counter()
        timings: Timings = {}
        q = build_query(self.settings, query, k, tenant, history, cache_mode)
        key = self._answer_key(q)
        return await start_stream(lambda send: self._answer(q, key, timings, functools.partial(self._stream, send)),
                                   timings, t0)  # fmt: skip

    async def _stream(
        self, send: Callable[[Event], None], q: Query, sources: list[Hit], messages: list[Message], t: Timings | None
    ) -> Generated:
        """Step 7 for ask_stream: the sources, then each delta as it arrives, go to ``send``."""
        assert self._generate is not None
        send(("sources", {"sources": [h.to_dict() for h in sources]}))
        done = await self._generate.stream_to(
            lambda text: send(("delta", {"text": text})), q.tenant, messages, q.cache_mode, t
        )
        return generated(done, sources, done.finish_reason in ("stop", "length"))


def exact_l1(rag: AsyncRAG, query: object, k: object, tenant: str = DEFAULT_TENANT) -> bytes | None:
    """The stored answer of a history-free query asked before (cache mode "default") if L1 holds it,
    as :meth:`AsyncRAG.ask_body` would serve it, without awaiting anything: the server's exact-hit
    fast path answers from it.  ``None`` (ask ``ask_body``) when it is not such a hit, or when another
    process changed the corpus since this one last caught up.  (A function: the class is at its size limit.)"""
    cache, follower = rag.cache, rag._follower
    if cache is None or not rag._cache_answers or (follower is not None and follower.behind()):
        return None
    key = cache.known_answer_key(tenant, query, rag._default_k if k is None else k)
    return cache.get_l1(key, tenant) if key is not None else None


def _wire(self: AsyncRAG) -> None:
    """Build every component from the settings (blocking: model load, store open)."""
    s = self.settings
    emb, self._chunker, self._store, self._llm = load_components(s, self._embedder, self._store, self._llm)
    self._embedder = emb
    expand = multi_query(s, lambda tenant, text: self.embed_query(text, tenant), lambda: self._generate)
    retriever = HybridRetriever(self._store, s.retrieval, expand)
    if s.cache.enabled:
        self.cache = CacheLayer(s, emb.dim, emb.id, self._llm.id, prompt_version=PROMPT_VERSION)
        # decided once, not per request (the exact-hit path reads a bool)
        self._cache_answers = self.cache.cacheable_llm(s.llm.temperature)
        self._invalidation = Invalidation(
            self.cache,
            retriever,
            self._context_of,
            self._store.analyze,
            mode=s.cache.invalidation,
            version=self._store.version,
            synced=self._store.synced_version,
        )
        self.cache.attach_clock(term_clock(self._store))
    self._retrieve_cached = CachedRetriever(retriever, self.cache, self._invalidation)
    e = s.embedder
    wait = e.micro_batch_wait_ms
    if wait is None:  # remote embedders (they have aembed) gather a wave; in-process ones never delay a query
        wait = 2.0 if getattr(emb, "aembed", None) is not None else 0.0
    self._embed = CachedEmbedder(emb, self.cache, max_batch=e.batch_size, max_wait_ms=wait, ingest_slice=e.ingest_slice)
    self._generate = CachedLLM(self._llm, self.cache, s.llm)
    self._indexer = Indexer(self._store, self._chunker, self._embed, s, self._invalidation, catch_up=self.catch_up)
    self._follower = Follower(self._store, self._invalidation, functools.partial(update_gauges, self._store))
    self._count_tokens = self._chunker.count_tokens  # memoised there, bounded in bytes


async def _close(self: AsyncRAG, keep: Sequence[object] = ()) -> None:
    """Close every component, except those in ``keep`` (taken over by a hot reload's new pipeline)."""

    def mine(component: object) -> bool:
        return component is not None and all(component is not k for k in keep)

    self._unbind_functions()
    await self.jobs.aclose()  # first: a running job's step lands before the store closes
    if self._embed is not None:
        await self._embed.aclose()
    if self._llm is not None and mine(self._llm):
        await self._llm.aclose()
    closer = getattr(self._embedder, "aclose", None) if mine(self._embedder) else None  # remote: connection pools
    if closer is not None:
        await closer()
    if self.cache is not None:
        await self.cache.close()
    if self._store is not None and mine(self._store):
        await asyncio.to_thread(self._store.close)
    self.ready = False


def _pack_context(
    settings: Settings,
    count: Callable[[str], int],
    store: Store,
    tenant: str,
    query: str,
    hits: list[Hit],
    history: Sequence[Message],
    vecs: Vectors | None,
) -> tuple[list[Hit], list[Message]]:
    """Step 5: drop near-duplicates, pack to the token budget, build the prompt.

    With the hits' vectors at hand and no history, this runs on the event loop: a few token counts
    (memoised per chunk text; at most ``max_sources`` uncounted texts of one chunk's size), dot
    products between the hits, and the prompt's strings.  It is pure Python that holds the GIL, so a
    worker thread would not let the loop run meanwhile; it would only add two thread wake-ups
    (measured on the 2-core host, paired per request: the context stage 0.62 → 0.47 ms with the
    vectors still read inline).  A store read or a history to count goes to a worker thread."""
    s = settings.context
    if vecs is None and hits:
        vecs = store.vectors(tenant, [h.chunk_id for h in hits])
    sources = pack(hits, count, s.token_budget, s.max_sources, vecs, s.near_duplicate)
    hist = trim_history(history, count, s.token_budget // 2, s.history_turns)
    return sources, build_messages(query, sources, hist)


def _computing(cache: CacheLayer | None) -> contextlib.AbstractAsyncContextManager[None]:
    """A request computing now: the cache's order-free writes wait for it (:mod:`ragline.cache.behind`)."""
    return cache.behind.foreground() if cache is not None else contextlib.nullcontext()
