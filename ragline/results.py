"""What the query flow hands back: :class:`Generated` (step 7's output), :class:`Result` (an answer as
served) and the relay of a streamed answer (``AsyncRAG.ask_stream``), kept apart from the flow itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ragline.codec import CACHE_MISS, answer_from_body, replay_events
from ragline.llm.base import Completion
from ragline.types import Answer, CacheInfo, Hit, Usage

__all__ = ["Event", "Generated", "Result", "Timings", "generated", "start_stream"]

Timings = dict[str, float]
Event = tuple[str, dict[str, Any]]


@dataclass(slots=True)
class Generated:
    """What step 7 produced: the answer text and the sources it cites."""

    text: str
    sources: list[Hit]
    usage: Usage
    model: str
    complete: bool = True
    """Ran to completion (a stream that stopped early, or the gateway's extractive last resort, is not cached)."""
    upstream: str = ""
    """Which upstream answered (gateway only)."""


@dataclass(slots=True)
class Result:
    """An answer as served: its stored bytes, how it was served, and (fresh only) its parts."""

    body: bytes
    info: CacheInfo
    fresh: Generated | None = None

    def answer(self, timings: Timings) -> Answer:
        f = self.fresh
        if f is None:  # from a cache: the stored bytes are all there is
            return answer_from_body(orjson.loads(self.body), self.info, timings)
        return Answer(f.text, tuple(f.sources), f.usage, timings, self.info, f.model, f.upstream)


async def start_stream(
    run: Callable[[Callable[[Event], None]], Awaitable[Result]], timings: Timings, t0: float
) -> AsyncIterator[Event]:
    """Start ``run(send)`` and wait for its first event: a generation of this caller's is relayed as
    it streams; anything else (a cached answer, another caller's generation) is replayed."""
    events: asyncio.Queue[Event | None] = asyncio.Queue()  # None: the task is done
    task = asyncio.ensure_future(run(events.put_nowait))
    task.add_done_callback(lambda _: events.put_nowait(None))
    try:
        first = await events.get()
    except BaseException:
        task.cancel()
        raise
    if first is None:  # no generation of ours: a cached answer, or another caller's
        r = task.result()
        return replay_events(r.body, r.info, timings, t0)
    return _relay(first, events, task, timings, t0)


async def _relay(
    first: Event, events: asyncio.Queue[Event | None], task: asyncio.Future[Result], timings: Timings, t0: float
) -> AsyncIterator[Event]:
    """This caller's generation, event by event; a failure surfaces mid-stream."""
    try:
        yield first
        while (event := await events.get()) is not None:
            yield event
        r = task.result()
    finally:
        if not task.done():  # the client went away: the work stops unless another caller awaits it
            task.cancel()
    assert r.fresh is not None
    timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
    yield (
        "done",
        {
            "usage": r.fresh.usage.to_dict(),
            "timings": timings,
            "model": r.fresh.model,
            **({"upstream": r.fresh.upstream} if r.fresh.upstream else {}),
            "cache": CACHE_MISS.to_dict(),
        },
    )


def generated(done: Completion, sources: list[Hit], complete: bool) -> Generated:
    return Generated(done.text, sources, done.usage, done.model, complete, done.upstream)
