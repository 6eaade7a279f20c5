"""Background jobs from the command line (``ragline ingest --background``, ``ragline jobs ...``).

Two ways to reach the jobs of a deployment, with one interface (:class:`Jobs`):

* :class:`HttpJobs`: a running server (``--url``), over ``/v1/jobs`` with an API key;
* :class:`LocalJobs`: the jobs database of a data dir, read and cancelled directly (no model is loaded;
  a job cancelled here is stopped by the process that runs it at its next poll).

:func:`watch` follows jobs with a rich progress bar until each has finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ragline.errors import InvalidInput, NotFound, RaglineError
from ragline.ingest.job_store import FINAL, JobStore
from ragline.ingest.jobs import JobManager
from ragline.types import Document

__all__ = ["HttpJobs", "Jobs", "LocalJobs", "PipelineJobs", "describe", "request_bodies", "watch"]

Json = dict[str, Any]


class Jobs(Protocol):
    async def get(self, job_id: str) -> Json: ...

    async def recent(self, limit: int, state: str | None) -> list[Json]: ...

    async def cancel(self, job_id: str) -> Json: ...


class HttpJobs:
    """``/v1/jobs`` of a running server; the API key decides the tenant."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = await self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise RaglineError(f"cannot reach the server: {exc}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            err = NotFound if r.status_code == 404 else InvalidInput if r.status_code < 500 else RaglineError
            raise err(f"HTTP {r.status_code}: {message}")
        return r.json()

    async def submit(self, body: bytes) -> Json:
        out: Json = await self._call("POST", "/v1/jobs", content=body, headers={"content-type": "application/json"})
        return out

    async def get(self, job_id: str) -> Json:
        out: Json = await self._call("GET", f"/v1/jobs/{job_id}")
        return out

    async def recent(self, limit: int, state: str | None) -> list[Json]:
        params: dict[str, Any] = {"limit": limit, **({"state": state} if state else {})}
        jobs: list[Json] = (await self._call("GET", "/v1/jobs", params=params))["jobs"]
        return jobs

    async def cancel(self, job_id: str) -> Json:
        out: Json = await self._call("DELETE", f"/v1/jobs/{job_id}")
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


class LocalJobs:
    """The jobs database of a data dir, for one tenant."""

    def __init__(self, data_dir: Path, tenant: str) -> None:
        if not (Path(data_dir) / "jobs.sqlite3").exists():
            raise InvalidInput(f"no jobs in {data_dir} (no jobs.sqlite3)")
        self._store = JobStore(Path(data_dir))
        self.tenant = tenant

    async def get(self, job_id: str) -> Json:
        job = await asyncio.to_thread(self._store.get, job_id, self.tenant)
        if job is None:
            raise NotFound(f"no job {job_id!r} in tenant {self.tenant!r}")
        return job.to_dict()

    async def recent(self, limit: int, state: str | None) -> list[Json]:
        return [j.to_dict() for j in await asyncio.to_thread(self._store.recent, self.tenant, limit, state)]

    async def cancel(self, job_id: str) -> Json:
        job = await asyncio.to_thread(self._store.request_cancel, job_id, self.tenant)
        if job is None:
            raise NotFound(f"no job {job_id!r} in tenant {self.tenant!r}")
        return job.to_dict()

    async def aclose(self) -> None:
        await asyncio.to_thread(self._store.close)


class PipelineJobs:
    """The jobs of an in-process pipeline (``AsyncRAG.jobs``), for one tenant."""

    def __init__(self, manager: JobManager, tenant: str) -> None:
        self._jobs = manager
        self.tenant = tenant

    async def get(self, job_id: str) -> Json:
        return (await self._jobs.get(job_id, self.tenant)).to_dict()

    async def recent(self, limit: int, state: str | None) -> list[Json]:
        return [j.to_dict() for j in await self._jobs.recent(self.tenant, limit, state)]

    async def cancel(self, job_id: str) -> Json:
        return (await self._jobs.cancel(job_id, self.tenant)).to_dict()


def request_bodies(docs: Iterable[Document], max_bytes: int, max_docs: int) -> Iterator[bytes]:
    """``{"documents": [...]}`` bodies of at most ``max_bytes`` (one larger document alone) and ``max_docs``."""
    parts: list[bytes] = []
    size = 0
    for d in docs:
        one = orjson.dumps({"id": d.id, "text": d.text, "title": d.title, "metadata": d.metadata})
        if parts and (size + len(one) + 64 > max_bytes or len(parts) >= max_docs):
            yield b'{"documents":[' + b",".join(parts) + b"]}"
            parts, size = [], 0
        parts.append(one)
        size += len(one) + 1
    if parts:
        yield b'{"documents":[' + b",".join(parts) + b"]}"


def describe(job: Json) -> str:
    """A job in a few lines of text."""
    p, r = job["progress"], job["report"]
    lines = [
        f"[bold]{job['id']}[/bold]  {_state(job['state'])}  tenant {job['tenant']}  ({job['source']})",
        f"  {p['documents_done']}/{p['documents_total']} documents: {r['added']} added, {r['updated']} updated, "
        f"{r['unchanged']} unchanged; {r['chunks_added']} chunks written, {r['chunks_embedded']} embedded",
    ]
    if job.get("cancel_requested") and job["state"] not in FINAL:
        lines.append("  cancel requested")
    if job.get("resumes"):
        lines.append(f"  resumed {job['resumes']} time(s) after its process died")
    if job.get("error"):
        lines.append(f"  [red]{job['error']}[/red]")
    return "\n".join(lines)


def _state(state: str) -> str:
    color = {"succeeded": "green", "failed": "red", "interrupted": "red", "cancelled": "yellow"}.get(state, "cyan")
    return f"[{color}]{state}[/{color}]"


async def watch(
    jobs: Jobs, ids: list[str], console: Console, *, quiet: bool = False, poll_s: float = 0.5
) -> list[Json]:
    """Follow ``ids`` until every one has finished, one progress bar each; returns their final records."""
    final: dict[str, Json] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("docs  {task.fields[chunks]} chunks  {task.fields[state]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    ) as bar:
        tasks: dict[str, TaskID] = {i: bar.add_task(f"[bold]{i}", total=None, chunks=0, state="queued") for i in ids}
        while len(final) < len(ids):
            for i in ids:
                if i in final:
                    continue
                job = await jobs.get(i)
                p = job["progress"]
                bar.update(
                    tasks[i], completed=p["documents_done"], total=p["documents_total"], chunks=p["chunks_added"],
                    state=_state(job["state"]),
                )  # fmt: skip
                if job["state"] in FINAL:
                    final[i] = job
            if len(final) < len(ids):
                await asyncio.sleep(poll_s)
    return [final[i] for i in ids]
