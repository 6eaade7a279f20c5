"""Command line: ingest | delete | search | ask | serve | bench | cache | jobs.

Every command builds ``Settings`` once (``--config`` YAML, ``RAGLINE_*`` env,
``--data-dir``) and drives the same pipeline the server uses.  Errors a user
can fix print one line on stderr and exit with status 2 (1 for internal ones).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ragline.config import Settings
from ragline.errors import RaglineError
from ragline.types import DEFAULT_TENANT

T = TypeVar("T")
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ragline: fast, cache-first retrieval-augmented generation.",
)
err = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="where the index lives (default ./.ragline)")]
TenantOpt = Annotated[str, typer.Option("--tenant", help="tenant to read or write")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="a running ragline server, e.g. http://127.0.0.1:8080")]
ApiKeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="RAGLINE_API_KEY", help="--url: sent as Authorization: Bearer")
]


def _settings(config: Path | None, data_dir: Path | None, **extra: Any) -> Settings:
    overrides: dict[str, Any] = dict(extra)
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        return Settings.load(config, **overrides)
    except RaglineError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except RaglineError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1 if exc.status >= 500 else 2) from None


async def _with_rag(settings: Settings, fn: Any) -> Any:
    from ragline.pipeline import AsyncRAG

    async with AsyncRAG(settings) as rag:
        return await fn(rag)


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
    settings = _settings(config, data_dir)
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

            def skipped(path: Path, why: str) -> None:
                err.print(f"[yellow]skipped[/yellow] {path}: {why}", highlight=False, soft_wrap=True)

            docs = iter_documents([str(p) for p in paths], settings.limits, on_skip=skipped)
            return await rag.ingest(docs, tenant, progress)

    report = _run(_with_rag(settings, go))
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

    jobs = _run(remote()) if url is not None else _run(_with_rag(settings, local))
    _print_jobs(jobs, json)
    if any(j["state"] in ("failed", "interrupted", "cancelled") for j in jobs):
        raise typer.Exit(1)


def _print_jobs(jobs: list[dict[str, Any]], json: bool) -> None:
    if json:
        sys.stdout.write(orjson.dumps(jobs, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    from ragline.jobclient import describe

    for j in jobs:
        out.print(describe(j), highlight=False, soft_wrap=True)
    if not jobs:
        out.print("no jobs")


@app.command()
def delete(
    doc_ids: Annotated[list[str], typer.Argument(help="document ids")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
) -> None:
    """Delete documents and their chunks."""
    settings = _settings(config, data_dir)
    removed = _run(_with_rag(settings, lambda rag: rag.delete(doc_ids, tenant)))
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
    settings = _settings(config, data_dir)
    hits = _run(_with_rag(settings, lambda rag: rag.search(query, k, tenant, doc_level=docs)))
    if json:
        sys.stdout.write(
            orjson.dumps({"hits": [h.to_dict() for h in hits]}, option=orjson.OPT_INDENT_2).decode() + "\n"
        )
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
    settings = _settings(config, data_dir)
    answer = _run(_with_rag(settings, lambda rag: rag.ask(question, k, tenant)))
    if json:
        sys.stdout.write(orjson.dumps(answer.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    out.print(answer.text, highlight=False)
    if answer.sources:
        out.print("\n[bold]Sources[/bold]")
        for i, h in enumerate(answer.sources, 1):
            out.print(f"  [{i}] {h.doc_id}{' — ' + h.title if h.title else ''}", highlight=False)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes")] = None,
    ingest_path: Annotated[list[Path] | None, typer.Option("--ingest", help="ingest before serving")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    import uvicorn

    if config is not None:
        os.environ["RAGLINE_CONFIG"] = str(config.resolve())
    if data_dir is not None:
        os.environ["RAGLINE_DATA_DIR"] = str(data_dir.resolve())
    settings = _settings(None, None)
    if ingest_path:
        ingest(ingest_path, None, None, DEFAULT_TENANT, False)
    host = host or settings.server.host
    port = settings.server.port if port is None else port
    workers = workers or settings.server.workers
    if workers > 1:
        _multiprocess_metrics()
    err.print(f"ragline starting on http://{host}:{port} ({workers} worker{'s' if workers > 1 else ''})…")
    _announce_when_serving(host, port, f"ragline serving {settings.data_dir} on http://{host}:{port}  (docs: /docs)")
    srv = settings.server
    os.environ["RAGLINE_READ_TIMEOUT_S"] = str(srv.request_read_timeout_s)  # read by the protocol, in every worker
    os.environ["RAGLINE_MAX_HEADER_BYTES"] = str(srv.max_header_bytes)
    options: dict[str, Any] = dict(
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        access_log=False,
        http="ragline.server.protocol:ReadDeadlineProtocol",
        timeout_keep_alive=int(srv.keep_alive_s),
        limit_concurrency=srv.max_connections,
        h11_max_incomplete_event_size=srv.max_header_bytes,
    )
    if workers > 1:  # uvicorn's supervisor, with SIGHUP forwarded to the workers as a hot reload
        from ragline.server.supervisor import serve_workers

        serve_workers(uvicorn.Config("ragline.server.app:create_app", **options))
        return
    uvicorn.run("ragline.server.app:create_app", **options)


def _announce_when_serving(host: str, port: int, line: str, timeout_s: float = 600.0) -> None:
    """Print ``line`` once the server answers ``/healthz``, i.e. once a worker has loaded the model and
    accepts requests (uvicorn blocks this thread; a daemon thread polls the port until then)."""
    import threading
    import time

    import httpx

    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://[{target}]:{port}/healthz" if ":" in target else f"http://{target}:{port}/healthz"

    def poll() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=2.0, trust_env=False).status_code < 500:
                    err.print(line)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)

    threading.Thread(target=poll, name="ragline-announce", daemon=True).start()


def _multiprocess_metrics() -> None:
    """Workers are separate processes, each with its own counters: prometheus-client's multiprocess
    mode has every worker write its samples to files in one directory, and ``/metrics`` (whichever
    worker answers) sums them.  A directory the user set is used as it is; otherwise a fresh one,
    removed at exit (stale files from an earlier run would be summed in)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="ragline-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # inherited by the workers uvicorn spawns
    atexit.register(shutil.rmtree, path, ignore_errors=True)


