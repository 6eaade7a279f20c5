"""Churn benchmark: hit rate, staleness and work of each invalidation mode while the corpus changes (issue 15).

    python benchmarks/churn.py [--data ../shared/data/scifact] [--docs N] [--batch 50]
                               [--queries-per-round 100,50,200] [--embeddings PATH]
                               [--seed 7 | --seeds 7,8,9] [--modes ragline,eager,flush,flush_all]

On BEIR SciFact: ingest 80% of the corpus, then alternate ingest batches (the
remaining 20%, ``batch`` documents at a time, plus updates and deletes of
existing documents) with a replay of the train+test queries drawn from a Zipf
distribution.  Every answer served from cache (exact or semantic) is checked
against a fresh, cache-bypassing run: for an exact hit its context chunk ids and
texts must be equal; for a semantic hit (another query's answer) every chunk its
answer rests on (the chunks it cites, else its top three) must be in the fresh
context with the same text — otherwise the hit was stale.  The check is not part of any measurement
(time, CPU, LLM calls).

The same workload runs in one process on identical data in each mode:

* ``ragline``: ``cache.invalidation: lazy`` (a change marks, a hit re-verifies);
* ``eager``: the re-check of every affected entry at ingest (spelled ``precise`` before issue 15);
* ``flush``: drop every answer and retrieval entry on each change, keep the LLM response cache;
* ``flush_all``: also drop the LLM response cache (emulated before it is a setting: see ``_common``).

Measured per mode: ingest and query wall time, work in CPU seconds of the
process (``time.process_time``, every thread) during ingests and queries, the
calls that reach the LLM (a counting wrapper around the default extractive
LLM), hit rate, stale hits, and per-query latency by how it was served (a
plain exact hit, a hit that needed re-verification, a miss).  Embeddings are
computed once and shared (a memo in front of the model), so the comparison is
about the cache, not the model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from _common import (
    DATA,
    RESULTS,
    after_change,
    clean_env,
    counters,
    delta,
    extractive_llm,
    free_port,
    percentiles,
    process,
    resolve_mode,
)

from ragline.cache.semantic_match import evidence_of
from ragline.config import EmbedderSettings, Settings
from ragline.embed.local import LocalEmbedder
from ragline.ingest.loaders import iter_documents
from ragline.pipeline import AsyncRAG
from ragline.types import Document, Vectors

MODES = ("ragline", "eager", "flush", "flush_all")
LABELS = {
    "ragline": "ragline (lazy)",
    "eager": "eager re-check",
    "flush": "flush (LLM cache kept)",
    "flush_all": "flush everything",
}
COLORS = {"ragline": "tab:green", "eager": "tab:olive", "flush": "tab:gray", "flush_all": "tab:red"}


class MemoEmbedder:
    """The real model behind a text → vector memo, shared by every run (optionally saved to disk)."""

    def __init__(self, inner: LocalEmbedder, path: Path | None = None) -> None:
        self.inner = inner
        self.id = inner.id
        self.dim = inner.dim
        self.tokenizer_file = inner.tokenizer_file
        self.memo: dict[str, Vectors] = {}
        self.path = path
        self.saved = 0
        if path is not None and path.with_suffix(".json").exists():
            texts = orjson.loads(path.with_suffix(".json").read_bytes())
            self.memo = dict(zip(texts, np.load(path.with_suffix(".npy")), strict=True))
            self.saved = len(self.memo)

    def embed(self, texts: list[str]) -> Vectors:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            for t, v in zip(todo, self.inner.embed(todo), strict=True):
                self.memo[t] = v
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def save(self) -> None:
        if self.path is not None and len(self.memo) > self.saved:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # each file replaced whole, so a concurrent reader never sees a half-written one
            npy, js = self.path.with_suffix(".npy"), self.path.with_suffix(".json")
            with open(npy.with_suffix(".npy.part"), "wb") as fh:
                np.save(fh, np.stack(list(self.memo.values())))
            js.with_suffix(".json.part").write_bytes(orjson.dumps(list(self.memo)))
            os.replace(npy.with_suffix(".npy.part"), npy)
            os.replace(js.with_suffix(".json.part"), js)
            self.saved = len(self.memo)


def zipf_sequence(n_items: int, n: int, s: float, rng: random.Random) -> list[int]:
    weights = [1.0 / (i + 1) ** s for i in range(n_items)]
    return rng.choices(range(n_items), weights=weights, k=n)


def _mutate(doc: Document, round_no: int) -> Document:
    extra = f" Revision {round_no}: this abstract was updated with additional findings."
    return Document(doc.id, doc.text + extra, doc.title, doc.metadata, doc.source)


def _served_as(kind: str, d: dict[str, int]) -> str:
    """How one query was served: the latency class it is reported under."""
    if kind == "exact":
        if d["reverify_kept"] > 0:
            return "reverified_hit"
        return "clock_checked_hit" if d["clock_unaffected"] > 0 else "exact_hit"
    if kind == "semantic":
        return "semantic_hit"
    return "miss_after_reverify" if d["reverify_dropped"] > 0 else "miss"


async def _settle(rags: list[AsyncRAG], versions: list[int]) -> None:
    """Every instance has heard of the change (PostgreSQL NOTIFY or the shared sequence file) and applied
    it: what a client sees once a write through one instance is acknowledged and announced (milliseconds)."""
    for rag, v in zip(rags, versions, strict=True):
        deadline = time.monotonic() + 3.0
        while rag.store.version() == v and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        await rag.catch_up()


def _sum(rags: list[AsyncRAG]) -> dict[str, int]:
    out: dict[str, int] = {}
    for rag in rags:
        for k, v in counters(rag).items():
            out[k] = out.get(k, 0) + v
    return out


async def run_workload(
    settings: Settings,
    mode: str,
    embedder: MemoEmbedder,
    base: list[Document],
    rounds: list[dict[str, Any]],
    peers: Sequence[Settings] = (),
) -> dict[str, Any]:
    """One mode over the whole schedule; measurements exclude the base ingest and the staleness checks.

    ``peers``: more instances on the same corpus and caches (each its own L1): round r's changes go
    through instance r mod n, query i of a round to instance i mod n."""
    hits = stale = served = order_only = semantic_hits = semantic_other_context = 0
    stale_examples: list[dict[str, Any]] = []
    ingest_s = query_s = ingest_cpu = query_cpu = 0.0
    latency: dict[str, list[float]] = {}
    llm = extractive_llm()
    setting = settings.cache.invalidation
    async with contextlib.AsyncExitStack() as stack:
        rags = [await stack.enter_async_context(AsyncRAG(s, embedder=embedder, llm=llm)) for s in [settings, *peers]]
        rag = rags[0]
        await rag.ingest(base)
        await _settle(rags[1:], [r.store.synced_version() for r in rags[1:]])
        llm.calls = 0
        start = _sum(rags)
        for r_no, rnd in enumerate(rounds):
            writer = rags[r_no % len(rags)]
            others = [x for x in rags if x is not writer]
            versions = [x.store.version() for x in others]
            t0, c0 = time.perf_counter(), time.process_time()
            await writer.ingest(rnd["ingest"])
            if rnd["delete"]:
                await writer.delete(rnd["delete"])
            for x in rags:
                await after_change(x, mode, setting)
            await _settle(others, versions)
            ingest_s += time.perf_counter() - t0
            ingest_cpu += time.process_time() - c0
            for q_no, q in enumerate(rnd["queries"]):
                rag = rags[q_no % len(rags)]
                before = counters(rag)
                t0, c0 = time.perf_counter(), time.process_time()
                ans = await rag.ask(q)
                dt = time.perf_counter() - t0
                query_s += dt
                query_cpu += time.process_time() - c0
                latency.setdefault(_served_as(ans.cache.kind, delta(counters(rag), before)), []).append(dt)
                served += 1
                if ans.cache.kind not in ("exact", "semantic"):
                    continue
                hits += 1
                semantic_hits += ans.cache.kind == "semantic"
                llm.paused = True  # the check's own LLM call is not the workload's
                fresh = await rag.ask(q, cache_mode="bypass")
                llm.paused = False
                # the evidence: chunk ids *and* texts, since an updated chunk keeps its id.  An exact hit
                # must hold the fresh run's context; a semantic hit (an answer to another query) the
                # chunks its answer rests on (ragline.cache.semantic_match.evidence_of), all still in
                # the fresh context with the same text
                fresh_ev = {(h.chunk_id, h.text) for h in fresh.sources}
                if ans.cache.kind == "semantic":
                    texts = {h.chunk_id: h.text for h in ans.sources}
                    rests_on = evidence_of({"answer": ans.text, "sources": [{"chunk_id": i} for i in texts]})
                    semantic_other_context += fresh_ev != {(h.chunk_id, h.text) for h in ans.sources}
                    is_stale = any((i, texts[i]) not in fresh_ev for i in rests_on)
                else:
                    is_stale = fresh_ev != {(h.chunk_id, h.text) for h in ans.sources}
                if is_stale:
                    stale += 1
                    if len(stale_examples) < 5:
                        stale_examples.append(
                            {
                                "query": q,
                                "kind": ans.cache.kind,
                                "cached": [h.chunk_id for h in ans.sources],
                                "fresh": [h.chunk_id for h in fresh.sources],
                            }
                        )
                elif [h.chunk_id for h in fresh.sources] != [h.chunk_id for h in ans.sources]:
                    order_only += 1
        work = delta(_sum(rags), start)
        all_counters: dict[str, int] = {}
        for x in rags:
            for k, v in (x.cache.counters if x.cache is not None else {}).items():
                all_counters[k] = all_counters.get(k, 0) + v
        saved = work["llm_calls_saved"]
    return {
        "mode": setting,
        "instances": 1 + len(peers),
        "served": served,
        "hits": hits,
        "semantic_hits": semantic_hits,
        "semantic_hits_other_context": semantic_other_context,
        "hit_rate": round(hits / served, 4),
        "stale_hits": stale,
        "stale_examples": stale_examples,
        "hits_same_chunks_other_order": order_only,
        "ingest_s": round(ingest_s, 2),
        "query_s": round(query_s, 2),
        "ingest_cpu_s": round(ingest_cpu, 2),
        "query_cpu_s": round(query_cpu, 2),
        "cpu_s": round(ingest_cpu + query_cpu, 2),
        "llm_calls": llm.calls,
        "llm_calls_by_staleness_check": llm.held,
        "llm_response_cache_hits": saved,
        "latency_by_kind": {k: percentiles(v) for k, v in sorted(latency.items())},
        "counters_during_rounds": work,
        "cache_counters": all_counters,
    }


def _schedule(
    docs: list[Document], batch: int, updates: int, deletes: int, rng: random.Random
) -> tuple[list[Document], list[dict[str, Any]]]:
    """The base 80% and the rounds of corpus changes (new batch + updates + deletes)."""
    cut = int(len(docs) * 0.8)
    base, incoming = docs[:cut], docs[cut:]
    by_id = {d.id: d for d in base}
    alive = [d.id for d in base]
    rounds: list[dict[str, Any]] = []
    for r, i in enumerate(range(0, len(incoming), batch)):
        upd_ids = rng.sample(alive, min(updates, len(alive)))
        upd = [_mutate(by_id[d], r) for d in upd_ids]
        dels = rng.sample([a for a in alive if a not in upd_ids], min(deletes, len(alive)))
        alive = [a for a in alive if a not in dels]
        rounds.append({"ingest": incoming[i : i + batch] + upd, "delete": dels})
    return base, rounds


def ceiling(rounds: list[dict[str, Any]]) -> float:
    """Hit rate of a cache that never invalidates (and so may serve stale answers): an upper bound."""
    seq = [q for r in rounds for q in r["queries"]]
    return round(1 - len(set(seq)) / len(seq), 4) if seq else 0.0


def _compare(w: dict[str, Any]) -> None:
    """Ratios of each mode against the flush baselines (in place)."""
    for name in MODES:
        m = w.get(name)
        if m is None:
            continue
        for base in ("flush", "flush_all"):
            b = w.get(base)
            if b is not None and name != base:
                m[f"llm_calls_avoided_vs_{base}"] = b["llm_calls"] - m["llm_calls"]
                m[f"cpu_ratio_vs_{base}"] = round(m["cpu_s"] / b["cpu_s"], 3) if b["cpu_s"] else None
                m[f"ingest_ratio_vs_{base}"] = round(m["ingest_s"] / b["ingest_s"], 3) if b["ingest_s"] else None


def _workload_checks(w: dict[str, Any]) -> dict[str, bool | None]:
    """The acceptance checks of issue 15 on one workload (None where a mode they need was not run)."""

    def cmp(a: str, b: str, test: Any) -> bool | None:
        return bool(test(w[a], w[b])) if a in w and b in w else None

    return {
        "ingest_lazy_le_1.2x_flush": cmp("ragline", "flush", lambda r, f: r["ingest_s"] <= 1.2 * f["ingest_s"]),
        "cpu_lazy_lt_flush": cmp("ragline", "flush", lambda r, f: r["cpu_s"] < f["cpu_s"]),
        "cpu_lazy_lt_flush_all": cmp("ragline", "flush_all", lambda r, f: r["cpu_s"] < f["cpu_s"]),
        "zero_stale_hits": all(w[n]["stale_hits"] == 0 for n in MODES if n in w),
        "hit_rate_lazy_ge_eager": cmp("ragline", "eager", lambda r, e: r["hit_rate"] >= e["hit_rate"]),
    }


def _checks(report: dict[str, Any], previous: dict[int, float]) -> dict[str, Any]:
    """Each check over every workload of the sweep (each workload also carries its own)."""
    ws = report["workloads"]
    for w in ws:
        w["checks"] = _workload_checks(w)
    checks: dict[str, Any] = {}
    for name in ws[0]["checks"]:
        values = [w["checks"][name] for w in ws]
        checks[name] = None if None in values else all(values)
    if previous:
        prev = [
            (w["ragline"]["hit_rate"], previous[w["queries_per_round"]])
            for w in ws
            if "ragline" in w and w["queries_per_round"] in previous
        ]
        checks["hit_rate_lazy_ge_previous_run"] = all(a >= b for a, b in prev) if prev else None
    return checks


def _previous(path: Path, seed: int, documents: int) -> dict[int, float]:
    """ragline's hit rate per queries/round in an earlier result of the same seed and corpus size."""
    try:
        old = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    if old.get("seed") != seed or old.get("documents") != documents:
        return {}
    return {w["queries_per_round"]: w["ragline"]["hit_rate"] for w in old.get("workloads", []) if "ragline" in w}


