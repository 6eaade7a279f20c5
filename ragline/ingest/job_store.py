"""Background ingest jobs on disk: ``data_dir/jobs.sqlite3`` (WAL), shared by every process of a data dir.

A job's record (state, progress, the report so far) and its pending input (one row per document, deleted
as the documents are ingested) are written in SQLite transactions, so a job acknowledged to a client
survives a ``kill -9`` of the process that runs it.

Which process runs a job is its **owner**: a random token whose lock file
(``jobs/owners/<token>.lock``) that process holds with ``flock`` for as long as it lives.  The OS drops
the lock when the process dies, however it dies, so any other process can tell a dead owner from a
live one without heartbeats or clocks: a job whose owner's lock can be taken is an orphan.  A process
that stops cleanly hands its open jobs back (owner ``""``, state ``queued``) instead.  Taking over an
orphan is one conditional ``UPDATE`` (only one process can win it).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

import orjson

from ragline.errors import RateLimited
from ragline.types import Document, IngestReport

__all__ = ["FINAL", "OPEN", "Job", "JobStore", "add_reports"]

OPEN: Final = ("queued", "running")
FINAL: Final = ("succeeded", "failed", "cancelled", "interrupted")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL, source TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    total INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 0, report BLOB NOT NULL, error TEXT,
    cancel INTEGER NOT NULL DEFAULT 0, owner TEXT NOT NULL, resumes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (owner) WHERE state IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS job_docs (
    job TEXT NOT NULL, n INTEGER NOT NULL, doc BLOB NOT NULL, PRIMARY KEY (job, n)
);
"""
_COLUMNS: Final = (
    "id, tenant, state, source, created_at, started_at, finished_at, total, done, report, error, cancel, resumes, owner"
)


def add_reports(a: IngestReport, b: IngestReport) -> IngestReport:
    """Counts summed field by field (a job's report is the sum of its steps')."""
    return IngestReport(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(IngestReport)})


