"""The write path: validate → skip unchanged documents → chunk → embed → commit → invalidate.

Documents are validated, hashed and chunked in batches of about
``batch_chunks`` chunks.  An unchanged document (same content hash) costs the
hash; a changed one reuses the vectors of its replaced chunks, then the
embedding cache, and embeds only what is left, once per unique text.  Each
batch is one atomic upsert, overlapped with the embedding of the next batch.
After each commit, the cache is told exactly what changed, as the store logged
it for every process (see :mod:`ragline.cache.invalidation`).

Writers are serialised per tenant (:class:`WriterLocks` here, the store's
``TenantLocks`` across processes): tenant B never waits for tenant A's writes.
The CPU-heavy steps run off the event loop (validation and chunking in a worker
thread, embedding in fair slices: see :class:`~ragline.embed.cached.CachedEmbedder`),
and a commit, once started, runs to its end and is reported to the cache even
if the ingest is cancelled (a write the cache never heard of would leave stale
answers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

import numpy as np

from ragline import metrics
from ragline.config import Settings
from ragline.embed.cached import CachedEmbedder
from ragline.errors import InvalidInput, NotFound
from ragline.ingest.chunking import Chunker, doc_hash
from ragline.ingest.loaders import validate_document
from ragline.store.base import Store
from ragline.types import Change, Chunk, Document, IngestReport, Vectors

Progress = Callable[[int], None]
"""Called with the number of documents just processed (for progress bars)."""

Prepared = list[tuple[Document, str, list[Chunk], Vectors]]

BATCH_CHUNKS = 256
T = TypeVar("T")


class ChangeListener(Protocol):
    """What the indexer tells the cache (:class:`~ragline.cache.invalidation.Invalidation`)."""

    async def changed(self, change: Change, vectors: Vectors | None, *, foreign: bool = False) -> None: ...


class WriterLocks:
    """One asyncio lock per tenant, forgotten once no writer holds or awaits it: as many entries as
    tenants with writes in flight, never one per tenant ever seen."""

    def __init__(self) -> None:
        self._slots: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, tenant: str) -> AsyncIterator[None]:
        slot = self._slots.get(tenant)
        if slot is None:
            slot = self._slots[tenant] = (asyncio.Lock(), [0])
        lock, users = slot
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._slots[tenant]

    def __len__(self) -> int:
        return len(self._slots)


async def settle(task: asyncio.Future[T]) -> T:
    """``task``'s result, waiting for it to finish even if the caller is cancelled meanwhile (the
    cancellation is re-raised afterwards): a store write must not be abandoned half-reported."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise asyncio.CancelledError
    return task.result()


