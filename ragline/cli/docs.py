"""The corpus commands: ingest (in process or as background jobs), delete, search, ask."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ragline.cli.common import (
    ApiKeyOpt,
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    TenantOpt,
    UrlOpt,
    app,
    err,
    out,
    print_jobs,
    print_json,
    run,
    settings_of,
    with_rag,
)
from ragline.config import Settings
from ragline.types import DEFAULT_TENANT


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="files or folders (.txt .md .html .pdf .jsonl)")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    json: JsonOpt = False,
    background: Annotated[
        bool, typer.Option("--background", help="as a background job: progress, cancel, resumed after a crash")
    ] = False,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    wait: Annotated[bool, typer.Option(help="--background: follow the job to its end (else: print its id)")] = True,
) -> None:
    """Add or update documents; unchanged files cost no embedding work.

    --url sends them to a running server as background jobs (POST /v1/jobs); --background without it
    runs a job in this process (with --no-wait it is left queued for the server on this data dir)."""
    for p in paths:
        if not p.exists():
            err.print(f"[red]error:[/red] no such file or folder: {p}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    settings = settings_of(config, data_dir)
    if background or url is not None:
        _ingest_job(paths, settings, tenant, url, api_key, wait, json)
        return

    async def go(rag: Any) -> Any:
        with Progress(
            TextColumn("[bold]ingest"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} docs/s"),
            TimeElapsedColumn(),
            console=err,
            disable=json or not err.is_terminal,
        ) as bar:
            task = bar.add_task("ingest", total=None, rate="-")
            import time

            t0 = time.perf_counter()

            def progress(n: int) -> None:
                bar.advance(task, n)
                done = bar.tasks[0].completed
                bar.update(task, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}")

            from ragline.ingest.loaders import iter_documents

            docs = iter_documents([str(p) for p in paths], settings.limits, on_skip=_skipped)
            return await rag.ingest(docs, tenant, progress)

    report = run(with_rag(settings, go))
    if json:
        out.print_json(orjson.dumps(report.to_dict()).decode())
    else:
        out.print(
            f"{report.documents} documents: {report.added} added, {report.updated} updated, "
            f"{report.unchanged} unchanged; {report.chunks_added} chunks written, "
            f"{report.chunks_embedded} embedded, {report.chunks_removed} removed"
        )


def _skipped(path: Path, why: str) -> None:
    err.print(f"[yellow]skipped[/yellow] {path}: {why}", highlight=False, soft_wrap=True)


def _ingest_job(
    paths: list[Path], settings: Settings, tenant: str, url: str | None, api_key: str | None, wait: bool, json: bool
) -> None:
    """``ingest --background`` / ``--url``: submit jobs, follow them with a progress bar, print their reports."""
    from ragline import jobclient
    from ragline.ingest.loaders import iter_documents

    docs = iter_documents([str(p) for p in paths], settings.limits, on_skip=_skipped)

    async def remote() -> list[dict[str, Any]]:
        client = jobclient.HttpJobs(url or "", api_key)
        try:
            bodies = jobclient.request_bodies(docs, settings.limits.max_request_bytes // 2, settings.jobs.max_documents)
            ids = [(await client.submit(body))["id"] for body in bodies]
            return await jobclient.watch(client, ids, err, quiet=json) if wait else [await client.get(i) for i in ids]
        finally:
            await client.aclose()

    async def local(rag: Any) -> list[dict[str, Any]]:
        job = await rag.jobs.submit(docs, tenant, source="cli", start=wait)
        if not wait:
            return [job.to_dict()]
        return await jobclient.watch(jobclient.PipelineJobs(rag.jobs, tenant), [job.id], err, quiet=json)

    jobs = run(remote()) if url is not None else run(with_rag(settings, local))
    print_jobs(jobs, json)
    if any(j["state"] in ("failed", "interrupted", "cancelled") for j in jobs):
        raise typer.Exit(1)


@app.command()
def delete(
    doc_ids: Annotated[list[str], typer.Argument(help="document ids")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
) -> None:
    """Delete documents and their chunks."""
    settings = settings_of(config, data_dir)
    removed = run(with_rag(settings, lambda rag: rag.delete(doc_ids, tenant)))
    out.print(f"deleted {len(doc_ids)} document(s), {len(removed)} chunks")


@app.command()
def search(
    query: str,
    k: Annotated[int, typer.Option("-k", help="number of results")] = 10,
    docs: Annotated[bool, typer.Option("--docs", help="best chunk per document")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    json: JsonOpt = False,
) -> None:
    """Hybrid search: dense and BM25 in parallel, fused with RRF."""
    settings = settings_of(config, data_dir)
    hits = run(with_rag(settings, lambda rag: rag.search(query, k, tenant, doc_level=docs)))
    if json:
        print_json({"hits": [h.to_dict() for h in hits]})
        return
    if not hits:
        out.print("no results")
    for i, h in enumerate(hits, 1):
        ranks = f"dense #{h.dense_rank or '-'}  bm25 #{h.keyword_rank or '-'}"
        out.print(
            f"[bold]{i:>2}. {h.doc_id}[/bold] [dim]({h.chunk_id}, rrf {h.score:.4f}, {ranks})[/dim]", highlight=False
        )
        if h.title:
            out.print(f"    {h.title}", highlight=False)
        snippet = " ".join(h.text.split())
        out.print(f"    {snippet[:200]}{'…' if len(snippet) > 200 else ''}", highlight=False)


@app.command()
def ask(
    question: str,
    k: Annotated[int | None, typer.Option("-k", help="chunks to retrieve")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    json: JsonOpt = False,
) -> None:
    """Answer a question from the indexed documents, with numbered citations."""
    settings = settings_of(config, data_dir)
    answer = run(with_rag(settings, lambda rag: rag.ask(question, k, tenant)))
    if json:
        print_json(answer.to_dict())
        return
    out.print(answer.text, highlight=False)
    if answer.sources:
        out.print("\n[bold]Sources[/bold]")
        for i, h in enumerate(answer.sources, 1):
            out.print(f"  [{i}] {h.doc_id}{' — ' + h.title if h.title else ''}", highlight=False)
