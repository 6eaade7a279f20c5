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
from typing import Any, Literal, TypeVar

import numpy as np
import orjson

from ragline import metrics, plugins
from ragline.cache.deps import DepRecord
from ragline.cache.layer import CacheLayer
from ragline.codec import (
    CACHE_BYPASS,
    CACHE_L1,
    CACHE_MISS,
    answer_body,
    answer_from_body,
    retrieval_from_bytes,
    retrieval_to_bytes,
)
from ragline.codec import exact as _exact
from ragline.config import EmbedderSettings, Settings
from ragline.context import pack, same_evidence, trim_history
from ragline.embed.base import Embedder, Vectors
from ragline.embed.batcher import MicroBatcher
from ragline.embed.local import resolve_model_dir
from ragline.errors import InvalidInput, NotFound, PayloadTooLarge
from ragline.ingest.chunking import Chunker, doc_hash
from ragline.ingest.loaders import iter_documents, validate_document
from ragline.llm.base import LLM, Completion, GenParams, Message
from ragline.llm.prompt import build_messages
from ragline.retrieve import HybridRetriever, Retrieval
from ragline.store.base import Store
from ragline.store.embedded import analyze
from ragline.types import DEFAULT_TENANT, Answer, CacheInfo, Chunk, Document, Hit, IngestReport, Usage

