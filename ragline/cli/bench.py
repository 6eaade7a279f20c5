"""``ragline bench``: bounded load on a deployment (a server URL or a data dir in process)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ragline.cli.common import (
    ConfigOpt,
    DataDirOpt,
    app,
    err,
    json_text,
    run,
    settings_of,
    usage_error,
)


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
        raise usage_error("give exactly one of --url (a running server) or --data-dir (in-process)")
    if png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise usage_error("--png needs matplotlib: pip install matplotlib (or ragline[bench])") from None
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
            report = run(loadtest.bench_url(base, qs, cfg))
        else:
            settings = settings_of(config, data_dir)
            report = run(loadtest.bench_data_dir(settings, qs, cfg))
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    text = json_text(report)
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
