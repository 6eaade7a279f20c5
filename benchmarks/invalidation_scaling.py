"""Invalidation cost per ingested document against the number of cached entries (issue 15).

    python benchmarks/invalidation_scaling.py [--sizes 1000,10000,100000] [--modes lazy,eager]
                                              [--batches 3] [--new-per-batch 10] [--updated-per-batch 5]
                                              [--eager-timeout-s 150] [--reads 100] [--seed 7]

The corpus is BEIR SciFact (minus a held-out pool of new documents).  The cache
is filled through ``rag.ask`` with real query texts: SciFact's queries and the
questions of the QQP sample (``../shared/data/qqp``, see its SOURCE.md), each
asked at several ``k`` (5, 3, 8) so that ~21k distinct texts give >100k
entries; (text, k) pairs are shuffled, so every size has the same mix.  QQP
questions are off-domain for SciFact: they share fewer keyword terms with the
ingested documents than on-domain questions would, so a change touches a
smaller share of them.  The embedder is ``ragline.testing.HashEmbedder`` (no
model), the LLM the default extractive one.

"Cached entries" are dependency-tracked entries (answers + retrievals: what
invalidation looks at); each ask adds up to two.  At each size the filled data
directory is copied once per mode and the same batches of changes (new and
updated documents) are ingested into each copy: with the cache in that mode,
and with ``cache.enabled=False``.  The difference, per document, is the cost
of invalidation (wall and process CPU time).  Lazy mode moves re-verification
to reads, so after the batches the same sample of earlier (text, k) pairs is
asked again in every copy: ``reads`` reports what that costs.

Eager mode's ingest is bounded by ``--eager-timeout-s``: a batch that runs out
is cancelled and reported as a lower bound (and eager is not run at larger
sizes); after a batch slower than a third of it, the size's other batches are
not run; a size at which a linear extrapolation from the last eager measurement
exceeds twice the timeout is not run and reported as *predicted*, not measured.

Run time is dominated by filling (each ask costs ~15-20 ms CPU here; 100k
entries take ~50k asks).  ``--keep-fill DIR`` keeps a snapshot of the filled
cache of each size and reuses it while the workload and ragline's cache,
ingest and pipeline code are unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import hashlib
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from _common import DATA, REPO, RESULTS, after_change, counters, delta, extractive_llm, resolve_mode

from ragline.config import Settings
from ragline.ingest.loaders import iter_documents
from ragline.pipeline import AsyncRAG
from ragline.testing import HashEmbedder
from ragline.types import Document

K_VARIANTS = (5, 3, 8)
CACHE = {"enabled": True, "l3_max_bytes": 8 * 1024**3}  # no L3 eviction: every entry stays cached
"""Cache settings of every run but the no-cache baseline (with the mode's ``invalidation``)."""


def query_texts(scifact: Path, qqp: Path, max_chars: int) -> tuple[list[str], dict[str, int]]:
    """Distinct real query texts: SciFact's queries, then QQP's questions (both columns)."""
    sci = [orjson.loads(line)["text"] for line in (scifact / "queries.jsonl").read_bytes().splitlines()]
    qq: list[str] = []
    with (qqp / "qqp_pairs_sample.tsv").open(newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        for row in rows:
            qq.extend(row[1:3])
    texts = [t for t in dict.fromkeys(t.strip() for t in sci + qq) if t and len(t) <= max_chars]
    n_sci = len({t.strip() for t in sci} & set(texts))
    return texts, {"scifact_queries": n_sci, "qqp_questions": len(texts) - n_sci}


def _mutate(doc: Document, n: int) -> Document:
    extra = f" Revision {n}: this abstract was updated with additional findings."
    return Document(doc.id, doc.text + extra, doc.title, doc.metadata, doc.source)


def _settings(data_dir: Path, setting: str | None) -> Settings:
    if setting is None:
        return Settings(data_dir=data_dir, cache={"enabled": False})
    return Settings(data_dir=data_dir, cache={**CACHE, "invalidation": setting})


async def _entries(rag: AsyncRAG) -> int:
    return await rag.cache.deps.count() if rag.cache is not None else 0


async def populate(rag: AsyncRAG, pairs: list[tuple[str, int]], start: int, target: int, conc: int) -> int:
    """Ask ``pairs[start:]`` until the cache holds ``target`` entries; returns the next index."""
    i = start
    sem = asyncio.Semaphore(conc)

    async def one(text: str, k: int) -> None:
        async with sem:
            await rag.ask(text, k=k)

    while i < len(pairs) and await _entries(rag) < target:
        need = max(1, (target - await _entries(rag)) // 2)
        chunk = pairs[i : i + min(need, 500)]
        await asyncio.gather(*(one(t, k) for t, k in chunk))
        i += len(chunk)
    return i


async def measure(
    data_dir: Path,
    name: str,
    setting: str | None,
    batches: list[list[Document]],
    reads: list[tuple[str, int]],
    timeout_s: float | None,
    slow_s: float | None = None,
) -> dict[str, Any]:
    """Ingest each batch into this copy of the filled cache, then re-ask ``reads``.

    A batch past ``timeout_s`` is cancelled (a lower bound; no reads: the copy is inconsistent); after a
    batch slower than ``slow_s`` the remaining batches are not run."""
    llm = extractive_llm()
    out: dict[str, Any] = {"mode": name, "invalidation": setting, "batches": []}
    async with AsyncRAG(_settings(data_dir, setting), embedder=HashEmbedder(), llm=llm) as rag:
        out["entries_before"] = await _entries(rag)
        await rag.search("warm up the store and the retriever", cache_mode="bypass")
        for batch in batches:
            gc.collect()
            c_before = counters(rag)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                await asyncio.wait_for(_change(rag, name, setting, batch), timeout_s)
            except TimeoutError:
                out["timed_out"] = True
                out["batches"].append({"docs": len(batch), "wall_s": timeout_s, "timed_out": True})
                print(f"    {name}: batch cancelled after {timeout_s} s", flush=True)
                return out  # the copy is inconsistent now: no reads, and it is thrown away
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out["batches"].append(
                {
                    "docs": len(batch),
                    "wall_s": round(wall, 4),
                    "cpu_s": round(cpu, 4),
                    "counters": delta(counters(rag), c_before),
                    "entries_after": await _entries(rag),
                }
            )
            if slow_s is not None and wall > slow_s and len(out["batches"]) < len(batches):
                out["batches_cut_short"] = f"a batch took {wall:.0f} s > {slow_s:.0f} s: the rest not run"
                break
        c_before, llm.calls = counters(rag), 0
        kinds: dict[str, int] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        for text, k in reads:
            ans = await rag.ask(text, k=k)
            kinds[ans.cache.kind] = kinds.get(ans.cache.kind, 0) + 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out["reads"] = {
            "n": len(reads),
            "ms_per_read": round(1000 * wall / max(len(reads), 1), 3),
            "cpu_ms_per_read": round(1000 * cpu / max(len(reads), 1), 3),
            "served_as": kinds,
            "llm_calls": llm.calls,
            "counters": delta(counters(rag), c_before),
        }
    return out


async def _change(rag: AsyncRAG, name: str, setting: str | None, batch: list[Document]) -> None:
    await rag.ingest(batch)
    if setting is not None:
        await after_change(rag, name, setting)  # flush_all's emulated part, where it is not native


def _cost(mode: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Invalidation cost per document: this mode's ingest minus the no-cache ingest of the same batch."""
    done = [(m, b) for m, b in zip(mode["batches"], base["batches"], strict=False) if not m.get("timed_out")]
    if not done:
        docs = mode["batches"][0]["docs"]
        return {"timed_out": True, "wall_ms_per_doc_at_least": round(1000 * mode["batches"][0]["wall_s"] / docs, 3)}
    wall = [1000 * (m["wall_s"] - b["wall_s"]) / m["docs"] for m, b in done]
    cpu = [1000 * (m["cpu_s"] - b["cpu_s"]) / m["docs"] for m, b in done]
    return {
        # a flush drops everything at the first batch, so later batches of a flush mode flush an empty cache
        "first_batch_wall_ms_per_doc": round(wall[0], 3),
        "first_batch_cpu_ms_per_doc": round(cpu[0], 3),
        "wall_ms_per_doc": round(statistics.median(wall), 3),
        "cpu_ms_per_doc": round(statistics.median(cpu), 3),
        "wall_ms_per_doc_each_batch": [round(x, 3) for x in wall],
        "cpu_ms_per_doc_each_batch": [round(x, 3) for x in cpu],
        "timed_out": bool(mode.get("timed_out")),
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    rng = random.Random(a.seed)
    limits = Settings().limits
    docs = list(iter_documents([a.data / "corpus.jsonl"], limits))
    rng.shuffle(docs)
    n_new = a.batches * a.new_per_batch
    pool, base = docs[:n_new], docs[n_new:]
    if a.docs:
        base = base[: a.docs]
    upd = rng.sample(base, a.batches * a.updated_per_batch)
    batches = [
        pool[i * a.new_per_batch : (i + 1) * a.new_per_batch]
        + [_mutate(d, i) for d in upd[i * a.updated_per_batch : (i + 1) * a.updated_per_batch]]
        for i in range(a.batches)
    ]
    texts, origin = query_texts(a.data, a.qqp, limits.max_query_chars)
    pairs = [(t, k) for k in K_VARIANTS for t in texts]
    rng.shuffle(pairs)
    modes = {m: resolve_mode(m) for m in a.modes}
    report: dict[str, Any] = {
        "corpus": f"{a.data} ({len(base)} documents; {n_new} held out as new documents)",
        "queries": {
            **origin,
            "distinct_texts": len(texts),
            "k_variants": list(K_VARIANTS),
            "what": "real query texts asked through rag.ask; (text, k) pairs shuffled; QQP is off-domain for SciFact",
        },
        "embedder": "ragline.testing.HashEmbedder (feature hashing, no model)",
        "llm": "ragline.llm.extractive.ExtractiveLLM",
        "entries": "dependency-tracked cache entries (answers + retrievals), deps.count()",
        "batch": {"new": a.new_per_batch, "updated": a.updated_per_batch, "batches_per_size": a.batches},
        "cost_rule": "per batch: (ingest with the cache in the mode) - (same ingest into a copy with "
        "cache.enabled=False), divided by the batch's documents; median over batches (flush modes: the first "
        "batch, the one that finds entries to drop, is plotted); wall and process CPU",
        "cache_settings": CACHE,
        "modes": {m: {"invalidation": s, "how": note} for m, (s, note) in modes.items()},
        "eager_timeout_s": a.eager_timeout_s,
        "sizes": [],
    }
    print(f"{len(base)} base docs, {len(texts)} query texts ({origin}), {len(pairs)} (text, k) pairs", flush=True)
    skip: dict[str, str] = {}
    eager_seen: tuple[int, float] | None = None  # (entries, seconds per batch) of the last measured eager batch
    sig = _signature(a, base, pairs)
    with tempfile.TemporaryDirectory(prefix="ragline-scaling-", dir=a.tmp) as tmp:
        filled = Path(tmp) / "filled"
        asked = 0
        populate_s = populate_cpu = 0.0
        for size in a.sizes:
            snap = a.keep_fill / f"size-{size}" if a.keep_fill is not None else None
            reused = snap is not None and _snapshot_ok(snap, sig)
            t0, c0 = time.perf_counter(), time.process_time()
            if reused:
                assert snap is not None
                shutil.rmtree(filled, ignore_errors=True)
                shutil.copytree(snap, filled)
                meta = orjson.loads((snap / "fill.json").read_bytes())
                asked, entries = meta["asks"], meta["entries"]
            else:
                if not filled.exists():
                    asyncio.run(_ingest_base(filled, modes, base))
                asked, entries = asyncio.run(_fill(filled, modes, pairs, asked, size, a.concurrency))
                if snap is not None:
                    shutil.rmtree(snap, ignore_errors=True)
                    shutil.copytree(filled, snap)
                    (snap / "fill.json").write_bytes(
                        orjson.dumps({"signature": sig, "asks": asked, "entries": entries})
                    )
            populate_s += time.perf_counter() - t0
            populate_cpu += time.process_time() - c0
            how = f"reused {snap}" if reused else f"{populate_s:.0f} s filling so far"
            print(f"size {size}: {entries} entries after {asked} asks ({how})", flush=True)
            if entries < size:
                print(f"  only {entries} entries reachable with {len(pairs)} pairs", flush=True)
            reads = random.Random(a.seed + size).sample(pairs[:asked], min(a.reads, asked))
            row: dict[str, Any] = {
                "target": size,
                "entries": entries,
                "asks": asked,
                "fill_reused_from": str(snap) if reused else None,
                "fill_s_cumulative": round(populate_s, 1),
                "fill_cpu_s_cumulative": round(populate_cpu, 1),
                "runs": {},
                "invalidation_cost": {},
            }
            for name, setting in [("no_cache", None), *((m, s) for m, (s, _) in modes.items())]:
                timeout = slow = None
                if name == "eager":
                    timeout, slow = a.eager_timeout_s, a.eager_timeout_s / 3
                    if eager_seen is not None and name not in skip:
                        guess = eager_seen[1] * entries / max(eager_seen[0], 1)
                        if guess > 2 * a.eager_timeout_s:
                            row["invalidation_cost"][name] = {
                                "measured": False,
                                "predicted_wall_ms_per_doc": round(1000 * guess / len(batches[0]), 1),
                            }
                            skip[name] = (
                                f"not run: linear extrapolation from {eager_seen[0]} entries predicts "
                                f"~{guess:.0f} s per batch (> 2 x --eager-timeout-s {a.eager_timeout_s})"
                            )
                            eager_seen = None  # predicted once, at the first size past the bound
                if name in skip:
                    row["runs"][name] = {"skipped": skip[name]}
                    print(f"  {name}: {skip[name]}", flush=True)
                    continue
                copy = Path(tmp) / f"copy-{name}"
                shutil.copytree(filled, copy)
                try:
                    res = asyncio.run(measure(copy, name, setting, batches, reads, timeout, slow))
                finally:
                    shutil.rmtree(copy, ignore_errors=True)
                row["runs"][name] = res
                b = res["batches"]
                if res.get("timed_out"):
                    skip[name] = f"not run: a batch ran past {a.eager_timeout_s} s at {entries} entries"
                elif name == "eager":
                    eager_seen = (entries, statistics.median(x["wall_s"] for x in b))
                r = res.get("reads", {})
                print(
                    f"  {name}: ingest s per batch {[x['wall_s'] for x in b]}, CPU s {[x.get('cpu_s') for x in b]}; "
                    f"reads {r.get('ms_per_read')} ms each, served {r.get('served_as')}",
                    flush=True,
                )
            for name in modes:
                if "batches" in row["runs"].get(name, {}):
                    row["invalidation_cost"][name] = _cost(row["runs"][name], row["runs"]["no_cache"])
            print(f"  invalidation cost per doc: {row['invalidation_cost']}", flush=True)
            report["sizes"].append(row)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "invalidation_scaling.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    _plot(report, a.out / "invalidation_scaling.png")
    print(f"wrote {a.out / 'invalidation_scaling.json'} and .png in {report['total_s']} s")
    return report


def _signature(a: argparse.Namespace, base: list[Document], pairs: list[tuple[str, int]]) -> str:
    """What a kept fill depends on: the workload and the code that writes the cache."""
    h = hashlib.sha256(orjson.dumps([a.seed, [d.id for d in base], pairs[:1000], len(pairs), CACHE]))
    for f in sorted([*(REPO / "ragline").glob("cache/*.py"), *(REPO / "ragline").glob("ingest/*.py")]):
        h.update(f.read_bytes())
    for name in ("pipeline.py", "config.py", "codec.py"):
        h.update((REPO / "ragline" / name).read_bytes())
    return h.hexdigest()[:16]


def _snapshot_ok(snap: Path, sig: str) -> bool:
    try:
        return bool(orjson.loads((snap / "fill.json").read_bytes())["signature"] == sig)
    except (OSError, KeyError, orjson.JSONDecodeError):
        return False


def _fill_settings(filled: Path, modes: dict[str, tuple[str, str]]) -> Settings:
    # filling makes no change to the corpus: the mode it runs in does not matter
    return _settings(filled, next(iter(modes.values()))[0])


async def _ingest_base(filled: Path, modes: dict[str, tuple[str, str]], base: list[Document]) -> None:
    async with AsyncRAG(_fill_settings(filled, modes), embedder=HashEmbedder()) as rag:
        await rag.ingest(base)


async def _fill(
    filled: Path, modes: dict[str, tuple[str, str]], pairs: list[tuple[str, int]], asked: int, size: int, conc: int
) -> tuple[int, int]:
    """Reopen the filled directory, ask until ``size`` entries, close it (so it can be copied)."""
    async with AsyncRAG(_fill_settings(filled, modes), embedder=HashEmbedder()) as rag:
        asked = await populate(rag, pairs, asked, size, conc)
        return asked, await _entries(rag)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lazy": "tab:green", "eager": "tab:olive", "flush": "tab:gray", "flush_all": "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    rows = report["sizes"]
    floor = 1e-3
    for ax, metric, label in ((axes[0], "cpu_ms_per_doc", "CPU"), (axes[1], "wall_ms_per_doc", "wall")):
        ref: tuple[float, float] | None = None
        for name in report["modes"]:
            pts = [(r["entries"], r["invalidation_cost"][name]) for r in rows if name in r["invalidation_cost"]]
            key = f"first_batch_{metric}" if name.startswith("flush") else metric
            ok = [(x, c[key]) for x, c in pts if key in c]
            xs = [x for x, _ in ok]
            ys = [max(y, floor) for _, y in ok]
            color = colors.get(name)
            if xs:
                ax.plot(xs, ys, "o-", color=color, label=name + (" (first batch)" if key != metric else ""))
                for x, (_, y) in zip(xs, ok, strict=True):
                    if y <= floor:
                        ax.annotate("≤ noise", (x, floor), fontsize=7, color=color)
                if ref is None or name == "eager":
                    ref = (xs[0], ys[0])
            lower = [(x, c["wall_ms_per_doc_at_least"]) for x, c in pts if "wall_ms_per_doc_at_least" in c]
            for x, y in lower:
                ax.plot([x], [y], "^", color=color, markersize=10, label=f"{name}: timed out (wall, at least)")
            guess = [(x, c["predicted_wall_ms_per_doc"]) for x, c in pts if "predicted_wall_ms_per_doc" in c]
            for x, y in guess:
                ax.plot([x], [y], "o", mfc="none", color=color, markersize=10, label=f"{name}: predicted, not run")
        if ref is not None:
            x0, y0 = ref
            xr = [min(r["entries"] for r in rows), max(r["entries"] for r in rows)]
            ax.plot(xr, [y0 * x / x0 for x in xr], "k--", lw=0.8, label="linear in entries (reference)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cached entries (answers + retrievals)")
        ax.set_ylabel(f"invalidation {label} ms per ingested document")
        ax.set_title(f"ingest-side invalidation cost ({label})")
        ax.legend(fontsize=7)
    bx = axes[2]
    for name in ["no_cache", *report["modes"]]:
        pts = [(r["entries"], r["runs"][name]["reads"]["cpu_ms_per_read"]) for r in rows if "reads" in r["runs"][name]]
        if pts:
            bx.plot(*zip(*pts, strict=True), "o-", color=colors.get(name, "tab:blue"), label=name)
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("cached entries")
    bx.set_ylabel("CPU ms per re-asked query after the changes")
    bx.set_title("read side: earlier queries asked again")
    bx.legend(fontsize=7)
    fig.suptitle(
        f"SciFact, batches of {report['batch']['new']} new + {report['batch']['updated']} updated docs; "
        "cache filled with real query texts (SciFact + QQP) via rag.ask"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Invalidation cost per ingested document vs cached entries.")
    ap.add_argument("--data", type=Path, default=DATA / "scifact")
    ap.add_argument("--qqp", type=Path, default=DATA / "qqp")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated cached-entry counts, ascending")
    ap.add_argument("--modes", default="lazy,eager", help="comma-separated: lazy, eager, flush, flush_all")
    ap.add_argument("--batches", type=int, default=3, help="change batches measured per size and mode")
    ap.add_argument("--new-per-batch", type=int, default=10)
    ap.add_argument("--updated-per-batch", type=int, default=5)
    ap.add_argument("--eager-timeout-s", type=float, default=150.0, help="cancel an eager batch after this long")
    ap.add_argument("--reads", type=int, default=100, help="earlier queries asked again after the batches")
    ap.add_argument("--concurrency", type=int, default=4, help="concurrent asks while filling the cache")
    ap.add_argument("--docs", type=int, default=None, help="use only N base documents (smoke runs)")
    ap.add_argument("--tmp", type=Path, default=None, help="where the filled cache and its copies live")
    ap.add_argument(
        "--keep-fill",
        type=Path,
        default=None,
        help="keep the filled cache of each size here and reuse it when workload and cache code are unchanged",
    )
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    try:
        a.sizes = sorted(int(x) for x in a.sizes.split(","))
    except ValueError:
        ap.error("--sizes must be comma-separated integers")
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not a.modes or set(a.modes) - {"lazy", "eager", "flush", "flush_all"}:
        ap.error("--modes must be among lazy, eager, flush, flush_all")
    if min(a.sizes) < 1 or a.batches < 1 or a.new_per_batch + a.updated_per_batch < 1:
        ap.error("sizes, --batches and the batch size must be >= 1")
    a.data, a.qqp = a.data.resolve(), a.qqp.resolve()
    run(a)


if __name__ == "__main__":
    main()