class Indexer:
    def __init__(
        self,
        store: Store,
        chunker: Chunker,
        embedder: CachedEmbedder,
        settings: Settings,
        changes: ChangeListener | None,
        batch_chunks: int = BATCH_CHUNKS,
        catch_up: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``catch_up``: applies other processes' changes; a write first applies those it met (the
        store applied them to its indexes), so the cache learns of every change in seq order."""
        self.catch_up = catch_up
        self.store = store
        self.chunker = chunker
        self.embedder = embedder
        self.settings = settings
        self.changes = changes
        self.batch_chunks = batch_chunks
        self.writers = WriterLocks()

    async def ingest(self, docs: Iterable[Document], tenant: str, progress: Progress | None = None) -> IngestReport:
        """Upsert documents by id; unchanged ones cost a hash, changed ones replace their chunks."""
        counts = {
            "documents": 0,
            "added": 0,
            "updated": 0,
            "unchanged": 0,
            "chunks_added": 0,
            "chunks_removed": 0,
            "chunks_embedded": 0,
        }
        async with self.writers.hold(tenant):
            # validation and chunking (tokenising) in a worker thread, one batch at a time
            batches = doc_batches(docs, self.chunker, self.settings, self.batch_chunks)
            pending: asyncio.Task[None] | None = None
            pending_ids: set[str] = set()
            try:
                while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                    ids = {d.id for d, _, _ in batch}
                    if pending is not None and not pending_ids.isdisjoint(ids):
                        # the same document again: compare against what the pending commit writes
                        await settle(pending)
                        pending = None
                    prepared = await self._prepare(batch, tenant, counts)
                    if pending is not None:
                        await settle(pending)
                    pending = asyncio.create_task(self._commit(tenant, prepared, len(batch), progress))
                    pending_ids = ids
                if pending is not None:
                    await settle(pending)
            finally:  # failed or cancelled: a commit under way still lands and is reported first
                if pending is not None and not pending.done():
                    with contextlib.suppress(BaseException):
                        await settle(pending)
        return IngestReport(**counts)  # type: ignore[arg-type]

    async def delete(self, doc_ids: Sequence[str], tenant: str) -> list[str]:
        """Delete documents by id; NotFound if none of them exists. Returns removed chunk ids."""
        if not doc_ids:
            raise InvalidInput("no document ids given")
        store = self.store
        async with self.writers.hold(tenant):
            states = await asyncio.to_thread(store.doc_state, tenant, list(doc_ids))
            missing = [d for d in doc_ids if d not in states]
            if len(missing) == len(doc_ids):
                raise NotFound(
                    f"no document with id {missing[0]!r}"
                    if len(missing) == 1
                    else f"none of the {len(missing)} document ids exist"
                )
            change = await settle(asyncio.ensure_future(self._delete(tenant, list(states))))
        return list(change.removed)

    async def _delete(self, tenant: str, doc_ids: list[str]) -> Change:
        change = await asyncio.to_thread(self.store.delete, tenant, doc_ids)
        if self.catch_up is not None:
            await self.catch_up()
        if self.changes is not None and change.seq:
            await self.changes.changed(change, None)
        return change

    async def chunk_ids(self, tenant: str, doc_id: str) -> list[str]:
        """The chunk ids of one document; NotFound if there is no such document."""
        st = (await asyncio.to_thread(self.store.doc_state, tenant, [doc_id])).get(doc_id)
        if st is None:
            raise NotFound(f"no document with id {doc_id!r} in tenant {tenant!r}")
        return list(st.chunk_ids)

    async def _prepare(
        self, batch: list[tuple[Document, str, list[Chunk]]], tenant: str, counts: dict[str, int]
    ) -> Prepared:
        """Drop unchanged documents, reuse known vectors, embed the rest once per unique text.

        Vectors come, cheapest first, from the replaced chunks of the same
        document, the embedding cache, then the model.  (Which replacing chunks are
        identical to the ones they replace, and so no change to any retrieval, the
        store decides inside its write: see :class:`~ragline.types.Change`.)
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
            vectors, embedded = await self.embedder.embed_texts(tenant, list(todo.values()))
            counts["chunks_embedded"] += embedded
            known.update(zip(todo.keys(), vectors, strict=True))
        out: Prepared = []
        for doc, h, chunks in changed:
            counts["chunks_added"] += len(chunks)
            vec = (
                np.stack([known[c.content_hash] for c in chunks])
                if chunks
                else np.zeros((0, self.embedder.dim), np.float32)
            )
            out.append((doc, h, chunks, vec))
        return out

    async def _commit(self, tenant: str, prepared: Prepared, n_docs: int, progress: Progress | None) -> None:
        if prepared:
            change = await asyncio.to_thread(self.store.upsert, tenant, prepared)
            if self.catch_up is not None:
                await self.catch_up()
            if self.changes is not None:
                added = set(change.added)
                vecs = [v for _, _, cs, vs in prepared for c, v in zip(cs, vs, strict=True) if c.id in added]
                await self.changes.changed(change, np.stack(vecs) if vecs else None)
        if progress is not None:
            progress(n_docs)


def doc_batches(
    docs: Iterable[Document], chunker: Chunker, settings: Settings, max_chunks: int
) -> Iterator[list[tuple[Document, str, list[Chunk]]]]:
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
