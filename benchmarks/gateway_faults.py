"""Gateway under upstream faults: errors, Retry-After and the circuit breaker (issue 9).

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false .venv/bin/python benchmarks/gateway_faults.py \
        [--requests 600] [--concurrency 8] [--docs 300] [--outage-at 0.25] [--outage-s 4]

Evidence for: "3 fake upstreams from ragline.testing -- one normal, one failing 30% of calls with 5xx and
timeouts, one returning 429 with Retry-After -- under a bounded load of uncached queries: client-visible
errors <= 1%; no request reached the 429 upstream before its Retry-After had passed (counted at the
upstream); the breaker opened and recovered (timeline in the report)."

Setup (everything in-process, 127.0.0.1 only): three ``ragline.testing.FakeUpstream`` servers, all
answering after ``--latency-ms`` (30 ms):

* ``normal``: never fails;
* ``flaky``: ``failure_rate`` 0.3 drawn from ``("500", "503", "timeout")`` (a timeout hangs until the
  client gives up, i.e. ``timeout_s`` = 1 s);
* ``limited``: ``failure_rate`` ``--limited-rate`` (0.7) of ``429`` with ``Retry-After: --retry-after``
  (1.5 s).

**Scripted phase** (so that "opened and recovered" is visible, not left to chance): when request number
``--outage-at`` x ``--requests`` starts, the flaky upstream fails 100% (same kinds) for ``--outage-s``
seconds (``FakeUpstream.configure``), then goes back to 30%. The breaker (``breaker_failures`` 3,
``breaker_cooldown_s`` 2) must open during it, re-open on failed half-open probes, and close after it.
Both runs below see the same phase at the same request number.

Pipeline: ``AsyncRAG`` over the first ``--docs`` SciFact documents (ingested into a temporary
data_dir with the default local embedder, MiniLM, offline), ``llm.provider: gateway`` with the three
fakes as one group (strategy least_busy, retries 2, ``timeout_s`` 1 s). Each of ``--requests`` distinct
SciFact queries is asked once with ``cache_mode="bypass"`` at a fixed ``--concurrency`` (closed loop),
with the cache layer off, so every request embeds, retrieves, packs and calls the LLM (and the baseline
does not profit from embeddings the first run cached).

**Baseline, same run, same fakes, same load and phase**: no gateway -- a naive client-side round robin
over three direct ``OpenAILLM`` clients (``llm.provider: openai``, ``retries=0``, ``timeout_s`` 1 s), i.e.
what a plain load balancer in front of the three upstreams gives: each request goes to the next upstream
once, no retry, no breaker, no Retry-After. (A single ``OpenAILLM`` at the flaky upstream would be a
weaker straw man; the default gateway with ``retries=0`` would still have the breaker and Retry-After
floor.) The ratio of client error rates is the point.

Measured: client-visible errors (an exception from ``ask``) and their rate; calls and outcomes counted at
each fake; arrivals at the 429 fake while a Retry-After it had sent was still running
(``FakeUpstream.early_arrivals``, must be 0) and, for each, whether the gateway had admitted that request
before or after it saw the 429 that made it early (admissions and settlements are recorded by wrapping
the gateway's state object; the n-th admission to ``limited`` is matched with the n-th arrival there);
the gateway's event timeline (breaker opened/closed, seconds from the start), its retries and fallbacks,
breaker state sampled every 100 ms; client latency p50/p95/p99. Writes
``benchmarks/results/gateway_faults.json`` and ``gateway_faults.png`` (requests per second per upstream,
breaker state and Retry-After floor, client errors per second for both runs).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from _common import DATA, RESULTS

from ragline.config import CacheSettings, GatewaySettings, LLMSettings, Settings, UpstreamSettings
from ragline.llm.base import Completion, GenParams
from ragline.llm.openai import OpenAILLM
from ragline.pipeline import AsyncRAG
from ragline.testing import FakeUpstream
from ragline.types import Document, Message

NAMES = ("normal", "flaky", "limited")


def scifact(n_docs: int, n_queries: int) -> tuple[list[Document], list[str]]:
    folder = DATA / "scifact"
    docs: list[Document] = []
    with (folder / "corpus.jsonl").open("rb") as fh:
        for raw in fh:
            d = orjson.loads(raw)
            docs.append(Document(id=str(d["_id"]), text=d["text"], title=d.get("title", "")))
            if len(docs) >= n_docs:
                break
    seen: dict[str, None] = {}
    with (folder / "queries.jsonl").open("rb") as fh:
        for raw in fh:
            seen.setdefault(orjson.loads(raw)["text"].strip(), None)
            if len(seen) >= n_queries:
                break
    if len(seen) < n_queries:
        sys.exit(f"only {len(seen)} distinct SciFact queries; use --requests <= {len(seen)}")
    return docs, list(seen)


def pcts(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    a = np.asarray(seconds) * 1000.0
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)} | {"n": len(seconds)}


class RoundRobinLLM:
    """The baseline: each request to the next upstream, once (no retry, breaker or Retry-After)."""

    def __init__(self, clients: list[OpenAILLM]) -> None:
        self.clients = clients
        self.id = "baseline:round_robin"
        self._i = 0

    def _next(self) -> OpenAILLM:
        c = self.clients[self._i % len(self.clients)]
        self._i += 1
        return c

    async def complete(self, messages: list[Message], params: GenParams) -> Completion:
        return await self._next().complete(messages, params)

    def stream(self, messages: list[Message], params: GenParams) -> Any:
        return self._next().stream(messages, params)

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


class Recorder:
    """Wraps a gateway's state: every admission and settlement, with wall-clock times."""

    def __init__(self, gateway: Any) -> None:
        self.admits: list[tuple[float, str, str, bool]] = []  # (t, upstream, lease, probe)
        self.settles: dict[str, tuple[float, str, str, float | None]] = {}  # lease -> (t, upstream, outcome, ra)
        state = gateway.state
        acquire, settle = state.acquire, state.settle

        async def rec_acquire(name: str, limits: Any, tokens: int, lease: str) -> Any:
            v = await acquire(name, limits, tokens, lease)
            if v.ok:
                self.admits.append((time.time(), name, v.lease or lease, v.probe))
            return v

        async def rec_settle(name: str, limits: Any, lease: str, outcome: str, **kw: Any) -> Any:
            self.settles[lease] = (time.time(), name, outcome, kw.get("retry_after"))
            return await settle(name, limits, lease, outcome, **kw)

        state.acquire, state.settle = rec_acquire, rec_settle


