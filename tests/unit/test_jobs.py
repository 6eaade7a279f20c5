"""Per-tenant writes and background ingest jobs, in-process (HashEmbedder, a slowed copy of it; no model).

Fairness: tenant B's one-document ingest does not wait for tenant A's large one.  Jobs: steps, progress,
the final report, cancellation (here and from another process), failure, tenant isolation, the hand-back
at a clean stop, and the take-over of a dead process's job (resumed, or interrupted when it may not be).
``tests/integration/test_jobs_crash.py`` kills a real server with SIGKILL; ``test_jobs_http.py`` measures
fairness over HTTP with the real model.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragline.config import Settings
from ragline.errors import NotFound, RateLimited
from ragline.ingest.indexer import WriterLocks
from ragline.ingest.job_store import JobStore
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document, IngestReport, Vectors

WORDS = [f"w{i}x" for i in range(2000)]


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def docs(prefix: str, n: int, words: int = 400) -> list[Document]:
    return [Document(f"{prefix}{i}", text(hash((prefix, i)) % 10_000, words), f"{prefix} {i}") for i in range(n)]


class SlowEmbedder(HashEmbedder):
    """HashEmbedder that takes ``per_text`` seconds of model time per text (in the calling thread)."""

    def __init__(self, per_text: float, fail_on: str | None = None) -> None:
        super().__init__()
        self.per_text = per_text
        self.fail_on = fail_on

    def embed(self, texts: list[str]) -> Vectors:
        if self.fail_on is not None and any(self.fail_on in t for t in texts):
            raise RuntimeError("the model broke")
        time.sleep(self.per_text * len(texts))
        return super().embed(texts)


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Settings]:
    def settings(**jobs: Any) -> Settings:
        return Settings(
            data_dir=tmp_path / "data",
            cache={"enabled": True, "redis_url": None},
            jobs={"batch_documents": 4, "poll_s": 0.1, **jobs},
        )

    return settings


async def wait_for(cond: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -------------------------------------------------------------------------------------- per-tenant writes


async def test_writer_locks_serialise_one_tenant_and_forget_idle_ones() -> None:
    locks = WriterLocks()
    order: list[str] = []

    async def write(tenant: str, name: str, hold: float) -> None:
        async with locks.hold(tenant):
            order.append(f"{name}+")
            await asyncio.sleep(hold)
            order.append(f"{name}-")

    await asyncio.gather(write("a", "a1", 0.05), write("a", "a2", 0.0), write("b", "b1", 0.0))
    assert order.index("a1-") < order.index("a2+")  # one tenant: one writer at a time
    assert order.index("b1-") < order.index("a1-")  # another tenant: no wait
    assert len(locks) == 0


async def test_tenant_b_does_not_wait_for_tenant_a(make: Callable[..., Settings]) -> None:
    emb = SlowEmbedder(0.01)  # A: ~150 chunks, ~1.5 s of model time
    async with AsyncRAG(make(), embedder=emb, llm=ScriptedLLM()) as rag:
        a = asyncio.create_task(rag.ingest(docs("a", 30, 800), "tenant-a"))
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        report = await rag.ingest([Document("b0", "Tenant B's one short document.")], "tenant-b")
        b_s = time.perf_counter() - t0
        assert report.added == 1
        assert not a.done(), "A finished first: the test measured nothing"
        print(f"tenant B's ingest took {b_s * 1000:.0f} ms while tenant A's ran")
        assert b_s < 1.0  # at most one 16-text slice of A's (0.16 s) before B's turn at the model
        assert (await a).added == 30
        assert len(rag._indexer.writers) == 0  # type: ignore[union-attr]


async def test_chunking_a_large_document_does_not_stall_the_event_loop(make: Callable[..., Settings]) -> None:
    async with AsyncRAG(make(), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        lag = 0.0
        stop = False

        async def ticker() -> None:
            nonlocal lag
            while not stop:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lag = max(lag, time.perf_counter() - t - 0.01)

        tick = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        await rag.ingest([Document("big", text(1, 150_000))], "t")  # ~1 MB, thousands of chunks
        took = time.perf_counter() - t0
        stop = True
        await tick
        print(f"1 MB ingest {took:.2f} s, longest event-loop stall {lag * 1000:.0f} ms")
        assert took > 0.5 and lag < 0.25


async def test_a_cancelled_ingest_leaves_the_tenant_writable(make: Callable[..., Settings]) -> None:
    async with AsyncRAG(make(), embedder=SlowEmbedder(0.005), llm=ScriptedLLM()) as rag:
        task = asyncio.create_task(rag.ingest(docs("a", 20, 600), "t"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(rag._indexer.writers) == 0  # type: ignore[union-attr]
        landed = rag.stats("t")["documents"]
        assert (await rag.ingest(docs("a", 20, 600), "t")).unchanged == landed  # committed steps are whole


# -------------------------------------------------------------------------------------------------- jobs


async def test_a_job_runs_in_steps_to_a_final_report(make: Callable[..., Settings]) -> None:
    async with AsyncRAG(make(), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        job = await rag.jobs.submit(docs("d", 10), "acme")
        assert job.state == "queued" and job.documents_total == 10
        done = await rag.jobs.wait(job.id, "acme", timeout=30)
        assert done.state == "succeeded" and done.error is None
        assert done.documents_done == 10 and done.report.added == 10 and done.report.chunks_added >= 10
        assert done.started_at is not None and done.finished_at is not None
        assert rag.stats("acme")["documents"] == 10
        assert (await rag.search("w1x w2x", tenant="acme"))[0].doc_id.startswith("d")
        assert [j.id for j in await rag.jobs.recent("acme")] == [job.id]
        again = await rag.jobs.wait((await rag.jobs.submit(docs("d", 10), "acme")).id, "acme", timeout=30)
        assert again.report.unchanged == 10 and again.report.chunks_embedded == 0
        # another tenant sees none of it
        assert await rag.jobs.recent("globex") == []
        for call in (rag.jobs.get, rag.jobs.cancel):
            with pytest.raises(NotFound):
                await call(job.id, "globex")
        store = JobStore(rag.settings.data_dir)
        try:
            assert store._db.execute("SELECT count(*) FROM job_docs").fetchone()[0] == 0  # input dropped
        finally:
            store.close()


async def test_cancel_stops_a_job_between_steps(make: Callable[..., Settings]) -> None:
    async with AsyncRAG(make(batch_documents=2), embedder=SlowEmbedder(0.01), llm=ScriptedLLM()) as rag:
        job = await rag.jobs.submit(docs("d", 40), "t")
        await wait_for(lambda: _done_at_least(rag, job.id, 2))
        t0 = time.perf_counter()
        cancelled = await rag.jobs.cancel(job.id, "t")
        print(f"cancel took {(time.perf_counter() - t0) * 1000:.0f} ms")
        assert cancelled.state == "cancelled" and cancelled.cancel_requested
        assert 2 <= cancelled.documents_done < 40 and "cancelled" in (cancelled.error or "")
        assert rag.stats("t")["documents"] >= cancelled.documents_done
        assert (await rag.jobs.cancel(job.id, "t")).state == "cancelled"  # idempotent


async def test_a_cancel_taken_by_another_process_reaches_the_runner(make: Callable[..., Settings]) -> None:
    async with AsyncRAG(make(batch_documents=2), embedder=SlowEmbedder(0.01), llm=ScriptedLLM()) as rag:
        job = await rag.jobs.submit(docs("d", 40), "t")
        await wait_for(lambda: _done_at_least(rag, job.id, 2))
        other = JobStore(rag.settings.data_dir)  # e.g. another worker, or `ragline jobs cancel`
        try:
            assert other.request_cancel(job.id, "t").state == "running"  # type: ignore[union-attr]
        finally:
            other.close()
        final = await rag.jobs.wait(job.id, "t", timeout=10)
        assert final.state == "cancelled" and final.documents_done < 40


async def test_a_failing_job_reports_how_far_it_got(make: Callable[..., Settings]) -> None:
    items = [*docs("d", 8), Document("bad", "this one says BOOM to the model"), *docs("e", 4)]
    async with AsyncRAG(make(), embedder=SlowEmbedder(0.0, fail_on="BOOM"), llm=ScriptedLLM()) as rag:
        job = await rag.jobs.wait((await rag.jobs.submit(items, "t")).id, "t", timeout=30)
        assert job.state == "failed" and job.documents_done == 8
        assert "internal error (RuntimeError)" in (job.error or "") and "8 of 13" in (job.error or "")


async def test_too_many_open_jobs_is_a_429(make: Callable[..., Settings]) -> None:
    async with AsyncRAG(make(max_open_per_tenant=1), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        await rag.jobs.submit(docs("d", 2), "t", start=False)
        with pytest.raises(RateLimited):
            await rag.jobs.submit(docs("e", 2), "t")
        await rag.jobs.submit(docs("e", 2), "other")  # per tenant


async def test_a_clean_stop_hands_jobs_back_and_the_next_process_finishes_them(make: Callable[..., Settings]) -> None:
    async with AsyncRAG(make(batch_documents=2), embedder=SlowEmbedder(0.01), llm=ScriptedLLM()) as rag:
        job = await rag.jobs.submit(docs("d", 30), "t")
        await wait_for(lambda: _done_at_least(rag, job.id, 2))
    store = JobStore(make().data_dir)
    try:
        handed = store.get(job.id)
        assert handed is not None and handed.state == "queued" and handed.owner == ""
    finally:
        store.close()
    async with AsyncRAG(make(), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        await rag.jobs.start()  # what the server does at start-up
        final = await rag.jobs.wait(job.id, "t", timeout=30)
        assert final.state == "succeeded" and final.documents_done == 30 and final.resumes == 0
        assert rag.stats("t")["documents"] == 30


def _dead_process_job(settings: Settings, items: list[Document], done: int, resumes: int = 0) -> str:
    """A job left ``running`` at step ``done`` by a process that died (its owner lock released, not handed back)."""
    store = JobStore(settings.data_dir)
    job = store.create("t", items, "api", 20)
    store.begin(job.id)
    store.advance(job.id, done, IngestReport(documents=done, added=done))
    store._db.execute("UPDATE jobs SET resumes = ? WHERE id = ?", (resumes, job.id))
    store._db.close()
    os.close(store._owner_fd)  # what the OS does when the process dies: the lock file stays, unlocked
    return job.id


async def test_a_dead_process_job_is_resumed_where_it_stopped(make: Callable[..., Settings]) -> None:
    items = docs("d", 12)
    async with AsyncRAG(make(), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        await rag.ingest(items[:4], "t")  # what the dead process had ingested
        store = rag.store
    del store
    job_id = _dead_process_job(make(), items, done=4)
    async with AsyncRAG(make(), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        assert (await rag.jobs.get(job_id, "t")).state == "running"  # a pipeline that does not adopt leaves it
        await rag.jobs.start()
        final = await rag.jobs.wait(job_id, "t", timeout=30)
        assert final.state == "succeeded" and final.resumes == 1 and final.documents_done == 12
        assert final.report.added == 12  # 4 before the crash + 8 after
        owners = list((rag.settings.data_dir / "jobs" / "owners").glob("*.lock"))
        assert len(owners) == 1  # the dead process's lock file was swept; this one's is held
        assert rag.stats("t")["documents"] == 12


@pytest.mark.parametrize("jobs", [{"resume": False}, {"max_resumes": 2}])
async def test_a_dead_process_job_that_may_not_resume_is_interrupted(
    make: Callable[..., Settings], jobs: dict[str, Any]
) -> None:
    job_id = _dead_process_job(make(), docs("d", 6), done=2, resumes=2)
    async with AsyncRAG(make(**jobs), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        await rag.jobs.start()
        job = await rag.jobs.get(job_id, "t")
        assert job.state == "interrupted" and job.finished_at is not None
        assert "2 of 6 documents" in (job.error or "") and "again is safe" in (job.error or "")


async def _done_at_least(rag: AsyncRAG, job_id: str, n: int) -> bool:
    return (await rag.jobs.get(job_id, "t")).documents_done >= n


# -------------------------------------------------------------------------------------------------- HTTP


async def test_job_routes(make: Callable[..., Settings]) -> None:
    base = make()
    s = base.model_copy(
        update={
            "server": base.server.model_copy(update={"api_keys": {"ka": "acme", "kb": "globex"}}),
            "limits": base.limits.model_copy(update={"max_sync_ingest_bytes": 5_000}),
        }
    )
    app = create_app(s, AsyncRAG(s, embedder=HashEmbedder(), llm=ScriptedLLM()))
    a, b = {"authorization": "Bearer ka"}, {"x-api-key": "kb"}
    body = {"documents": [{"id": d.id, "text": d.text, "title": d.title} for d in docs("d", 6)]}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await c.post("/v1/documents", json=body, headers=a)  # 6 x ~2.4 KB: over the synchronous bound
        assert r.status_code == 413 and "POST /v1/jobs" in r.json()["error"]["message"]
        r = await c.post("/v1/jobs", json=body, headers=a)
        assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        job = r.json()
        assert job["state"] == "queued" and job["progress"]["documents_total"] == 6 and "owner" not in job
        while (got := (await c.get(r.headers["location"], headers=a)).json())["state"] not in ("succeeded", "failed"):
            await asyncio.sleep(0.02)
        assert got["state"] == "succeeded" and got["report"]["added"] == 6 and got["progress"]["fraction"] == 1.0
        assert [j["id"] for j in (await c.get("/v1/jobs", headers=a)).json()["jobs"]] == [job["id"]]
        assert (await c.get("/v1/jobs", headers=b)).json()["jobs"] == []
        assert (await c.get(f"/v1/jobs/{job['id']}", headers=b)).status_code == 404
        assert (await c.delete(f"/v1/jobs/{job['id']}", headers=b)).status_code == 404
        assert (await c.delete(f"/v1/jobs/{job['id']}", headers=a)).json()["state"] == "succeeded"
        r = await c.post("/v1/documents?async=true", json=body, headers=b)
        assert r.status_code == 202 and r.json()["tenant"] == "globex"
        assert (await c.post("/v1/jobs", json={"documents": []}, headers=a)).status_code == 422
        assert (await c.post("/v1/jobs", json={"documents": [{"id": "x", "text": " "}]}, headers=a)).status_code == 400
        assert (await c.get("/v1/jobs?state=nope", headers=a)).status_code == 400
        assert (await c.get("/v1/jobs/job_nope", headers=a)).status_code == 404
        small = {"documents": [{"id": "s", "text": "A short one."}]}
        assert (await c.post("/v1/documents", json=small, headers=a)).json()["added"] == 1
        paths = (await c.get("/openapi.json")).json()["paths"]
        assert {"/v1/jobs", "/v1/jobs/{job_id}"} <= set(paths) and "202" in paths["/v1/jobs"]["post"]["responses"]
