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
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

DATA = REPO / ".." / "shared" / "data"
RESULTS = HERE / "results"


# wrk Lua: POST /v1/query with the JSON bodies of a file (one per line, %s), round robin; `%%` is a literal %
WRK_QUERY_LUA = """
local bodies = {}
local i = 0
for line in io.lines("%s") do bodies[#bodies + 1] = line end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, "/v1/query", nil, bodies[i])
end
"""


def write_report(path: Path, report: Any) -> None:
    """Write a benchmark's report as indented JSON (creating the folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {path}")


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


# -- cache invalidation benchmarks (churn.py, invalidation_scaling.py) -------------------------------------


def accepts_invalidation(mode: str) -> bool:
    """Whether this checkout's ``CacheSettings`` accepts ``cache.invalidation: mode``."""
    from pydantic import ValidationError

    from ragline.config import CacheSettings

    try:
        CacheSettings(invalidation=mode)  # type: ignore[arg-type]
    except ValidationError:
        return False
    return True


def resolve_mode(name: str) -> tuple[str, str]:
    """A benchmark mode → (the ``cache.invalidation`` value to run, a note on how it is realised).

    ``lazy`` (mark on change, re-verify on read) and ``eager`` (re-check at ingest) are the names of
    issue 15; before they land, eager is spelled ``precise`` and lazy falls back to the default mode.
    ``flush_all`` (also drop the LLM response cache) is emulated with ``flush`` plus a clear of the
    tenant's ``llm`` key prefix after each change (see :func:`after_change`) until it is accepted.
    """
    from ragline.config import CacheSettings

    if name in ("lazy", "ragline"):
        if accepts_invalidation("lazy"):
            return "lazy", "native"
        default = str(CacheSettings().invalidation)
        return default, f"'lazy' not accepted by this checkout: ran the default {default!r}"
    if name == "eager":
        return ("eager", "native") if accepts_invalidation("eager") else ("precise", "spelled 'precise' here")
    if name == "flush":
        return "flush", "native"
    if name == "flush_all":
        if accepts_invalidation("flush_all"):
            return "flush_all", "native"
        return "flush", "emulated: 'flush' + clear of the tenant's llm-cache prefix after each change"
    raise ValueError(f"unknown mode {name!r}")


async def after_change(rag: Any, mode_name: str, setting: str, tenant: str = "default") -> None:
    """The emulated part of ``flush_all`` (nothing for every other mode, or once it is native)."""
    if mode_name == "flush_all" and setting == "flush" and rag.cache is not None:
        from ragline.cache.keys import kind_prefix

        await rag.cache.tiers.clear(kind_prefix(tenant, "llm"))


class CountingLLM:
    """An LLM wrapper that counts the calls reaching the model (``calls``; ``held`` while ``paused``).

    Same ``id`` as the wrapped LLM, so cache keys and settings fingerprints are unchanged."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.id = inner.id
        self.calls = 0
        self.held = 0
        self.paused = False

    def _count(self) -> None:
        if self.paused:
            self.held += 1
        else:
            self.calls += 1

    async def complete(self, messages: Any, params: Any) -> Any:
        self._count()
        return await self.inner.complete(messages, params)

    def stream(self, messages: Any, params: Any) -> Any:
        self._count()
        return self.inner.stream(messages, params)

    async def aclose(self) -> None:
        await self.inner.aclose()


def extractive_llm() -> CountingLLM:
    """The default LLM (extractive), counted."""
    from ragline.config import LLMSettings
    from ragline.llm.extractive import ExtractiveLLM

    return CountingLLM(ExtractiveLLM(LLMSettings()))


def counter(rag: Any, name: str) -> int:
    return int(rag.cache.counter(name)) if rag.cache is not None else 0


COUNTERS = (
    "invalidation_marked",
    "invalidation_checked",
    "invalidation_kept",
    "invalidation_dropped",
    "reverify_on_read",
    "reverify_kept",
    "reverify_dropped",
    "clock_checked",
    "clock_unaffected",
    "clock_gone",
    "clock_recorded",
    "llm_calls_saved",
)


def counters(rag: Any) -> dict[str, int]:
    return {n: counter(rag, n) for n in COUNTERS}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}