def early_diagnosis(fake: FakeUpstream, rec: Recorder, name: str, t0: float) -> dict[str, Any]:
    """Each arrival at ``name`` during a Retry-After it had sent: admitted before or after the gateway saw that 429?"""
    arrivals = [a for a in fake.arrivals() if a[1] == "chat"]
    admits = [a for a in rec.admits if a[1] == name]
    out: dict[str, Any] = {"arrivals": len(arrivals), "admissions": len(admits), "early": []}
    if len(arrivals) != len(admits):
        out["note"] = "arrivals and admissions differ in number: matching by order is approximate"
    n = min(len(arrivals), len(admits))
    lag = [arrivals[i][0] - admits[i][0] for i in range(n)]
    out["admit_to_arrival_ms"] = {"max": round(max(lag) * 1000, 2), "min": round(min(lag) * 1000, 2)} if lag else {}
    ra = fake.config.retry_after or 0.0
    t429 = [i for i in range(n) if arrivals[i][2] == "429"]
    times429 = [arrivals[i][0] for i in t429]
    # the Retry-After floors the gateway itself ran for this upstream: (end time), from its 429 settlements
    floors = sorted(
        t + (r if r is not None else 1.0) for t, up, o, r in rec.settles.values() if up == name and o == "limited"
    )

    def since_floor_end(t: float) -> float | None:
        i = bisect.bisect_right(floors, t) - 1
        return None if i < 0 else round((t - floors[i]) * 1000, 2)

    before = after = burst = 0
    for k in range(n):
        ta = arrivals[k][0]
        j = bisect.bisect_left(times429, ta) - 1  # the latest 429 the fake sent before this arrival
        if j < 0 or ta >= times429[j] + ra:
            continue
        trig = t429[j]
        seen = rec.settles.get(admits[trig][2])
        t_seen = seen[0] if seen else float("inf")
        sent_before = admits[k][0] < t_seen
        before += sent_before
        after += not sent_before
        trig_gap = since_floor_end(admits[trig][0])
        burst += trig_gap is not None and trig_gap < 100.0
        out["early"].append(
            {
                "arrived_s": round(ta - t0, 4),
                "after_429_ms": round((ta - times429[j]) * 1000, 2),
                "admitted_s": round(admits[k][0] - t0, 4),
                "gateway_saw_429_s": round(t_seen - t0, 4),
                "admitted_before_gateway_saw_429": sent_before,
                "trigger_admitted_ms_after_a_gateway_floor_ended": trig_gap,
                "admitted_ms_after_a_gateway_floor_ended": since_floor_end(admits[k][0]),
                "outcome": arrivals[k][2],
            }
        )
    out["early_admitted_before_gateway_saw_429"] = before
    out["early_admitted_after_gateway_saw_429"] = after
    out["early_in_a_burst_within_100ms_of_a_floor_ending"] = burst
    seen_ms = [(rec.settles[admits[i][2]][0] - arrivals[i][0]) * 1000 for i in t429 if admits[i][2] in rec.settles]
    out["fake_429_to_gateway_settle_ms"] = {"median": round(float(np.median(seen_ms)), 2)} if seen_ms else {}
    return out