@app.command()
def migrate(
    to: Annotated[str, typer.Option("--to", help="the PostgreSQL DSN to copy into (or set RAGLINE_POSTGRES_DSN)")] = "",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    batch: Annotated[int, typer.Option(help="documents per transaction")] = 64,
) -> None:
    """Copy an embedded data dir into PostgreSQL (schema created or migrated first); no re-embedding."""
    from ragline.store.embedded import EmbeddedStore
    from ragline.store.migrate import copy_store
    from ragline.store.postgres import PostgresStore

    settings = _settings(config, data_dir)
    dsn = to or (settings.postgres_dsn.get_secret_value() if settings.postgres_dsn is not None else "")
    if not dsn:
        raise _usage_error("give the target with --to postgresql://... or RAGLINE_POSTGRES_DSN")
    if not (settings.data_dir / "store.sqlite3").exists():
        raise _usage_error(f"no embedded store in {settings.data_dir}")
    meta = (
        sqlite3.connect(settings.data_dir / "store.sqlite3")
        .execute("SELECT value FROM meta WHERE key='dim'")
        .fetchone()
    )
    dim = int(meta[0]) if meta else 384

    def run() -> dict[str, int]:
        src = EmbeddedStore(settings.data_dir, dim)
        dst = PostgresStore(dsn, dim)
        try:
            return copy_store(src, dst, batch=batch, progress=lambda t, n: err.print(f"  {t}: {n} documents"))
        finally:
            src.close()
            dst.close()

    try:
        copied = run()
    except RaglineError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(", ".join(f"{t}: {n} documents" for t, n in copied.items()) or "nothing to copy")


