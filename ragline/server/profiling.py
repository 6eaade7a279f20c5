"""Per-request profiling for operators: ``"profile": true`` on ``POST /v1/query`` (admin key only).

The request runs as usual (same cache lookups, same pipeline) under a pyinstrument profiler in async
mode (only this request's task is sampled, every 5 ms) and tracemalloc; the answer comes back with a
``profile`` field: the call tree (``"text"``, the default, or ``"html"``/``"json"`` as pyinstrument
renders them), the wall time, and the top allocations (file:line, KiB, count) with the traced peak.

* Never for tenants: without a key it is a 401, with a tenant's key a 403 (a profile shows code paths,
  timings and file names of the server).  The flag is read only on the route's slow branch; the
  exact-hit path pays for one dict lookup.
* One profiled request at a time per process (tracemalloc is process-wide: the allocation summary
  includes whatever else the process allocated meanwhile, which is why it is off for everything else);
  a second one waits for the first.
* pyinstrument is an optional dependency (``pip install 'ragline[profile]'``); without it the flag is a
  501 that says so.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ragline.errors import InvalidInput, NotInstalled

__all__ = ["FORMATS", "profiled"]

T = TypeVar("T")

FORMATS = ("text", "html", "json")
TOP_ALLOCATIONS = 15
INTERVAL_S = 0.005
"""pyinstrument's sampling interval.  1 ms together with tracemalloc made a 10 ms request take 9-70 s
on a loaded 2-core host (every sample's bookkeeping allocates, and each allocation is traced); 5 ms
costs a few ms per request."""
_LOCK = asyncio.Lock()


def profile_format(flag: object) -> str:
    """``true`` → text; a format name → itself; anything else → 400."""
    if flag is True:
        return "text"
    if isinstance(flag, str) and flag in FORMATS:
        return flag
    raise InvalidInput(f"'profile' must be true or one of {', '.join(FORMATS)}")


def _profiler() -> Any:
    try:
        from pyinstrument import Profiler
    except ImportError:
        raise NotInstalled(
            "per-request profiling needs pyinstrument on the server: pip install 'ragline[profile]'"
        ) from None
    return Profiler(interval=INTERVAL_S, async_mode="enabled")


async def profiled(run: Callable[[], Awaitable[T]], fmt: str) -> tuple[T, dict[str, Any]]:
    """Run ``run()`` under pyinstrument and tracemalloc; its result and the profile report."""
    profiler = _profiler()
    async with _LOCK:
        started_tracing = not tracemalloc.is_tracing()
        if started_tracing:
            tracemalloc.start(1)  # one frame: allocations are summed by line
        tracemalloc.reset_peak()
        before = tracemalloc.take_snapshot()
        t0 = time.perf_counter()
        profiler.start()
        try:
            result = await run()
        finally:
            profiler.stop()
            wall_ms = (time.perf_counter() - t0) * 1000
            after = tracemalloc.take_snapshot()
            current, peak = tracemalloc.get_traced_memory()
            if started_tracing:
                tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    top = [
        {
            "where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
            "size_kib": round(s.size_diff / 1024, 2),
            "count": s.count_diff,
        }
        for s in stats[:TOP_ALLOCATIONS]
        if s.size_diff > 0
    ]
    if fmt == "html":
        tree: str = profiler.output_html()
    elif fmt == "json":
        from pyinstrument.renderers import JSONRenderer

        tree = profiler.output(JSONRenderer())
    else:
        tree = profiler.output_text(unicode=False, color=False)
    report = {
        "format": fmt,
        "wall_ms": round(wall_ms, 3),
        "tree": tree,
        "tracemalloc": {
            "top": top,
            "traced_peak_kib": round(peak / 1024, 1),
            "traced_current_kib": round(current / 1024, 1),
        },
    }
    return result, report
