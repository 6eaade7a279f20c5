"""Helpers shared by the benchmark scripts (not installed; run them from a checkout).

Importing this module puts the repository root first on ``sys.path``, so
``python benchmarks/<name>.py`` measures the checkout's ``ragline`` even when
another copy is installed.  Data sets are read from ``../shared/data`` at run time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402

DATA = REPO / ".." / "shared" / "data"
RESULTS = HERE / "results"


def load_beir(folder: Path, split: str = "test") -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Queries that appear in the split's qrels, and the qrels (CRLF-tolerant)."""
    qrels: dict[str, dict[str, int]] = {}
    lines = (folder / "qrels" / f"{split}.tsv").read_text().splitlines()
    for line in lines[1:]:
        parts = line.strip().split("\t")
        if len(parts) == 3:
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries = {}
    for raw in (folder / "queries.jsonl").read_bytes().splitlines():
        q = orjson.loads(raw)
        if str(q["_id"]) in qrels:
            queries[str(q["_id"])] = q["text"]
    return queries, qrels


def percentiles(seconds: Sequence[float], digits: int = 3) -> dict[str, float]:
    """p50/p99/mean in milliseconds of latencies given in seconds."""
    a = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), digits),
        "p99_ms": round(float(np.percentile(a, 99)), digits),
        "mean_ms": round(float(a.mean()), digits),
        "n": int(a.size),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**values: str) -> dict[str, str]:
    """The current environment without any RAGLINE_* setting, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGLINE_")}
    env.update(values)
    return env


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess whose stdout+stderr go to ``log``; terminated (then killed) on exit."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def wait_http(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    *,
    path: str,
    timeout_s: float,
    log_marker: str | None = None,
    marker_count: int = 1,
) -> None:
    """Until ``GET path`` answers 200 (and ``log_marker`` appears ``marker_count`` times in the log)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=5, trust_env=False) as c:
        while True:
            ok = False
            with contextlib.suppress(httpx.HTTPError):
                ok = c.get(path).status_code == 200
            if ok and (log_marker is None or log.read_text(errors="replace").count(log_marker) >= marker_count):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{url} not ready after {timeout_s:.0f} s:\n{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.3)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants so far."""
    import psutil  # type: ignore[import-untyped]

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total
