"""The operator commands: ``cache`` (stats, clear, invalidate) and ``jobs`` (list, show, cancel)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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
from ragline.types import DEFAULT_TENANT

cache_app = typer.Typer(help="Inspect and invalidate the cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("stats")
def cache_stats(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Tier sizes, hit/miss counts, dependency records and semantic entries."""
    settings = settings_of(config, data_dir)

    async def go(rag: Any) -> Any:
        return rag.cache.stats() if rag.cache is not None else {"enabled": False}

    print_json(run(with_rag(settings, go)))


@cache_app.command("clear")
def cache_clear(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Drop every cached entry in every tier (documents are untouched)."""
    settings = settings_of(config, data_dir)
    n = run(with_rag(settings, lambda rag: rag.invalidate(everything=True)))
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
    settings = settings_of(config, data_dir)
    if key is not None:
        n = run(with_rag(settings, lambda rag: rag.invalidate(key=key)))
    else:
        n = run(with_rag(settings, lambda rag: rag.invalidate(tenant=tenant, doc_id=doc)))
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
            else jobclient.LocalJobs(settings_of(config, data_dir).data_dir, tenant)
        )
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return run(go())


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
    print_jobs(_jobs(url, api_key, config, data_dir, tenant, lambda c: c.recent(limit, state)), json)


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

    print_jobs(_jobs(url, api_key, config, data_dir, tenant, show), json)


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

    print_jobs(_jobs(url, api_key, config, data_dir, tenant, cancel), json)
