"""Background ingest jobs: large ingests run in steps, with progress, cancellation and a final report.

A job is submitted with its documents (``POST /v1/jobs``, ``AsyncRAG.jobs.submit``); they are
validated, written to the jobs database with the job (:mod:`ragline.ingest.job_store`) and the job is
acknowledged.  Each process runs its own jobs as asyncio tasks, ``jobs.concurrency`` at a time and at
most one per tenant (the oldest queued job of a tenant with none running goes next), in steps of
``jobs.batch_documents`` documents / ``jobs.batch_bytes`` bytes.  Every step is one ordinary ingest
(the tenant's writer lock is held for that step only, so the tenant's other writes interleave, and
other tenants never wait) followed by one transaction recording the progress.

Restarts: a process that stops cleanly hands its unfinished jobs back; one that dies (``kill -9``)
leaves them with a dead owner.  A server (its lifespan calls :meth:`JobManager.start`; ``jobs.adopt``)
takes over both kinds, at start and every few ``jobs.poll_s`` after, and resumes each from its last recorded step:
documents are upserted by id, so re-ingesting the step that was under way costs a hash per document.
A job whose process died ``jobs.max_resumes`` times (or any, with ``jobs.resume`` off) is marked
``interrupted`` with a message saying how far it got.  A job is never left ``running`` by a dead process.

Cancellation (``cancel``, from any process of the data dir) stops the job at its next await: between
two embedding slices or steps; what was committed stays, the report says how much.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from ragline.config import Settings
from ragline.errors import InvalidInput, NotFound, PayloadTooLarge, RaglineError, ServiceUnavailable
from ragline.ingest.indexer import settle
from ragline.ingest.job_store import Job, JobStore, add_reports
from ragline.ingest.loaders import validate_document
from ragline.types import Document, IngestReport

__all__ = ["Job", "JobManager"]

log = logging.getLogger("ragline.jobs")

IngestFn = Callable[[list[Document], str], Awaitable[IngestReport]]
ADOPT_EVERY = 5
"""Dead owners are looked for every this many polls (cancel requests at every poll)."""


class JobManager:
    """The jobs of one process: submit, read, cancel, and the runner (see the module docstring)."""

    def __init__(self, settings: Settings, ingest: IngestFn) -> None:
        self.settings = settings
        self.s = settings.jobs
        self._ingest = ingest
        self._store: JobStore | None = None
        self._open_lock = asyncio.Lock()
        self._queued: dict[str, str] = {}  # job id -> tenant, in submission order
        self._running: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._cancelling: set[str] = set()
        self._poller: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """With ``jobs.adopt``: open the jobs database, take over orphaned jobs and poll for more (the
        server calls this; a pipeline that never does still runs the jobs submitted to it)."""
        self._closing = False
        if self.s.adopt:
            await self._db()
            await self._adopt()
            self._ensure_poller()

    async def aclose(self) -> None:
        """Stop the runner: running jobs stop at their next await (a commit under way lands first) and,
        with every queued one, are handed back to be resumed by the next process."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        tasks = [t for _, t in self._running.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        store, self._store = self._store, None
        if store is not None:
            n = await asyncio.to_thread(store.hand_back)
            if n:
                log.warning("handed back %d unfinished job(s); the next process on this data dir resumes them", n)
            await asyncio.to_thread(store.close)

    async def _db(self) -> JobStore:
        if self._store is None:
            async with self._open_lock:
                if self._store is None:
                    self._store = await asyncio.to_thread(JobStore, Path(self.settings.data_dir))
        return self._store

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    # -- the API ---------------------------------------------------------------------
    async def submit(self, docs: Iterable[Document], tenant: str, source: str = "api", *, start: bool = True) -> Job:
        """Validate ``docs``, store them with a new queued job, and schedule it; returns the job.  With
        ``start=False`` it only waits in the database: handed back at :meth:`aclose`, a server adopts it."""
        if self._closing:
            raise ServiceUnavailable("shutting down: submit the job to another process", retry_after=5.0)
        batch = await asyncio.to_thread(self._validated, docs)
        store = await self._db()
        job = await asyncio.to_thread(store.create, tenant, batch, source, self.s.max_open_per_tenant)
        if start:
            self._queued[job.id] = tenant
            self._ensure_poller()
            self._schedule()
        log.info("job %s: %d documents queued for tenant %s", job.id, job.documents_total, tenant)
        return job

    def _validated(self, docs: Iterable[Document]) -> list[Document]:
        out: list[Document] = []
        limit, limits = self.s.max_documents, self.settings.limits
        for doc in docs:
            validate_document(doc, limits)
            out.append(doc)
            if len(out) > limit:
                raise PayloadTooLarge(f"more than {limit} documents in one job (jobs.max_documents); split it")
        if not out:
            raise InvalidInput("a job needs at least one document")
        return out

    async def get(self, job_id: str, tenant: str) -> Job:
        """The tenant's job; ``NotFound`` for an unknown id or another tenant's job."""
        job = await asyncio.to_thread((await self._db()).get, job_id, tenant)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    async def recent(self, tenant: str, limit: int = 20, state: str | None = None) -> list[Job]:
        """The tenant's most recent jobs, newest first."""
        if not 1 <= limit <= 1000:
            raise InvalidInput("limit must be 1..1000")
        return await asyncio.to_thread((await self._db()).recent, tenant, limit, state)

    async def cancel(self, job_id: str, tenant: str) -> Job:
        """Ask the job to stop (a finished job is returned as it is)."""
        store = await self._db()
        job = await asyncio.to_thread(store.request_cancel, job_id, tenant)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        if job.owner == store.owner and not job.finished:
            await self._cancel_own(job_id)
            job = await self.get(job_id, tenant)
        return job

    async def wait(self, job_id: str, tenant: str, timeout: float | None = None, poll_s: float = 0.2) -> Job:
        """Poll until the job has finished (``TimeoutError`` after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            while not (job := await self.get(job_id, tenant)).finished:
                await asyncio.sleep(poll_s)
        return job

    # -- the runner ------------------------------------------------------------------
    def _schedule(self) -> None:
        """Start queued jobs while there is room: oldest first, one per tenant."""
        if self._closing:
            return
        busy = {t for t, _ in self._running.values()}
        for job_id, tenant in list(self._queued.items()):
            if len(self._running) >= self.s.concurrency:
                return
            if tenant in busy:
                continue
            del self._queued[job_id]
            busy.add(tenant)
            task = asyncio.get_running_loop().create_task(self._run(job_id, tenant), name=f"ragline-job-{job_id}")
            self._running[job_id] = (tenant, task)
            task.add_done_callback(functools.partial(self._done, job_id))

    def _done(self, job_id: str, _: object = None) -> None:
        self._running.pop(job_id, None)
        self._cancelling.discard(job_id)
        self._schedule()

    async def _run(self, job_id: str, tenant: str) -> None:
        store = await self._db()
        job = await asyncio.to_thread(store.begin, job_id)
        if job is None:
            return  # cancelled or taken over meanwhile
        done, report = job.documents_done, job.report
        try:
            if job.cancel_requested:
                raise asyncio.CancelledError
            while batch := await asyncio.to_thread(
                store.next_batch, job_id, done, self.s.batch_documents, self.s.batch_bytes
            ):
                report = add_reports(report, await self._ingest([d for _, d in batch], tenant))
                done = batch[-1][0] + 1
                # recorded even if a cancel arrives meanwhile: the step it describes has landed
                await settle(asyncio.ensure_future(asyncio.to_thread(store.advance, job_id, done, report)))
            await asyncio.to_thread(store.finish, job_id, "succeeded", None, store.owner)
            log.info("job %s succeeded: %s", job_id, report)
        except asyncio.CancelledError:
            if self._closing and job_id not in self._cancelling:
                raise  # a clean stop: aclose hands the job back
            msg = f"cancelled; {done} of {job.documents_total} documents were ingested before that"
            await asyncio.to_thread(store.finish, job_id, "cancelled", msg, store.owner)
        except RaglineError as exc:
            await self._fail(store, job_id, exc.message, done, job.documents_total)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            await self._fail(store, job_id, f"internal error ({type(exc).__name__}); see the server log", done,
                             job.documents_total)  # fmt: skip
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(store.prune, tenant, self.s.keep_finished, self.s.keep_finished_s)

    async def _fail(self, store: JobStore, job_id: str, why: str, done: int, total: int) -> None:
        msg = (
            f"{why} ({done} of {total} documents were ingested before that; submitting the same documents "
            "again is safe: they are upserted by id)"
        )
        log.warning("job %s failed: %s", job_id, why)
        await asyncio.to_thread(store.finish, job_id, "failed", msg, store.owner)

    async def _cancel_own(self, job_id: str) -> None:
        store = await self._db()
        why = "cancelled before it started" if self._queued.pop(job_id, None) is not None else "cancelled"
        running = self._running.get(job_id)
        if running is not None:  # it records how far it got
            self._cancelling.add(job_id)
            running[1].cancel()
            await asyncio.gather(running[1], return_exceptions=True)
        await asyncio.to_thread(store.finish, job_id, "cancelled", why, store.owner)  # if still unfinished

    async def _adopt(self) -> None:
        """Take over the jobs of processes that died or stopped (and ``interrupted`` the exhausted)."""
        store = await self._db()
        for orphan in await asyncio.to_thread(store.orphans):
            job = await asyncio.to_thread(store.adopt, orphan, self.s.resume, self.s.max_resumes)
            if job is None:
                continue
            if job.state == "interrupted":
                log.warning("job %s interrupted: %s", job.id, job.error)
                continue
            log.warning("job %s resumed at document %d of %d", job.id, job.documents_done, job.documents_total)
            self._queued[job.id] = job.tenant
        self._schedule()

    async def _poll(self) -> None:
        """Cancel requests every ``jobs.poll_s`` (another process may have taken them), orphans now and then."""
        tick = 0
        while True:
            await asyncio.sleep(self.s.poll_s)
            tick += 1
            try:
                store = await self._db()
                for job_id in await asyncio.to_thread(store.cancel_requests):
                    if job_id not in self._cancelling:
                        await self._cancel_own(job_id)
                if self.s.adopt and tick % ADOPT_EVERY == 0:
                    await self._adopt()
            except Exception:  # the runner keeps going; the next poll tries again
                log.exception("job poll failed")