def run(
    data: Path,
    out_dir: Path,
    docs_limit: int | None = None,
    batch: int = 50,
    queries_per_round: int | list[int] = 100,
    updates: int = 5,
    deletes: int = 2,
    zipf_s: float = 1.1,
    seed: int = 7,
    embeddings: Path | None = None,
    modes: tuple[str, ...] = MODES,
    embedder: MemoEmbedder | None = None,
    instances: int = 1,
    shared: Callable[[], tuple[str | None, str | None]] | None = None,
) -> dict[str, Any]:
    """Run the workload at each ``queries_per_round`` (the first is the headline) in each mode; write JSON + PNG.

    Before the timed runs every text the workload will embed (chunks and queries)
    goes through the model once, so every mode embeds from the memo and the
    measurements compare cache work, not model work.  ``embeddings`` saves the
    memo for later runs.
    """
    data = data.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = [queries_per_round] if isinstance(queries_per_round, int) else list(queries_per_round)
    if not sweep or min(sweep) < 1 or batch < 1:
        raise ValueError(f"queries per round must be ≥ 1 (got {sweep}) and batch ≥ 1 (got {batch})")
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ValueError(f"modes must be among {MODES}, got {modes}")
    rng = random.Random(seed)
    docs = list(iter_documents([data / "corpus.jsonl"], Settings().limits))
    rng.shuffle(docs)
    if docs_limit:
        docs = docs[:docs_limit]
    base, changes = _schedule(docs, batch, updates, deletes, rng)
    queries = [orjson.loads(line)["text"] for line in (data / "queries.jsonl").read_bytes().splitlines()]
    rng.shuffle(queries)  # which queries are "popular" is random, fixed by the seed
    resolved = {m: resolve_mode(m) for m in modes}
    print(
        f"corpus {len(docs)}: base {len(base)}, {len(changes)} rounds of {batch} new + {updates} updated + "
        f"{deletes} deleted docs; Zipf(s={zipf_s}) queries per round: {sweep}; seed {seed}; modes: "
        + ", ".join(f"{m}={s} ({note})" for m, (s, note) in resolved.items()),
        flush=True,
    )
    if embedder is None:
        embedder = MemoEmbedder(LocalEmbedder(EmbedderSettings()), embeddings)
    t0 = time.perf_counter()
    asyncio.run(_warm(embedder, base, changes))
    embedder.embed(queries)
    embedder.save()
    previous = _previous(out_dir / "churn.json", seed, len(docs))
    report: dict[str, Any] = {
        "dataset": str(data),
        "documents": len(docs),
        "base": len(base),
        "rounds": len(changes),
        "batch": batch,
        "updates_per_round": updates,
        "deletes_per_round": deletes,
        "zipf_s": zipf_s,
        "seed": seed,
        "modes": {m: {"invalidation": s, "how": note} for m, (s, note) in resolved.items()},
        "instances": instances,
        "store": "postgres (pgserver) + redis-server" if shared is not None else "embedded",
        "warmup_embedding_s": round(time.perf_counter() - t0, 1),
        "stale_rule": "an exact hit is stale when its sources differ from a cache-bypassing run's "
        "as a set of (chunk id, chunk text); a semantic hit when a chunk its answer rests on (cited, else "
        "top 3) is not in that run's sources with the same text (semantic_hits_other_context counts the "
        "semantic hits whose whole context differs)",
        "work_rule": "cpu_s: process CPU seconds (all threads, time.process_time) during the rounds' ingests, "
        "deletes and queries; the base ingest and the staleness checks are excluded. llm_calls: calls that "
        "reached the (extractive) LLM during the rounds, staleness checks excluded",
        "latency_rule": "per query, by how it was served: exact_hit (no re-verification), clock_checked_hit "
        "(an exact hit whose terms the term clock showed untouched: no retrieval), reverified_hit "
        "(an exact hit during which reverify_kept increased), semantic_hit, miss, miss_after_reverify "
        "(reverify_dropped increased)",
        "previous_ragline_hit_rate": {str(k): v for k, v in previous.items()} or None,
        "workloads": [],
    }
    for qpr in sweep:
        qrng = random.Random(seed * 1000 + qpr)
        rounds = [
            {**c, "queries": [queries[j] for j in zipf_sequence(len(queries), qpr, zipf_s, qrng)]} for c in changes
        ]
        w: dict[str, Any] = {"queries_per_round": qpr, "never_invalidate_ceiling": ceiling(rounds)}
        for name in modes:
            setting = resolved[name][0]
            with tempfile.TemporaryDirectory(prefix=f"ragline-churn-{name}-") as tmp:
                dsn, redis_url = shared() if shared is not None else (None, None)
                nodes = [
                    Settings(
                        data_dir=Path(tmp) / (f"node{i}" if dsn else "data"),
                        cache={"enabled": True, "invalidation": setting, "redis_url": redis_url},
                        **({"store": "postgres", "postgres_dsn": dsn} if dsn else {}),
                    )
                    for i in range(instances)
                ]
                t1 = time.perf_counter()
                res = asyncio.run(run_workload(nodes[0], name, embedder, base, rounds, nodes[1:]))
                res["wall_s"] = round(time.perf_counter() - t1, 1)
                w[name] = res
                lat = res["latency_by_kind"]
                print(
                    f"{qpr} q/round, {name} [{setting}]: hit rate {res['hit_rate']:.3f}, stale {res['stale_hits']}, "
                    f"ingest {res['ingest_s']} s, queries {res['query_s']} s, CPU {res['cpu_s']} s, "
                    f"LLM calls {res['llm_calls']}; p50 ms "
                    + ", ".join(f"{k} {v['p50_ms']} (n={v['n']})" for k, v in lat.items())
                    + f"; counters {res['counters_during_rounds']}",
                    flush=True,
                )
        _compare(w)
        if "ragline" in w and "flush" in w:
            rl, fb = w["ragline"]["hit_rate"], w["flush"]["hit_rate"]
            w["hit_rate_ratio_vs_flush"] = round(rl / fb, 3) if fb else None
            gain = w["never_invalidate_ceiling"] - fb
            w["share_of_possible_gain"] = round((rl - fb) / gain, 3) if gain > 0 else None
        report["workloads"].append(w)
    report["checks"] = _checks(report, previous)
    (out_dir / "churn.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    _plot(report, out_dir / "churn.png")
    _summary(report)
    return report


def _summary(report: dict[str, Any]) -> None:
    for w in report["workloads"]:
        print(f"--- {w['queries_per_round']} q/round (never-invalidate ceiling {w['never_invalidate_ceiling']:.3f})")
        print(
            f"{'mode':<10} {'hit':>6} {'stale':>5} {'ingest s':>9} {'query s':>8} {'CPU s':>7} {'LLM':>6} "
            f"{'avoided vs flush/flush_all':>26} {'p50 exact':>10} {'p50 reverified':>15}"
        )
        for name in MODES:
            m = w.get(name)
            if m is None:
                continue
            lat = m["latency_by_kind"]
            ex = lat.get("exact_hit", {}).get("p50_ms", "-")
            rv = lat.get("reverified_hit", {}).get("p50_ms", "-")
            av = f"{m.get('llm_calls_avoided_vs_flush', '-')}/{m.get('llm_calls_avoided_vs_flush_all', '-')}"
            print(
                f"{name:<10} {m['hit_rate']:>6.3f} {m['stale_hits']:>5} {m['ingest_s']:>9} {m['query_s']:>8} "
                f"{m['cpu_s']:>7} {m['llm_calls']:>6} {av:>26} {ex!s:>10} {rv!s:>15}"
            )
    print(f"checks: {report['checks']}", flush=True)


async def _warm(embedder: MemoEmbedder, base: list[Document], changes: list[dict[str, Any]]) -> None:
    """Embed every chunk text the workload will ingest, through the real pipeline's chunker."""
    with tempfile.TemporaryDirectory(prefix="ragline-churn-warm-") as tmp:
        async with AsyncRAG(Settings(data_dir=Path(tmp), cache={"enabled": False}), embedder=embedder) as rag:
            await rag.ingest(base)
            for c in changes:
                await rag.ingest(c["ingest"])


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = report["workloads"]
    names = [n for n in MODES if all(n in w for w in ws)]
    x = np.arange(len(ws))
    width = 0.8 / max(len(names), 1)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    for j, name in enumerate(names):
        off = x + (j - (len(names) - 1) / 2) * width
        rates = [w[name]["hit_rate"] for w in ws]
        ax.bar(off, rates, width, label=LABELS[name], color=COLORS[name])
        ing = [w[name]["ingest_cpu_s"] for w in ws]
        qry = [w[name]["query_cpu_s"] for w in ws]
        bx.bar(off, ing, width, color=COLORS[name], hatch="//", edgecolor="white", label=f"{LABELS[name]}: ingest")
        bx.bar(off, qry, width, bottom=ing, color=COLORS[name], label=f"{LABELS[name]}: queries")
        for i, w in enumerate(ws):
            m = w[name]
            ax.text(off[i], rates[i] + 0.01, f"{rates[i]:.2f}\nst {m['stale_hits']}", ha="center", fontsize=7)
            bx.text(
                off[i], ing[i] + qry[i], f"{m['cpu_s']:.1f}\n{m['llm_calls']} LLM", ha="center", va="bottom", fontsize=7
            )
    ax.hlines(
        [w["never_invalidate_ceiling"] for w in ws],
        x - 0.42,
        x + 0.42,
        colors="black",
        label="never-invalidate ceiling",
    )
    ticks = [f"{w['queries_per_round']} queries/round" for w in ws]
    ax.set_xticks(x, ticks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("answer cache hit rate (st: stale hits)")
    ax.set_title("hit rate")
    ax.legend(loc="upper left", fontsize=7)
    bx.set_xticks(x, ticks)
    bx.set_ylabel("work: process CPU s (hatched: ingest; solid: queries)")
    bx.set_title("work (labels: total CPU s, LLM calls)")
    bx.set_ylim(0, max((w[n]["cpu_s"] for w in ws for n in names), default=1) * 1.2)
    fig.suptitle(
        f"SciFact churn: {report['rounds']} ingest rounds of {report['batch']} new docs "
        f"(+{report['updates_per_round']} updated, {report['deletes_per_round']} deleted), seed {report['seed']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Hit rate, stale hits and work of each invalidation mode under churn.")
    ap.add_argument("--data", type=Path, default=DATA / "scifact")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--docs", type=int, default=None, help="use only N corpus documents (default: all)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument(
        "--queries-per-round",
        default="100,50,200",
        help="comma-separated sweep; the first is the headline",
    )
    ap.add_argument(
        "--embeddings",
        type=Path,
        default=None,
        help="save/load the chunk and query embeddings here (e.g. /tmp/emb/scifact)",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (overrides --seed): the first writes OUT/churn.json, each other "
        "OUT/churn_seeds/seedN/churn.json; a summary goes to OUT/churn_seeds/summary.json",
    )
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--store", choices=["embedded", "postgres"], default="embedded",
                    help="postgres: PostgreSQL (pgserver) + a redis-server shared by the instances")  # fmt: skip
    ap.add_argument("--instances", type=int, default=1, help="instances on one corpus (round-robin queries)")
    a = ap.parse_args(argv)
    try:
        sweep = [int(x) for x in a.queries_per_round.split(",")]
        seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    except ValueError:
        ap.error("--queries-per-round and --seeds must be comma-separated integers")
    if min(sweep) < 1 or a.batch < 1:
        ap.error("--queries-per-round values and --batch must be >= 1")
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes must be a subset of {','.join(MODES)}")
    embedder = MemoEmbedder(LocalEmbedder(EmbedderSettings()), a.embeddings)
    summary: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        shared = stack.enter_context(_shared_services()) if a.store == "postgres" else None
        for i, seed in enumerate(seeds):
            out = a.out if i == 0 else a.out / "churn_seeds" / f"seed{seed}"
            if shared is not None:
                out = out / "postgres"
            r = run(a.data, out, a.docs, a.batch, sweep, seed=seed, modes=modes, embedder=embedder,
                    instances=a.instances, shared=shared)  # fmt: skip
            summary[str(seed)] = {
                "out": str(out / "churn.json"),
                "checks": r["checks"],
                "stale_hits": {
                    str(w["queries_per_round"]): {n: w[n]["stale_hits"] for n in modes} for w in r["workloads"]
                },
                "hit_rate": {str(w["queries_per_round"]): {n: w[n]["hit_rate"] for n in modes} for w in r["workloads"]},
            }
    _write_summary(a.out, seeds, summary)


def _write_summary(out_dir: Path, seeds: list[int], summary: dict[str, Any]) -> None:
    if len(seeds) > 1:
        summary["zero_stale_in_every_run"] = all(s["checks"]["zero_stale_hits"] for s in summary.values())
        path = out_dir / "churn_seeds" / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        print(f"seeds {seeds}: zero stale in every run: {summary['zero_stale_in_every_run']} ({path})")


@contextlib.contextmanager
def _shared_services() -> Iterator[Callable[[], tuple[str | None, str | None]]]:
    """A redis-server and PostgreSQL (pgserver) on this machine; each call: a fresh database and an
    emptied Redis, so every mode starts from nothing."""
    import secrets

    import pgserver
    import psycopg

    with tempfile.TemporaryDirectory(prefix="ragline-churn-pg-") as tmp:
        port = free_port()
        with process(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                     clean_env(), Path(tmp) / "redis.log"):  # fmt: skip
            srv = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
            url = f"redis://127.0.0.1:{port}/0"

            def fresh() -> tuple[str | None, str | None]:
                import redis

                redis.Redis.from_url(url).flushall()
                name = "churn_" + secrets.token_hex(4)
                with psycopg.connect(srv.get_uri(), autocommit=True) as c:
                    c.execute(f"CREATE DATABASE {name}")
                return srv.get_uri(name), url

            try:
                time.sleep(0.3)
                yield fresh
            finally:
                srv.cleanup()


if __name__ == "__main__":
    main()
