"""Byte encodings of cached values (orjson), shared by the pipeline and the server.

Answers are stored as the exact JSON the API returns minus the per-request
fields (``cache``, ``timings``), so an exact hit is served by splicing those
in front of the stored bytes — no parse, no model, no re-serialisation.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from ragline.types import Answer, CacheInfo, Hit, Retrieval, Usage

CACHE_MISS = CacheInfo("miss")
CACHE_BYPASS = CacheInfo("bypass")
CACHE_L1 = CacheInfo("exact", "l1")
_EXACT = {"l1": CACHE_L1, "l2": CacheInfo("exact", "l2"), "l3": CacheInfo("exact", "l3")}
_INFO_BYTES: dict[CacheInfo, bytes] = {}


def exact(tier: str | None) -> CacheInfo:
    return _EXACT.get(tier or "", CacheInfo("exact", tier))


def answer_body(text: str, sources: list[Hit], usage: Usage, model: str, upstream: str = "") -> bytes:
    d: dict[str, Any] = {"answer": text, "sources": [h.to_dict() for h in sources], "usage": usage.to_dict()}
    d["model"] = model
    if upstream:  # the gateway's upstream that generated it (a cached copy keeps it)
        d["upstream"] = upstream
    return orjson.dumps(d)


def answer_from_body(d: dict[str, Any], info: CacheInfo, timings: dict[str, float]) -> Answer:
    u = d["usage"]
    return Answer(
        d["answer"],
        tuple(Hit(**h) for h in d["sources"]),
        Usage(u["prompt_tokens"], u["completion_tokens"]),
        timings,
        info,
        d.get("model", ""),
        d.get("upstream", ""),
    )


def response_bytes(body: bytes, info: CacheInfo, timings: dict[str, float] | None) -> bytes:
    """The API response: ``cache`` (and ``timings``) spliced in front of the stored body."""
    head = _INFO_BYTES.get(info)
    if head is None:
        head = orjson.dumps(info.to_dict())
        if info.similarity is None:  # only the fixed infos are memoised
            _INFO_BYTES[info] = head
    if timings is None:
        return b'{"cache":' + head + b"," + body[1:]
    return b'{"cache":' + head + b',"timings":' + orjson.dumps(timings) + b"," + body[1:]


def retrieval_to_bytes(r: Retrieval) -> bytes:
    return orjson.dumps(
        {"h": [h.to_dict() for h in r.hits], "dc": r.dense_cutoff, "kc": r.keyword_cutoff, "c": r.candidate_ids}
    )


def retrieval_from_bytes(data: bytes) -> Retrieval:
    d = orjson.loads(data)
    return Retrieval([Hit(**h) for h in d["h"]], d["dc"], d["kc"], tuple(d["c"]))


async def replay_events(
    body: bytes, info: CacheInfo, timings: dict[str, float], t0: float
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A stored answer as the event sequence a fresh streamed generation produces."""
    d = orjson.loads(body)
    yield "sources", {"sources": d["sources"]}
    words = d["answer"].split(" ")
    for i, w in enumerate(words):
        yield "delta", {"text": w if i == 0 else " " + w}
    timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
    done = {"usage": d["usage"], "timings": timings, "model": d.get("model", "")}
    if "upstream" in d:
        done["upstream"] = d["upstream"]
    yield "done", {**done, "cache": info.to_dict()}
