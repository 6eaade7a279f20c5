"""``ragline serve``: uvicorn with ragline's protocol limits, one or many workers, announced once it answers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ragline.cli.common import (
    ConfigOpt,
    DataDirOpt,
    app,
    err,
    settings_of,
)
from ragline.cli.docs import ingest
from ragline.types import DEFAULT_TENANT


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
    settings = settings_of(None, None)
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