T = TypeVar("T")
CacheMode = Literal["default", "bypass", "refresh"]
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
        self.cache: CacheLayer | None = None
        self._cache_answers = False
        """Answers are cached only when generation is deterministic, unless the config allows more
        (``cache.cache_nonzero_temperature``): a sampled answer is one draw, not *the* answer (DESIGN.md §3.4)."""
        self._generation: dict[str, int] = {}
        """Per-tenant count of corpus changes, for results computed across a change."""
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
                if self.cache is not None:
                    await self.cache.start()
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
        if s.cache.enabled:
            self.cache = CacheLayer(s, emb.dim, emb.id, self._llm.id)
            # decided once, not per request (the exact-hit path reads a bool)
            self._cache_answers = self.cache.cacheable_llm(s.llm.temperature)

    async def aclose(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()
        if self._llm is not None:
            await self._llm.aclose()
        if self.cache is not None:
            await self.cache.close()
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
            pending_ids: set[str] = set()
            for batch in _doc_batches(docs, self.chunker, self.settings, _INGEST_BATCH_CHUNKS):
                ids = {d.id for d, _, _ in batch}
                if pending is not None and not pending_ids.isdisjoint(ids):
                    # the same document again: compare against what the pending commit writes
                    await pending
                    pending = None
                prepared, old_ids, same, old_terms = await self._prepare(batch, tenant, counts)
                if pending is not None:
                    await pending
                pending = asyncio.create_task(
                    self._commit(tenant, prepared, old_ids, same, old_terms, len(batch), progress))
                pending_ids = ids
            if pending is not None:
                await pending
        self._update_gauges()
        return IngestReport(**counts)  # type: ignore[arg-type]

    async def ingest_paths(self, paths: Sequence[str | Path], tenant: str = DEFAULT_TENANT,
                           progress: Progress | None = None) -> IngestReport:
        """Ingest files and folders (txt, md, html, pdf, BEIR jsonl)."""
        await self.start()
        return await self.ingest(iter_documents(paths, self.settings.limits), tenant, progress)

    async def _prepare(self, batch: list[tuple[Document, str, list[Chunk]]], tenant: str,
                       counts: dict[str, int]
                       ) -> tuple[list[tuple[Document, str, list[Chunk], Vectors]], list[str], set[str], set[str]]:
        """Drop unchanged documents, reuse known vectors, embed the rest once per unique text.

        Vectors come, cheapest first, from the replaced chunks of the same
        document, the embedding cache, then the model.  Returns the prepared
        documents, the chunk ids they replace, and the ids of replacing chunks
        identical to the chunk they replace (same id, text, title and metadata).
        Those are no change to any retrieval, so invalidation skips them: editing
        the end of a document leaves answers grounded in its start cached.  Last,
        the keyword terms of the replaced chunks that did change.
        """
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
        same: set[str] = set()
        removed_terms: set[str] = set()
        if old_chunk_ids:
            old = await asyncio.to_thread(store.chunks, tenant, old_chunk_ids)
            ids = list(old)
            vecs = await asyncio.to_thread(store.vectors, tenant, ids)
            known = {old[c].content_hash: vecs[i] for i, c in enumerate(ids)}
            for _, _, chunks in changed:
                for ch in chunks:
                    prev = old.get(ch.id)
                    if (prev is not None and prev.content_hash == ch.content_hash
                            and _json_eq(prev.metadata, ch.metadata)):
                        same.add(ch.id)
            if self.cache is not None:
                removed_terms = _terms(c for cid, c in old.items() if cid not in same)
        todo: dict[str, str] = {}
        for _, _, chunks in changed:
            for ch in chunks:
                if ch.content_hash not in known:
                    todo.setdefault(ch.content_hash, ch.index_text)
        if todo and self.cache is not None:
            texts = list(todo.values())
            hashes = list(todo)
            for i, v in (await self.cache.get_vectors(tenant, texts, self.embedder.dim)).items():
                known[hashes[i]] = v
                del todo[hashes[i]]
        if todo:
            texts = list(todo.values())
            vecs = await asyncio.to_thread(self.embedder.embed, texts)
            metrics.EMBEDDED.inc(len(todo))
            counts["chunks_embedded"] += len(todo)
            known.update(zip(todo.keys(), vecs, strict=True))
            if self.cache is not None:
                await self.cache.put_vectors(tenant, texts, vecs)
        out = []
        for doc, h, chunks in changed:
            counts["chunks_added"] += len(chunks)
            vec = (np.stack([known[c.content_hash] for c in chunks]) if chunks
                   else np.zeros((0, self.embedder.dim), np.float32))
            out.append((doc, h, chunks, vec))
        return out, old_chunk_ids, same, removed_terms

    async def _commit(self, tenant: str, prepared: list[tuple[Document, str, list[Chunk], Vectors]],
                      old_ids: list[str], same: set[str], old_terms: set[str], n_docs: int,
                      progress: Progress | None) -> None:
        if prepared:
            await asyncio.to_thread(self.store.upsert, tenant, prepared)
            added = [(c, v) for _, _, cs, vs in prepared for c, v in zip(cs, vs, strict=True) if c.id not in same]
            await self._invalidate(tenant, [c for c in old_ids if c not in same], [c for c, _ in added],
                                   np.stack([v for _, v in added]) if added else None, old_terms)
        if progress is not None:
            progress(n_docs)

    async def _invalidate(self, tenant: str, removed: list[str], added: list[Chunk],
                          vectors: Vectors | None, removed_terms: set[str]) -> None:
        """Drop exactly the cached entries this change could alter (DESIGN.md §3.1)."""
        cache = self.cache
        if cache is None:
            return
        self._generation[tenant] = self._generation.get(tenant, 0) + 1
        if self.settings.cache.invalidation == "flush":
            n = await cache.flush_results(tenant)
            metrics.INVALIDATIONS.labels("flush").inc(n)
            return
        with metrics.stage("invalidate"):
            report = await cache.on_change(tenant, removed, vectors, removed_terms | _terms(added), self._reverify)
        for cause, n in report.causes.items():
            metrics.INVALIDATIONS.labels(cause).inc(n)

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
            ids = [c for st in states.values() for c in st.chunk_ids]
            gone = await asyncio.to_thread(self.store.chunks, tenant, ids) if self.cache is not None else {}
            removed = await asyncio.to_thread(self.store.delete, tenant, list(states))
            await self._invalidate(tenant, removed, [], None, _terms(gone.values()))
        self._update_gauges()
        return removed

    def _update_gauges(self) -> None:
        if self._store is not None:
            st = self._store.stats()
            metrics.DOCUMENTS.set(st["documents"])
            metrics.CHUNKS.set(st["chunks"])

    # -- query -------------------------------------------------------------------
    async def embed_query(self, query: str, tenant: str = DEFAULT_TENANT,
                          timings: dict[str, float] | None = None) -> Vectors:
        """The query vector: embedding cache first, then the micro-batched model."""
        await self.start()
        assert self._batcher is not None
        with metrics.stage("embed", timings):
            cache = self.cache
            if cache is not None:
                hit = await cache.get_vectors(tenant, [query], self.embedder.dim)
                if 0 in hit:
                    return hit[0]
            vec: Vectors = (await self._batcher.embed([query]))[0]
            if cache is not None:
                await cache.put_vectors(tenant, [query], vec.reshape(1, -1))
            return vec

    async def retrieve(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, *,
                       doc_level: bool = False, mmr: bool | None = None, candidates: int | None = None,
                       timings: dict[str, float] | None = None, cache_mode: CacheMode = "default",
                       qvec: Vectors | None = None) -> Retrieval:
        """Hybrid retrieval, served from the retrieval cache when its dependencies are unchanged."""
        k = self._check_query(query, k)
        use_mmr = self.settings.retrieval.mmr if mmr is None else mmr
        cache = self.cache if cache_mode != "bypass" else None
        key = cache.retrieval_key(tenant, query, k, use_mmr, doc_level, candidates) if cache else None
        if cache is not None and key is not None and cache_mode == "default":
            with metrics.stage("retrieval_cache", timings):
                body, _ = await cache.get(key)
            if body is not None:
                return retrieval_from_bytes(body)
        gen = self._gen(tenant)
        if qvec is None:
            qvec = await self.embed_query(query, tenant, timings)
        assert self._retriever is not None
        with metrics.stage("retrieve", timings):
            r = await self._retriever.retrieve(tenant, query, qvec, k, use_mmr=use_mmr,
                                               doc_level=doc_level, candidates=candidates)
        if cache is not None and key is not None:
            dep = self._dep_record(key, tenant, query, qvec, r, [h.chunk_id for h in r.hits], k, use_mmr,
                                   doc_level, candidates)
            await self._cache_put(gen, key, retrieval_to_bytes(r), dep)
        return r

    def _gen(self, tenant: str) -> int:
        return self._generation.get(tenant, 0)

    async def _cache_put(self, gen: int, key: str, value: bytes, dep: DepRecord | None,
                     semantic: bool = False) -> None:
        """Cache a result computed at corpus generation ``gen`` — unless the corpus changed since.

        A change that lands while the result is computed (or while it is being
        stored, before its dependency record is visible to invalidation) would
        otherwise leave a stale entry: such results are not cached, or dropped.
        """
        cache = self.cache
        tenant = dep.tenant if dep is not None else ""
        if cache is None or self._gen(tenant) != gen:
            return
        await cache.put(key, value, dep, semantic=semantic)
        if self._gen(tenant) != gen:
            await cache.drop([key])

    def _dep_record(self, key: str, tenant: str, query: str, qvec: Vectors, r: Retrieval,
                    context_ids: list[str], k: int, mmr: bool, doc_level: bool = False,
                    candidates: int | None = None) -> DepRecord:
        terms = tuple(sorted(set(analyze(query))))
        return DepRecord(key, tenant, query, np.asarray(qvec, np.float32), terms, r.candidate_ids,
                         tuple(context_ids), r.dense_cutoff, r.keyword_cutoff, k, mmr,
                         doc_level=doc_level, candidates=candidates)

    async def search(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, *,
                     doc_level: bool = False, mmr: bool | None = False,
                     timings: dict[str, float] | None = None, cache_mode: CacheMode = "default") -> list[Hit]:
        """Hybrid search; plain RRF order unless ``mmr`` (search is for ranking, not context)."""
        r = await self.retrieve(query, k, tenant, doc_level=doc_level, mmr=mmr, timings=timings,
                                cache_mode=cache_mode)
        return r.hits

    async def _pack(self, query: str, hits: list[Hit], tenant: str, history: Sequence[Message],
                    timings: dict[str, float] | None) -> tuple[list[Hit], list[Message]]:
        s = self.settings.context
        count = self.chunker.count_tokens
        with metrics.stage("context", timings):
            vecs = (await asyncio.to_thread(self.store.vectors, tenant, [h.chunk_id for h in hits])
                    if hits else None)
            sources = pack(hits, count, s.token_budget, s.max_sources, vecs, s.near_duplicate)
            hist = trim_history(history, count, s.token_budget // 2, s.history_turns)
            messages = build_messages(query, sources, hist)
        return sources, messages

    def gen_params(self) -> GenParams:
        s = self.settings.llm
        return GenParams(model=s.model, temperature=s.temperature, max_tokens=s.max_tokens, top_p=s.top_p)

    async def _complete(self, tenant: str, messages: list[Message], timings: dict[str, float],
                        cache_mode: CacheMode = "default") -> Completion:
        """Generation through the LLM cache (only for deterministic parameters, unless configured).

        ``bypass`` neither reads nor writes it; ``refresh`` writes without reading.
        """
        params = self.gen_params()
        cache = self.cache if cache_mode != "bypass" else None
        key = None
        if cache is not None and cache.cacheable_llm(params.temperature):
            key = cache.llm_key(tenant, {"model": params.model, "t": params.temperature, "n": params.max_tokens,
                                         "p": params.top_p, "s": list(params.stop)}, messages)
            body, _ = await cache.get(key) if cache_mode == "default" else (None, None)
            if body is not None:
                d = orjson.loads(body)
                usage = Usage(**d["usage"])
                cache.counters["llm_calls_saved"] += 1
                cache.counters["llm_tokens_saved"] += usage.total_tokens
                metrics.LLM_SAVED.inc()
                return Completion(d["text"], usage, d["model"], d["finish"])
        with metrics.stage("generate", timings):
            done = await self.llm.complete(messages, params)
        metrics.LLM_CALLS.labels("ok").inc()
        metrics.LLM_TOKENS.labels("prompt").inc(done.usage.prompt_tokens)
        metrics.LLM_TOKENS.labels("completion").inc(done.usage.completion_tokens)
        if key is not None and cache is not None and done.finish_reason in ("stop", "length"):
            await cache.put(key, orjson.dumps({"text": done.text, "model": done.model, "finish": done.finish_reason,
                                               "usage": {"prompt_tokens": done.usage.prompt_tokens,
                                                         "completion_tokens": done.usage.completion_tokens}}))
        return done

    async def ask_body(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, *,
                       history: Sequence[Message] = (), cache_mode: CacheMode = "default",
                       timings: dict[str, float] | None = None) -> tuple[bytes, CacheInfo]:
        """The answer as pre-serialised JSON (answer, sources, usage, model) plus how it was served.

        The exact-hit path is: validate, one key hash, an L1 dict lookup, return
        the stored bytes — no model objects are built.
        """
        k = self._check_query(query, k)
        hist = _check_history(history, self.settings.limits.max_history_messages) if history else []
        cache = self.cache
        if cache is None or cache_mode == "bypass" or not self._cache_answers:
            body, _ = await self._answer_miss(None, query, k, tenant, hist, timings if timings is not None else {},
                                              retrieval_cache=cache is not None and cache_mode != "bypass")
            return body, CACHE_BYPASS if cache is not None and cache_mode == "bypass" else CACHE_MISS
        key = cache.answer_key(tenant, query, k, hist)
        allow_semantic = cache_mode == "default"
        if cache_mode == "default":
            l1 = cache.get_l1(key)
            if l1 is not None:
                return l1, CACHE_L1
            found, tier = await cache.get(key, skip_l1=True)
            if found is not None:
                return found, _exact(tier)
        t = timings if timings is not None else {}

        async def compute() -> tuple[bytes, CacheInfo]:
            return await self._answer_miss(key, query, k, tenant, hist, t, semantic=allow_semantic)

        async def poll() -> tuple[bytes, CacheInfo] | None:
            b, tier = await cache.get(key)
            return (b, _exact(tier)) if b is not None else None

        if cache_mode == "refresh":
            return await compute()
        result: tuple[bytes, CacheInfo] = await cache.flight.do(key, compute, poll)
        return result

    async def _answer_miss(self, key: str | None, query: str, k: int, tenant: str, hist: list[Message],
                           timings: dict[str, float], semantic: bool = True,
                           retrieval_cache: bool | None = None) -> tuple[bytes, CacheInfo]:
        """Compute an answer; with ``key``, store it (and try the semantic cache first).

        ``retrieval_cache`` defaults to whether there is a key: an answer that is
        not cached (e.g. sampled at temperature > 0) may still reuse retrieval.
        """
        cache = self.cache if key is not None else None
        gen = self._gen(tenant)
        qvec = await self.embed_query(query, tenant, timings)
        use_retrieval_cache = cache is not None if retrieval_cache is None else retrieval_cache
        r = await self.retrieve(query, k, tenant, timings=timings, qvec=qvec,
                                cache_mode="default" if use_retrieval_cache else "bypass")
        sources, messages = await self._pack(query, r.hits, tenant, hist, timings)
        ctx = [h.chunk_id for h in sources]
        if cache is not None and key is not None and not hist and semantic:
            with metrics.stage("semantic", timings):
                match = await cache.semantic_match(tenant, query, qvec, ctx, exclude=key)
            if match is not None:
                body, sim, matched = match
                metrics.SEMANTIC_SIMILARITY.observe(sim)
                await self._cache_put(gen, key, body, self._dep_record(key, tenant, query, qvec, r, ctx, k,
                                                                   self.settings.retrieval.mmr), semantic=True)
                return body, CacheInfo("semantic", None, round(sim, 4), matched)
        done = await self._complete(tenant, messages, timings,
                                    "bypass" if key is None else "default" if semantic else "refresh")
        body = answer_body(done.text, sources, done.usage, done.model)
        if cache is not None and key is not None:
            dep = self._dep_record(key, tenant, query, qvec, r, ctx, k, self.settings.retrieval.mmr)
            await self._cache_put(gen, key, body, dep, semantic=not hist)
        return body, CACHE_MISS

    async def ask(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, *,
                  history: Sequence[Message] = (), cache_mode: CacheMode = "default") -> Answer:
        """Retrieve, pack, generate: a cited answer whose sources are numbered as cited."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        body, info = await self.ask_body(query, k, tenant, history=history, cache_mode=cache_mode,
                                         timings=timings)
        timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
        return answer_from_body(orjson.loads(body), info, timings)

    async def ask_stream(self, query: str, k: int | None = None, tenant: str = DEFAULT_TENANT, *,
                         history: Sequence[Message] = (), cache_mode: CacheMode = "default"
                         ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events: ("sources", {...}) first, then ("delta", {"text"}) …, then ("done", {...}).

        Validation, the cache lookup and retrieval happen before the first
        event, so bad input raises instead of producing a broken stream.  A
        cached answer streams with the same event shape; only a generation
        that completed is stored.
        """
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        k = self._check_query(query, k)
        hist = _check_history(history, self.settings.limits.max_history_messages) if history else []
        retrieval_cache = self.cache is not None and cache_mode != "bypass"
        cache = self.cache if retrieval_cache and self._cache_answers else None
        key = cache.answer_key(tenant, query, k, hist) if cache is not None else None
        if cache is not None and key is not None and cache_mode == "default":
            body, tier = await cache.get(key)
            if body is not None:
                return _replay(body, _exact(tier), timings, t0)
        gen = self._gen(tenant)
        qvec = await self.embed_query(query, tenant, timings)
        r = await self.retrieve(query, k, tenant, timings=timings, qvec=qvec,
                                cache_mode="default" if retrieval_cache else "bypass")
        sources, messages = await self._pack(query, r.hits, tenant, hist, timings)
        ctx = [h.chunk_id for h in sources]
        dep = (self._dep_record(key, tenant, query, qvec, r, ctx, k, self.settings.retrieval.mmr)
               if cache is not None and key is not None else None)
        if cache is not None and key is not None and dep is not None and not hist and cache_mode == "default":
            match = await cache.semantic_match(tenant, query, qvec, ctx, exclude=key)
            if match is not None:
                await self._cache_put(gen, key, match[0], dep, semantic=True)
                return _replay(match[0], CacheInfo("semantic", None, round(match[1], 4), match[2]), timings, t0)
        return self._stream_events(sources, messages, timings, t0, key, dep, not hist, gen)

    async def _stream_events(self, sources: list[Hit], messages: list[Message], timings: dict[str, float],
                             t0: float, key: str | None, dep: DepRecord | None,
                             semantic: bool, gen: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "sources", {"sources": [h.to_dict() for h in sources]}
        usage = Usage()
        model = self.llm.id
        finish: str | None = None
        parts: list[str] = []
        tg = time.perf_counter()
        first = True
        async for piece in self.llm.stream(messages, self.gen_params()):
            if first:
                timings["first_token"] = round((time.perf_counter() - tg) * 1000, 3)
                first = False
            if piece.delta:
                parts.append(piece.delta)
                yield "delta", {"text": piece.delta}
            if piece.usage is not None:
                usage = piece.usage
            if piece.finish_reason is not None:
                finish = piece.finish_reason
        timings["generate"] = round((time.perf_counter() - tg) * 1000, 3)
        timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
        metrics.LLM_CALLS.labels("ok").inc()
        metrics.LLM_TOKENS.labels("prompt").inc(usage.prompt_tokens)
        metrics.LLM_TOKENS.labels("completion").inc(usage.completion_tokens)
        cache = self.cache
        if cache is not None and key is not None and finish in ("stop", "length"):
            # only a generation that ran to completion is stored (never an aborted stream)
            await self._cache_put(gen, key, answer_body("".join(parts), sources, usage, model), dep, semantic=semantic)
        yield "done", {"usage": usage.to_dict(), "timings": timings, "model": model,
                       "cache": CACHE_MISS.to_dict()}

    async def invalidate(self, *, tenant: str | None = None, doc_id: str | None = None, key: str | None = None,
                         everything: bool = False) -> int:
        """Manual invalidation: everything, one key, one tenant, or one document of a tenant."""
        await self.start()
        cache = self.cache
        if cache is None:
            return 0
        chosen = (key is not None) + bool(everything) + (tenant is not None or doc_id is not None)
        if chosen != 1:
            raise InvalidInput("give exactly one of: all, key, tenant (optionally with doc_id)")
        if everything:
            return await cache.invalidate_all()
        if key is not None:
            await cache.drop([key])
            return 1
        t = tenant or DEFAULT_TENANT
        if doc_id is not None:
            st = (await asyncio.to_thread(self.store.doc_state, t, [doc_id])).get(doc_id)
            if st is None:
                raise NotFound(f"no document with id {doc_id!r} in tenant {t!r}")
            return await cache.invalidate_chunks(t, list(st.chunk_ids))
        return await cache.invalidate_tenant(t)

    async def _reverify(self, rec: DepRecord) -> DepRecord | None:
        """Re-run retrieval for a cached entry from its stored vector; None if its context changed."""
        assert self._retriever is not None
        r = await self._retriever.retrieve(rec.tenant, rec.query, rec.qvec, rec.k, use_mmr=rec.mmr,
                                           doc_level=rec.doc_level, candidates=rec.candidates)
        if ":answer:" in rec.entry_key:
            sources, _ = await self._pack(rec.query, r.hits, rec.tenant, [], None)
            if not same_evidence((h.chunk_id for h in sources), rec.context_ids):
                return None
            ctx = rec.context_ids  # compared as a set from now on; the stored body is unchanged
        else:
            ctx = tuple(h.chunk_id for h in r.hits)
            if ctx != rec.context_ids:
                return None
        return DepRecord(rec.entry_key, rec.tenant, rec.query, rec.qvec, rec.terms, r.candidate_ids, ctx,
                         r.dense_cutoff, r.keyword_cutoff, rec.k, rec.mmr, rec.extra_keys, rec.doc_level,
                         rec.candidates)

    def stats(self, tenant: str | None = None) -> dict[str, int]:
        return self.store.stats(tenant)


async def _replay(body: bytes, info: CacheInfo, timings: dict[str, float],
                  t0: float) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A cached answer as the same event sequence a fresh generation produces."""
    d = orjson.loads(body)
    yield "sources", {"sources": d["sources"]}
    words = d["answer"].split(" ")
    for i, w in enumerate(words):
        yield "delta", {"text": w if i == 0 else " " + w}
    timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
    yield "done", {"usage": d["usage"], "timings": timings, "model": d.get("model", ""), "cache": info.to_dict()}


def _terms(chunks: Iterable[Chunk]) -> set[str]:
    """Keyword index terms of ``chunks``."""
    out: set[str] = set()
    for c in chunks:
        out.update(analyze(c.index_text))
    return out


def _json_eq(a: Any, b: Any) -> bool:
    """JSON equality (``1``, ``1.0`` and ``true`` differ, unlike Python's ``==``)."""
    return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(b, option=orjson.OPT_SORT_KEYS)


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
