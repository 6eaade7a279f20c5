"""``ragline serve --workers 2``: a real uvicorn master with two worker processes (issue 8).

``/metrics`` must report the sum over the workers, whichever worker answers the scrape.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A server with two workers and the directory their metric sample files go to."""
    port = _free_port()
    log = (tmp_path / "serve.log").open("w+b")
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {**os.environ, "RAGLINE_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    cmd = [
        str(Path(sys.executable).parent / "ragline"),
        "serve",
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"ragline serve exited with status {proc.returncode}:\n{log.read()[-4000:].decode()}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"ragline serve not ready after 120 s:\n{log.read()[-4000:].decode()}")
            time.sleep(0.5)
        yield url, prom
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _count(text: str, route: str) -> float:
    """Sum of ``ragline_http_request_duration_seconds_count`` samples of ``route``."""
    pat = re.compile(r"^ragline_http_request_duration_seconds_count\{([^}]*)\} (\S+)$", re.M)
    return sum(float(v) for labels, v in pat.findall(text) if f'route="{route}"' in labels)


def _per_worker(prom: Path, route: str) -> dict[str, float]:
    """Each worker's own count of ``route`` requests, read from its sample file alone."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    out: dict[str, float] = {}
    for f in prom.glob("histogram_*.db"):
        with tempfile.TemporaryDirectory() as one:
            shutil.copy(f, one)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=one)  # type: ignore[no-untyped-call]
            out[f.stem.split("_")[-1]] = _count(generate_latest(registry).decode(), route)
    return out


def test_metrics_are_summed_over_workers(two_workers: tuple[str, Path]) -> None:
    url, prom = two_workers
    n = 80

    def one(_: int) -> int:  # a new connection per request: the workers compete for each accept
        return httpx.get(url + "/healthz", timeout=10, headers={"connection": "close"}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(n))) == {200}
    scrapes = [httpx.get(url + "/metrics", timeout=10, headers={"connection": "close"}).text for _ in range(8)]
    assert {_count(s, "/healthz") for s in scrapes} == {float(n)}  # every scrape, from either worker, sees all
    per_worker = _per_worker(prom, "/healthz")
    # the master process has a (zero) file too; both workers served some of the requests
    assert sum(per_worker.values()) == n and sum(v > 0 for v in per_worker.values()) == 2, per_worker