@dataclass(frozen=True, slots=True)
class Job:
    """One background ingest as its record has it."""

    id: str
    tenant: str
    state: str
    """queued | running | succeeded | failed | cancelled | interrupted"""
    source: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    documents_total: int
    documents_done: int
    """Input documents ingested so far (in order: the job resumes from here)."""
    report: IngestReport
    error: str | None
    cancel_requested: bool
    resumes: int
    """Times the job was taken over after the process running it died."""
    owner: str

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    def to_dict(self) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it (the owner token stays internal)."""
        total, done = self.documents_total, self.documents_done
        return {
            "id": self.id,
            "tenant": self.tenant,
            "state": self.state,
            "source": self.source,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": {
                "documents_done": done,
                "documents_total": total,
                "fraction": round(done / total, 4) if total else 1.0,
                "chunks_added": self.report.chunks_added,
                "chunks_embedded": self.report.chunks_embedded,
            },
            "report": self.report.to_dict(),
            "error": self.error,
            "cancel_requested": self.cancel_requested,
            "resumes": self.resumes,
        }


def _job(row: tuple[Any, ...]) -> Job:
    jid, tenant, state, source, created, started, finished, total, done, report, error, cancel, resumes, owner = row
    rep = orjson.loads(report)
    rep["errors"] = tuple(rep.get("errors", ()))
    return Job(
        jid, tenant, state, source, created, started, finished, int(total), int(done), IngestReport(**rep),
        error, bool(cancel), int(resumes), owner,
    )  # fmt: skip


def _doc_blob(d: Document) -> bytes:
    return orjson.dumps({"id": d.id, "text": d.text, "title": d.title, "metadata": d.metadata, "source": d.source})


def _doc(blob: bytes) -> Document:
    o = orjson.loads(blob)
    return Document(o["id"], o["text"], o["title"], o["metadata"], source=o["source"])


def _report_blob(r: IngestReport) -> bytes:
    return orjson.dumps(asdict(r))


class JobStore:
    """The jobs database of one data dir.  Blocking (call it in a worker thread); thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._owners = self.data_dir / "jobs" / "owners"
        self._owners.mkdir(parents=True, exist_ok=True)
        self.owner = secrets.token_hex(8)
        # locked before it is visible under its name: no one ever sees a live owner's file unlocked
        tmp = self._owners / f".{self.owner}.tmp"
        self._owner_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self._owner_fd, fcntl.LOCK_EX)  # held for this store's life; the OS drops it at death
        tmp.rename(self._owners / f"{self.owner}.lock")
        for f in self._owners.glob("*.lock"):  # dead processes' files go (alive() removes them)
            self.alive(f.stem)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a committed job survives the process's death
        self._db.executescript(_SCHEMA)

    def _one(self, sql: str, args: tuple[Any, ...]) -> Job | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE {sql}", args).fetchone()
        return None if row is None else _job(row)

    # -- submitting and reading ---------------------------------------------------
    def create(self, tenant: str, docs: list[Document], source: str, max_open: int) -> Job:
        """A queued job owned by this process, with its input, in one transaction; ``RateLimited`` when
        the tenant already has ``max_open`` queued or running jobs."""
        jid = "job_" + secrets.token_hex(10)
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (n_open,) = self._db.execute(
                    "SELECT count(*) FROM jobs WHERE tenant = ? AND state IN ('queued', 'running')", (tenant,)
                ).fetchone()
                if n_open >= max_open:
                    msg = f"tenant has {n_open} unfinished jobs (jobs.max_open_per_tenant); wait for one to finish"
                    raise RateLimited(msg, retry_after=30.0, public=msg)
                self._db.execute(
                    "INSERT INTO jobs (id, tenant, state, source, created_at, total, report, owner) "
                    "VALUES (?,?,'queued',?,?,?,?,?)",
                    (jid, tenant, source, now, len(docs), _report_blob(IngestReport()), self.owner),
                )
                self._db.executemany(
                    "INSERT INTO job_docs (job, n, doc) VALUES (?,?,?)",
                    ((jid, i, _doc_blob(d)) for i, d in enumerate(docs)),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            job = self._one("id = ?", (jid,))
        assert job is not None
        return job

    def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job, if it exists (and belongs to ``tenant`` when one is given)."""
        with self._lock:
            if tenant is None:
                return self._one("id = ?", (job_id,))
            return self._one("id = ? AND tenant = ?", (job_id, tenant))

    def recent(self, tenant: str, limit: int = 20, state: str | None = None) -> list[Job]:
        """The tenant's jobs, newest first."""
        where, args = "tenant = ?", [tenant]
        if state is not None:
            where, args = where + " AND state = ?", [*args, state]
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE {where} ORDER BY created_at DESC LIMIT ?", (*args, limit)
            ).fetchall()
        return [_job(r) for r in rows]

    # -- running ----------------------------------------------------------------------
    def begin(self, job_id: str) -> Job | None:
        """Mark an own queued job running; ``None`` if it is no longer this process's to run."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state = 'running', started_at = coalesce(started_at, ?) "
                "WHERE id = ? AND owner = ? AND state IN ('queued', 'running')",
                (time.time(), job_id, self.owner),
            )
            return self._one("id = ?", (job_id,)) if cur.rowcount == 1 else None

    def next_batch(self, job_id: str, start: int, max_docs: int, max_bytes: int) -> list[tuple[int, Document]]:
        """The next pending documents from position ``start``: up to ``max_docs`` of them and about
        ``max_bytes`` of input (at least one, however large)."""
        with self._lock:
            sizes = self._db.execute(
                "SELECT n, length(doc) FROM job_docs WHERE job = ? AND n >= ? ORDER BY n LIMIT ?",
                (job_id, start, max_docs),
            ).fetchall()
            if not sizes:
                return []
            last, used = sizes[0][0], 0
            for n, size in sizes:
                if used and used + size > max_bytes:
                    break
                last, used = n, used + size
            rows = self._db.execute(
                "SELECT n, doc FROM job_docs WHERE job = ? AND n >= ? AND n <= ? ORDER BY n", (job_id, start, last)
            ).fetchall()
        return [(int(n), _doc(blob)) for n, blob in rows]

    def advance(self, job_id: str, done: int, report: IngestReport) -> None:
        """Record a step: documents before ``done`` are ingested (their input rows go)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE jobs SET done = ?, report = ? WHERE id = ?", (done, _report_blob(report), job_id))
            self._db.execute("DELETE FROM job_docs WHERE job = ? AND n < ?", (job_id, done))
            self._db.execute("COMMIT")

    def finish(self, job_id: str, state: str, error: str | None, owner: str | None = None) -> Job | None:
        """A final state; the pending input goes.  With ``owner``, only if the job still has that owner."""
        assert state in FINAL
        guard, args = ("", ()) if owner is None else (" AND owner = ?", (owner,))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, owner = '' "
                f"WHERE id = ? AND state IN ('queued', 'running'){guard}",
                (state, error, time.time(), job_id, *args),
            )
            if cur.rowcount:
                self._db.execute("DELETE FROM job_docs WHERE job = ?", (job_id,))
            self._db.execute("COMMIT")
            return self._one("id = ?", (job_id,))

    def request_cancel(self, job_id: str, tenant: str) -> Job | None:
        """Flag an unfinished job for cancellation; one that no live process runs is cancelled here."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET cancel = 1 WHERE id = ? AND tenant = ? AND state IN ('queued', 'running')",
                (job_id, tenant),
            )
            job = self._one("id = ? AND tenant = ?", (job_id, tenant))
        if job is not None and not job.finished and job.owner != self.owner and not self.alive(job.owner):
            return self.finish(job_id, "cancelled", _stopped("cancelled", job), owner=job.owner)
        return job

    def cancel_requests(self) -> list[str]:
        """Own unfinished jobs someone asked to cancel (any process may have taken the request)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE owner = ? AND cancel = 1 AND state IN ('queued', 'running')", (self.owner,)
            ).fetchall()
        return [str(r[0]) for r in rows]

    # -- owners ----------------------------------------------------------------------
    def alive(self, owner: str) -> bool:
        """Does a live process hold ``owner``'s lock?  (``""``: handed back, nobody's.)"""
        if owner == self.owner:
            return True
        if not owner or not owner.isalnum():
            return False
        path = self._owners / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            path.unlink(missing_ok=True)  # its process is gone
            return False
        finally:
            os.close(fd)

    def orphans(self) -> list[Job]:
        """Unfinished jobs whose owner is gone (died, or handed them back), oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('queued', 'running') AND owner != ? ORDER BY created_at",
                (self.owner,),
            ).fetchall()
        jobs = [_job(r) for r in rows]
        live: dict[str, bool] = {}
        return [j for j in jobs if not live.setdefault(j.owner, self.alive(j.owner))]

    def adopt(self, job: Job, resume: bool, max_resumes: int) -> Job | None:
        """Take over an orphan: queued for this process, or (its process died and resuming is off or
        it died ``max_resumes`` times already) ``interrupted``.  ``None``: another process took it."""
        crashed = bool(job.owner)
        if crashed and (not resume or job.resumes >= max_resumes):
            why = "resuming is off (jobs.resume)" if not resume else f"it was resumed {job.resumes} times already"
            done = self.finish(job.id, "interrupted", _stopped("interrupted", job, why), owner=job.owner)
            return None if done is None or done.state != "interrupted" else done
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET owner = ?, state = 'queued', resumes = resumes + ? "
                "WHERE id = ? AND owner = ? AND state IN ('queued', 'running')",
                (self.owner, int(crashed), job.id, job.owner),
            )
            return (
                replace(job, owner=self.owner, state="queued", resumes=job.resumes + crashed) if cur.rowcount else None
            )

    def hand_back(self) -> int:
        """At a clean stop: own unfinished jobs become anyone's (queued, resumed by the next process)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET owner = '', state = 'queued' WHERE owner = ? AND state IN ('queued', 'running')",
                (self.owner,),
            )
            return cur.rowcount

    def prune(self, tenant: str, keep: int, keep_s: float) -> None:
        """Forget the tenant's finished jobs beyond the newest ``keep``, or older than ``keep_s``."""
        with self._lock:
            self._db.execute(
                "DELETE FROM jobs WHERE tenant = ? AND state NOT IN ('queued', 'running') AND (finished_at < ? OR "
                "id NOT IN (SELECT id FROM jobs WHERE tenant = ? ORDER BY created_at DESC LIMIT ?))",
                (tenant, time.time() - keep_s, tenant, keep),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
        (self._owners / f"{self.owner}.lock").unlink(missing_ok=True)
        os.close(self._owner_fd)


def _stopped(state: str, job: Job, why: str = "") -> str:
    """The error text of a job that stopped early: what landed, and that re-submitting is safe."""
    head = {
        "cancelled": "cancelled",
        "interrupted": "the process running this job died" + (f" and {why}" if why else ""),
    }.get(state, state)
    return (
        f"{head}; {job.documents_done} of {job.documents_total} documents were ingested before that. "
        "Submitting the same documents again is safe: documents are upserted by id, unchanged ones cost a hash."
    )