async def run(
    label: str,
    settings: Settings,
    fakes: dict[str, FakeUpstream],
    queries: list[str],
    conc: int,
    outage_at: int,
    outage_s: float,
    embedder: Any,
    docs: list[Document] | None,
    llm: Any = None,
) -> tuple[dict[str, Any], Any]:
    for f in fakes.values():
        f.reset()
    rag = AsyncRAG(settings, embedder=embedder, llm=llm)
    await rag.start()
    if docs:
        t = time.perf_counter()
        await rag.ingest(docs)
        print(f"  ingested {len(docs)} documents in {time.perf_counter() - t:.1f} s", flush=True)
    gw = getattr(rag.llm, "gateway", None)
    rec = None
    if gw is not None:
        gw.events = deque(maxlen=1_000_000)  # keep every event, not the last 200
        rec = Recorder(gw)
    flaky = fakes["flaky"]
    base_rate = flaky.config.failure_rate
    outage = asyncio.Event()
    phases: list[dict[str, Any]] = []
    requests: list[tuple[float, float, str, str]] = []  # (start, end, "ok"|error class, upstream)
    samples: list[tuple[float, str, str, float]] = []
    done = asyncio.Event()
    t0 = time.time()

    async def script() -> None:
        await outage.wait()
        flaky.configure(failure_rate=1.0)
        phases.append({"t": round(time.time() - t0, 3), "flaky_failure_rate": 1.0})
        await asyncio.sleep(outage_s)
        flaky.configure(failure_rate=base_rate)
        phases.append({"t": round(time.time() - t0, 3), "flaky_failure_rate": base_rate})

    async def sampler() -> None:
        if gw is None:
            return
        while not done.is_set():
            now = time.time()
            for up in gw.upstreams:
                st = await gw.state.snapshot(up.name, gw.limits[up.name])
                samples.append((round(now - t0, 3), up.name, st["breaker"], st["cooling_down_s"]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.1)

    it = iter(enumerate(queries))

    async def worker() -> None:
        for i, q in it:
            if i == outage_at:
                outage.set()
            s = time.time()
            try:
                a = await rag.ask(q, cache_mode="bypass")
                requests.append((s, time.time(), "ok", a.upstream))
            except Exception as exc:
                requests.append((s, time.time(), type(exc).__name__, ""))

    tasks = [asyncio.create_task(script()), asyncio.create_task(sampler())]
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.time() - t0
    done.set()
    if not outage.is_set():
        outage.set()
    await asyncio.gather(*tasks)  # the outage script ends before the fakes are read
    n = len(requests)
    errs = [r for r in requests if r[2] != "ok"]
    per_up = {
        name: {"calls": f.route_calls("chat"), "outcomes": dict(f.stats()["outcomes"])} for name, f in fakes.items()
    }
    res: dict[str, Any] = {
        "label": label,
        "requests": n,
        "wall_s": round(wall, 2),
        "client_errors": len(errs),
        "client_error_rate": round(len(errs) / n, 5),
        "client_error_kinds": dict(Counter(r[2] for r in errs)),
        "answered_by": dict(Counter(r[3] or "?" for r in requests if r[2] == "ok")),
        "latency_all": pcts([r[1] - r[0] for r in requests]),
        "latency_ok": pcts([r[1] - r[0] for r in requests if r[2] == "ok"]),
        "upstreams": per_up,
        "limited_early_arrivals": fakes["limited"].early_arrivals,
        "phases": phases,
    }
    if gw is not None and rec is not None:
        snap = await rag.upstreams()
        llm_snap = snap["llm"]
        res["gateway"] = {
            "retries": gw.retries,
            "fallbacks_taken": gw.fallbacks,
            "upstreams": {
                u["name"]: {k: u[k] for k in ("requests", "errors", "breaker", "breaker_opens", "rate_factor")}
                for u in llm_snap["upstreams"]
            },
        }
        res["events"] = [{"t": round(e["t"] - t0, 3), **{k: v for k, v in e.items() if k != "t"}} for e in gw.events]
        opened = [e for e in res["events"] if e["event"] == "opened"]
        closed = [e for e in res["events"] if e["event"] == "closed"]
        res["breaker_opened_and_recovered"] = bool(opened) and any(c["t"] > opened[0]["t"] for c in closed)
        res["early_diagnosis"] = early_diagnosis(fakes["limited"], rec, "limited", t0)
    timeline = {
        "t0": t0,
        "requests": [(round(s - t0, 3), round(e - t0, 3), k) for s, e, k, _ in requests],
        "arrivals": {name: [(round(a[0] - t0, 3), a[2]) for a in f.arrivals()] for name, f in fakes.items()},
        "samples": samples,
    }
    await rag.aclose()
    return res, timeline


def plot(path: Path, gw: dict[str, Any], base: dict[str, Any], gw_res: dict[str, Any], bin_s: float = 0.5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(r[1] for r in gw["requests"] + base["requests"])
    bins = np.arange(0, end + bin_s, bin_s)
    fig, ax = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    colors = {"normal": "tab:green", "flaky": "tab:orange", "limited": "tab:blue"}
    for name, arr in gw["arrivals"].items():
        ts = [t for t, _ in arr]
        h, _ = np.histogram(ts, bins)
        ax[0].step(bins[:-1], h / bin_s, where="post", label=f"{name} (all)", color=colors[name])
        bad = [t for t, o in arr if o != "ok"]
        hb, _ = np.histogram(bad, bins)
        ax[0].step(bins[:-1], hb / bin_s, where="post", ls=":", color=colors[name], label=f"{name} (failed/429)")
    ax[0].set_ylabel("requests/s at the fake")
    ax[0].set_title("gateway run: requests per second per upstream (counted at the fakes)")
    ax[0].legend(fontsize=7, ncol=3)
    level = {"closed": 0, "half_open": 1, "open": 2}
    for k, name in enumerate(("flaky", "limited", "normal")):
        pts = [(t, level[b]) for t, n, b, _ in gw["samples"] if n == name]
        if pts:
            ax[1].step([p[0] for p in pts], [p[1] + 3 * k for p in pts], where="post", color=colors[name], label=name)
        floor = [(t, c > 0) for t, n, _, c in gw["samples"] if n == name]
        for (t, on), (t2, _) in itertools.pairwise(floor):
            if on:
                ax[1].axvspan(t, t2, ymin=(3 * k) / 9, ymax=(3 * k + 2.5) / 9, color=colors[name], alpha=0.15, lw=0)
    ax[1].set_yticks(range(9), [f"{n}:{s}" for n in ("flaky", "limited", "normal") for s in ("closed", "half", "open")])
    ax[1].set_ylim(-0.5, 8.5)
    ax[1].set_title("breaker state (sampled every 100 ms); shaded: Retry-After floor running at the gateway")
    for e in gw_res.get("events", []):
        if e["event"] in ("opened", "closed"):
            ax[1].axvline(e["t"], color="red" if e["event"] == "opened" else "green", lw=0.5, alpha=0.5)
    for label, tl in (("gateway", gw), ("baseline round robin", base)):
        errs = [s for s, _, k in tl["requests"] if k != "ok"]
        h, _ = np.histogram(errs, bins)
        ax[2].step(bins[:-1], h / bin_s, where="post", label=f"{label}: {len(errs)} errors")
    ax[2].set_ylabel("client errors/s")
    ax[2].set_xlabel("seconds from the start of each run")
    ax[2].legend(fontsize=8)
    for a in ax:
        for p in gw_res.get("phases", []):
            a.axvline(p["t"], color="black", ls="--", lw=0.8)
    fig.suptitle(
        "gateway_faults: dashed lines = flaky upstream outage start/end in the gateway run (100% failures); "
        "each run on its own time axis",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def amain(a: argparse.Namespace) -> dict[str, Any]:
    docs, queries = scifact(a.docs, a.requests)
    outage_at = int(a.outage_at * a.requests)
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="ragline-gwfaults-") as tmp:
        fakes = {
            "normal": stack.enter_context(FakeUpstream(latency_ms=a.latency_ms, seed=1)),
            "flaky": stack.enter_context(
                FakeUpstream(
                    latency_ms=a.latency_ms,
                    failure_rate=0.3,
                    failure_kinds=("500", "503", "timeout"),
                    hang_s=30.0,
                    seed=2,
                )
            ),
            "limited": stack.enter_context(
                FakeUpstream(
                    latency_ms=a.latency_ms,
                    failure_rate=a.limited_rate,
                    failure_kind="429",
                    retry_after=a.retry_after,
                    seed=3,
                )
            ),
        }
        ups = tuple(
            UpstreamSettings(base_url=f.url, model="chat", name=n, timeout_s=a.timeout_s) for n, f in fakes.items()
        )
        gw_llm = LLMSettings(
            provider="gateway",
            model="chat",
            gateway=GatewaySettings(
                upstreams=ups,
                strategy=a.strategy,
                retries=2,
                breaker_failures=a.breaker_failures,
                breaker_cooldown_s=a.breaker_cooldown_s,
            ),
        )
        base_llm = LLMSettings(
            provider="openai", base_url=fakes["normal"].url, model="chat", timeout_s=a.timeout_s, retries=0
        )
        cache = CacheSettings(enabled=False)
        data = Path(tmp) / "data"
        s_gw = Settings(data_dir=data, llm=gw_llm, cache=cache)
        s_base = Settings(data_dir=data, llm=base_llm, cache=cache)
        from ragline import plugins

        embedder = plugins.load("ragline.embedders", s_gw.embedder.provider)(s_gw.embedder)
        print(f"gateway run: {a.requests} requests at concurrency {a.concurrency}", flush=True)
        gw_res, gw_tl = await run("gateway", s_gw, fakes, queries, a.concurrency, outage_at, a.outage_s, embedder, docs)
        print(f"  {gw_res['client_errors']} errors, {gw_res['wall_s']} s, early {gw_res['limited_early_arrivals']}")
        print("baseline run: naive round robin over three direct OpenAILLM clients (retries=0)", flush=True)
        rr = RoundRobinLLM(
            [
                OpenAILLM(
                    LLMSettings(provider="openai", base_url=f.url, model="chat", timeout_s=a.timeout_s, retries=0)
                )
                for f in fakes.values()
            ]
        )
        base_res, base_tl = await run(
            "baseline_round_robin", s_base, fakes, queries, a.concurrency, outage_at, a.outage_s, embedder, None, rr
        )
        print(
            f"  {base_res['client_errors']} errors, {base_res['wall_s']} s, early {base_res['limited_early_arrivals']}"
        )
    return {"gateway": gw_res, "baseline": base_res, "_timelines": (gw_tl, base_tl)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--timeout-s", type=float, default=1.0)
    ap.add_argument("--limited-rate", type=float, default=0.7, help="share of the limited upstream's calls that 429")
    ap.add_argument("--retry-after", type=float, default=1.5)
    ap.add_argument("--breaker-failures", type=int, default=3)
    ap.add_argument("--breaker-cooldown-s", type=float, default=2.0)
    ap.add_argument("--strategy", default="least_busy")
    ap.add_argument("--outage-at", type=float, default=0.25, help="fraction of the requests when the outage starts")
    ap.add_argument("--outage-s", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "gateway_faults.json")
    a = ap.parse_args()
    if a.requests < 10 or a.concurrency < 1:
        sys.exit("--requests >= 10 and --concurrency >= 1")
    t0 = time.perf_counter()
    r = asyncio.run(amain(a))
    gw_tl, base_tl = r.pop("_timelines")
    gw, base = r["gateway"], r["baseline"]
    diag = gw.get("early_diagnosis", {})
    result = {
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "command": " ".join(["python", *sys.argv]),
        "summary": {
            "client_error_rate_gateway": gw["client_error_rate"],
            "client_error_rate_baseline": base["client_error_rate"],
            "client_errors_gateway": gw["client_errors"],
            "client_errors_baseline": base["client_errors"],
            "error_rate_ratio_baseline_over_gateway": (
                round(base["client_error_rate"] / gw["client_error_rate"], 1) if gw["client_error_rate"] else None
            ),
            "error_rate_ratio_note": "null when the gateway had no client-visible error (the ratio is unbounded)",
            "claim_errors_le_1pct": gw["client_error_rate"] <= 0.01,
            "limited_early_arrivals": gw["limited_early_arrivals"],
            "early_admitted_before_gateway_saw_429": diag.get("early_admitted_before_gateway_saw_429"),
            "early_admitted_after_gateway_saw_429": diag.get("early_admitted_after_gateway_saw_429"),
            "early_in_a_burst_after_a_floor_ended": diag.get("early_in_a_burst_within_100ms_of_a_floor_ending"),
            "claim_no_early_arrivals": gw["limited_early_arrivals"] == 0,
            "baseline_limited_early_arrivals": base["limited_early_arrivals"],
            "breaker_events": [e for e in gw.get("events", []) if e["event"] in ("opened", "closed")],
            "flaky_outage": gw["phases"],
            "breaker_opened_and_recovered": gw.get("breaker_opened_and_recovered"),
            "latency_gateway": gw["latency_all"],
            "latency_baseline": base["latency_all"],
        },
        **r,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    png = a.out.with_suffix(".png")
    plot(png, gw_tl, base_tl, gw)
    print(orjson.dumps(result["summary"], option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {a.out} and {png} in {result['wall_s']} s")


if __name__ == "__main__":
    main()