def _usage_error(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


@app.command()
def bench(
    queries: Annotated[
        Path, typer.Option("--queries", help='queries file: one per line, or JSON lines with a "query" or "text" field')
    ],
    url: Annotated[
        str | None,
        typer.Option("--url", help="a running ragline server, e.g. http://127.0.0.1:8080 (only this URL is loaded)"),
    ] = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    concurrency: Annotated[int, typer.Option(help="concurrent requests (closed loop)")] = 4,
    duration: Annotated[float, typer.Option(help="stop after this many seconds")] = 10.0,
    requests: Annotated[int, typer.Option("--requests", help="stop after this many requests")] = 1000,
    warmup: Annotated[int, typer.Option(help="unmeasured requests first")] = 0,
    timeout: Annotated[float, typer.Option(help="per-request timeout, seconds")] = 30.0,
    k: Annotated[int | None, typer.Option("-k", help="chunks to retrieve")] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="RAGLINE_BENCH_API_KEY", help="sent as Authorization: Bearer (--url only)"),
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="tenant (--data-dir only)")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="write the JSON report here (default: stdout)")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="also plot the report (needs matplotlib)")] = None,
) -> None:
    """Bounded load on your deployment: req/s, p50/p99, cache hit rate and status mix (JSON, optional PNG).

    Against a running server (--url, POST /v1/query) or in-process against a data dir (--data-dir).
    """
    from ragline import loadtest

    if (url is None) == (data_dir is None):
        raise _usage_error("give exactly one of --url (a running server) or --data-dir (in-process)")
    if png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _usage_error("--png needs matplotlib: pip install matplotlib (or ragline[bench])") from None
    cfg = loadtest.BenchConfig(
        concurrency=concurrency,
        duration_s=duration,
        max_requests=requests,
        timeout_s=timeout,
        warmup=warmup,
        k=k,
        tenant=tenant,
        api_key=api_key,
    )
    try:
        cfg.check()
        qs = loadtest.read_queries(queries)
        if url is not None:
            base = loadtest.check_url(url)
            report = _run(loadtest.bench_url(base, qs, cfg))
        else:
            settings = _settings(config, data_dir)
            report = _run(loadtest.bench_data_dir(settings, qs, cfg))
    except ValueError as exc:
        raise _usage_error(str(exc)) from None
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(text)
    else:
        sys.stdout.write(text)
    if png is not None:
        loadtest.write_png(report, png)
    lat = report["latency_ms"]
    err.print(
        f"{report['requests']} requests in {report['duration_s']:.1f} s ({report['stopped_by']}): "
        f"{report['rps']:.1f} req/s, p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, cache hit rate "
        f"{report['cache']['hit_rate']:.2f}, status {report['status']}",
        highlight=False,
        soft_wrap=True,
    )
    if report["ok"] == 0:
        err.print(f"[red]error:[/red] no request succeeded: {report['error_kinds']}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


cache_app = typer.Typer(help="Inspect and invalidate the cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("stats")
def cache_stats(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Tier sizes, hit/miss counts, dependency records and semantic entries."""
    settings = _settings(config, data_dir)

    async def go(rag: Any) -> Any:
        return rag.cache.stats() if rag.cache is not None else {"enabled": False}

    sys.stdout.write(orjson.dumps(_run(_with_rag(settings, go)), option=orjson.OPT_INDENT_2).decode() + "\n")


@cache_app.command("clear")
def cache_clear(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Drop every cached entry in every tier (documents are untouched)."""
    settings = _settings(config, data_dir)
    n = _run(_with_rag(settings, lambda rag: rag.invalidate(everything=True)))
    out.print(f"cleared {n} cache entries")


@cache_app.command("invalidate")
def cache_invalidate(
    tenant: TenantOpt = DEFAULT_TENANT,
    doc: Annotated[str | None, typer.Option("--doc", help="only entries using this document")] = None,
    key: Annotated[str | None, typer.Option("--key", help="one cache key")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Invalidate one key, one document's dependents, or a whole tenant."""
    settings = _settings(config, data_dir)
    if key is not None:
        n = _run(_with_rag(settings, lambda rag: rag.invalidate(key=key)))
    else:
        n = _run(_with_rag(settings, lambda rag: rag.invalidate(tenant=tenant, doc_id=doc)))
    out.print(f"invalidated {n} cache entries")


jobs_app = typer.Typer(help="Background ingest jobs: list, show, cancel.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def _jobs(
    url: str | None, api_key: str | None, config: Path | None, data_dir: Path | None, tenant: str, fn: Any
) -> Any:
    """Run ``fn(jobs)`` against a server (``--url``) or the data dir's jobs database."""
    from ragline import jobclient

    async def go() -> Any:
        client: Any = (
            jobclient.HttpJobs(url, api_key)
            if url is not None
            else jobclient.LocalJobs(_settings(config, data_dir).data_dir, tenant)
        )
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return _run(go())


@jobs_app.command("list")
def jobs_list(
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(help="newest first, at most this many")] = 20,
    json: JsonOpt = False,
) -> None:
    """The tenant's recent jobs (with --url: the API key's tenant)."""
    _print_jobs(_jobs(url, api_key, config, data_dir, tenant, lambda c: c.recent(limit, state)), json)


@jobs_app.command("show")
def jobs_show(
    job_id: str,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    watch: Annotated[bool, typer.Option("--watch", help="follow it with a progress bar until it finishes")] = False,
    json: JsonOpt = False,
) -> None:
    """One job: state, progress, error, report."""
    from ragline.jobclient import watch as follow

    async def show(c: Any) -> list[dict[str, Any]]:
        return await follow(c, [job_id], err, quiet=json) if watch else [await c.get(job_id)]

    _print_jobs(_jobs(url, api_key, config, data_dir, tenant, show), json)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    tenant: TenantOpt = DEFAULT_TENANT,
    json: JsonOpt = False,
) -> None:
    """Cancel a job: it stops at its next step (the process running it notices within jobs.poll_s)."""

    async def cancel(c: Any) -> list[dict[str, Any]]:
        return [await c.cancel(job_id)]

    _print_jobs(_jobs(url, api_key, config, data_dir, tenant, cancel), json)


def main() -> None:
    try:
        app()
    except RaglineError as exc:  # raised outside _run (e.g. settings)
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
