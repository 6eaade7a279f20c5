"""Upstream rate limits shared through Redis: 2 instances x 2 workers against one fake upstream (issue 9).

    python benchmarks/gateway_limits.py [--docs 100] [--duration 65] [--connections 32] [--rpm 600]
        [--tpm 0 (auto)] [--latency-ms 20] [--headroom 0.97] [--runs redis,no_redis] [--phases rpm,tpm]
        [--fallback-run] [--name gateway_limits] [--arrivals-out DIR]

    # the optional third run alone (Redis unreachable, local_share 0.25), ~3 min:
    python benchmarks/gateway_limits.py --runs none --fallback-run --name gateway_limits_fallback

Starts, on 127.0.0.1 only: a redis-server (no persistence), one fake OpenAI upstream as its own process
(``python -m ragline.testing.fake_upstream``, ``--latency-ms`` per reply), and ingests ``--docs`` SciFact
documents once into an embedded data dir that every instance shares.  A short in-process calibration measures
what one request costs in tokens at the fake with ``k=1`` and ``k=10`` sources, and the tpm limit is set
between the two (``rpm x sqrt(cost_k1 x cost_k10)``), so that:

* phase ``rpm`` (``k=1``, short prompts): the requests-per-minute limit binds, tpm does not;
* phase ``tpm`` (``k=10``, long prompts): the tokens-per-minute limit binds, rpm does not.

Each run starts two ``ragline serve --workers 2`` instances (``llm.provider: gateway``, one upstream with
``rpm``/``tpm``, ``llm.max_tokens: 32``, ``queue_timeout_s: 2``) and offers, per phase and for ``--duration``
seconds (default 65: it covers a whole 60 s window), far more than the limit: one ``wrk`` per instance with
``--connections`` connections POSTing ``/v1/query`` with ``"cache": "bypass"`` (every request reaches the
gateway).  Runs:

* ``redis``: ``cache.redis_url`` set (the gateway takes it), so the 4 processes share one limiter state;
* ``no_redis``: no Redis at all, so each of the 4 processes enforces the full limits on its own;
* ``fallback`` (``--fallback-run``): ``cache.redis_url`` points at a closed port and
  ``llm.gateway.local_share: 0.25``, so each process falls back to a quarter of the limits.

From the fake's own arrival timestamps (``GET /_arrivals``, with each request's prompt + completion tokens):
the most requests in any sliding 1 s and 60 s window (and in fixed ones), the most tokens in any sliding 60 s
window, the mean rate, the smallest gaps between arrivals — compared with the limits; client side (a wrk Lua
``response`` hook): the status mix and whether every 429 carried ``Retry-After``.  The baseline is the
``no_redis`` run of the same invocation.  Writes ``<name>.json`` and ``<name>.png`` (per-second arrivals).
The default invocation takes about 5.5 minutes on 2 cores.

Reading the 1 s windows: the limiter spaces *admissions* (on Redis' clock) by ``60 / (rpm x headroom)``, so
any window of admissions holds at most ``w x rate + 1``; the fake timestamps *arrivals*, after the admitting
process has sent the request.  A delay between the two (this process's event loop not running for 50-250 ms
on a loaded 2-core machine was seen) that hits one request more than its neighbours squeezes 11 arrivals into
one second even though their admissions span 1.03 s; headroom 0.97 leaves only ~31 ms of such slack in a 1 s
window at 10 req/s.  ``over_limit_1s_at_s`` says where that happened.  60 s windows have ~18 requests of slack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import DATA, RESULTS, clean_env, free_port, process, wait_http

LUA = """
local bodies = {}
local i = 0
for line in io.lines("%s") do bodies[#bodies + 1] = line end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local threads = {}
status_counts = {}
ra_present = 0
ra_missing = 0
ra_sum = 0
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  i = math.random(#bodies)
end
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, "/v1/query", nil, bodies[i])
end
response = function(status, headers, body)
  status_counts[status] = (status_counts[status] or 0) + 1
  if status == 429 or status == 503 then
    local ra = headers["retry-after"] or headers["Retry-After"]
    if ra then
      ra_present = ra_present + 1
      ra_sum = ra_sum + (tonumber(ra) or 0)
    else
      ra_missing = ra_missing + 1
    end
  end
end
done = function(summary, latency, requests)
  for _, t in ipairs(threads) do
    local c = t:get("status_counts")
    for s, n in pairs(c) do io.write(string.format("STATUS %%d %%d\\n", s, n)) end
    io.write(string.format("RETRY_AFTER %%d %%d %%f\\n", t:get("ra_present"), t:get("ra_missing"), t:get("ra_sum")))
  end
end
"""


def parse_wrk(out: str) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for s, n in re.findall(r"^STATUS (\d+) (\d+)$", out, re.M):
        statuses[s] = statuses.get(s, 0) + int(n)
    present = missing = 0
    ra_sum = 0.0
    for p, m, sm in re.findall(r"^RETRY_AFTER (\d+) (\d+) ([\d.]+)$", out, re.M):
        present, missing, ra_sum = present + int(p), missing + int(m), ra_sum + float(sm)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "statuses": statuses,
        "retry_after_present": present,
        "retry_after_missing": missing,
        "retry_after_mean_s": round(ra_sum / present, 3) if present else None,
        "client_rps": float(rps.group(1)) if rps else float("nan"),
        "socket_errors": dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
        if sock
        else {},
    }


def merge_wrk(parts: list[dict[str, Any]]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for p in parts:
        for s, n in p["statuses"].items():
            statuses[s] = statuses.get(s, 0) + n
    total = sum(statuses.values())
    mix = {
        "200": statuses.get("200", 0),
        "429": statuses.get("429", 0),
        "503": statuses.get("503", 0),
        "other": {s: n for s, n in statuses.items() if s not in ("200", "429", "503")},
    }
    present = sum(p["retry_after_present"] for p in parts)
    missing = sum(p["retry_after_missing"] for p in parts)
    ra_mean = [p["retry_after_mean_s"] for p in parts if p["retry_after_mean_s"] is not None]
    sock: dict[str, int] = {}
    for p in parts:
        for k, v in p["socket_errors"].items():
            sock[k] = sock.get(k, 0) + v
    return {
        "responses": total,
        "status_mix": mix,
        "client_rps": round(sum(p["client_rps"] for p in parts), 2),
        "limited_with_retry_after": present,
        "limited_without_retry_after": missing,
        "retry_after_mean_s": round(float(np.mean(ra_mean)), 3) if ra_mean else None,
        "socket_errors": sock,
    }


# ---------------------------------------------------------------------------------------------- analysis
def sliding_max(ts: np.ndarray, w: float, weights: np.ndarray | None = None) -> tuple[float, float]:
    """The largest count (or weight sum) in any half-open window [t, t + w), and where it starts.
    Scanning windows that start at an arrival is enough: any window can slide right to its first arrival."""
    if ts.size == 0:
        return 0.0, float("nan")
    j = np.searchsorted(ts, ts + w, side="left")
    if weights is None:
        sums = (j - np.arange(ts.size)).astype(np.float64)
    else:
        cs = np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)])
        sums = cs[j] - cs[: ts.size]
    i = int(np.argmax(sums))
    return float(sums[i]), float(ts[i])


def sliding_over(ts: np.ndarray, w: float, limit: float) -> int:
    """How many windows [t_i, t_i + w) hold more than ``limit`` arrivals."""
    if ts.size == 0:
        return 0
    j = np.searchsorted(ts, ts + w, side="left")
    return int(np.sum((j - np.arange(ts.size)) > limit))


def over_at(ts: np.ndarray, w: float, limit: float, t0: float) -> list[float]:
    """Where (seconds from t0, 0.1 s resolution, at most 40) windows [t_i, t_i + w) hold more than ``limit``."""
    j = np.searchsorted(ts, ts + w, side="left")
    starts = ts[(j - np.arange(ts.size)) > limit] - t0
    return sorted({round(float(x), 1) for x in starts})[:40]


def git_head() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(RESULTS.parent.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(RESULTS.parent.parent), "status", "--porcelain", "ragline"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty(ragline/)" if dirty else "")


def analyse(arrivals: list[list[Any]], t0: float, t1: float, rpm: float, tpm: float) -> dict[str, Any]:
    """Rates at the fake between t0 and t1 (epoch seconds, the fake's clock)."""
    rows = sorted((a for a in arrivals if a[1] == "chat" and t0 <= a[0] < t1), key=lambda a: a[0])
    ts = np.array([a[0] for a in rows], dtype=np.float64)
    tok = np.array([a[3] for a in rows], dtype=np.float64)
    per_s = rpm / 60.0
    out: dict[str, Any] = {"arrivals": int(ts.size)}
    if ts.size < 2:
        return out
    span = float(ts[-1] - ts[0])
    m1, at1 = sliding_max(ts, 1.0)
    m60, at60 = sliding_max(ts, 60.0)
    tk60, attk = sliding_max(ts, 60.0, tok)
    tk1, _ = sliding_max(ts, 1.0, tok)
    sec = np.floor(ts).astype(np.int64)
    fixed1 = np.bincount(sec - sec.min())
    full = math.floor((t1 - t0) / 60.0)  # fixed 60 s windows from the phase start that fit in it
    fixed60 = [int(np.sum((ts >= t0 + 60 * k) & (ts < t0 + 60 * (k + 1)))) for k in range(full)]
    fixed60_tok = [float(tok[(ts >= t0 + 60 * k) & (ts < t0 + 60 * (k + 1))].sum()) for k in range(full)]
    gaps = np.diff(ts) * 1000.0
    out.update(
        {
            "span_s": round(span, 2),
            "mean_rps": round((ts.size - 1) / span, 3) if span > 0 else None,
            "mean_rpm": round((ts.size - 1) / span * 60, 1) if span > 0 else None,
            "max_req_sliding_1s": int(m1),
            "max_req_sliding_1s_at": round(at1 - t0, 3),
            "windows_1s_over_limit": sliding_over(ts, 1.0, per_s),
            "over_limit_1s_at_s": over_at(ts, 1.0, per_s, t0),
            "max_req_fixed_1s": int(fixed1.max()),
            "max_req_sliding_60s": int(m60),
            "max_req_sliding_60s_at": round(at60 - t0, 3),
            "windows_60s_over_limit": sliding_over(ts, 60.0, rpm),
            "req_fixed_60s": fixed60,
            "max_tokens_sliding_60s": int(tk60),
            "max_tokens_sliding_60s_at": round(attk - t0, 3),
            "tokens_fixed_60s": [int(x) for x in fixed60_tok],
            "max_tokens_sliding_1s": int(tk1),
            "tokens_per_request_mean": round(float(tok.mean()), 1),
            "tokens_per_request_max": int(tok.max()),
            "mean_tpm": round(float(tok[1:].sum()) / span * 60, 0) if span > 0 else None,
            "gap_ms": {
                "min": round(float(gaps.min()), 2),
                "p1": round(float(np.percentile(gaps, 1)), 2),
                "p50": round(float(np.percentile(gaps, 50)), 2),
            },
            "vs_limits": {
                "rpm_1s_ratio": round(m1 / per_s, 3),
                "rpm_60s_ratio": round(m60 / rpm, 3),
                "tpm_60s_ratio": round(tk60 / tpm, 3) if tpm else None,
                "within_rpm_1s": bool(m1 <= per_s),
                "within_rpm_60s": bool(m60 <= rpm),
                "within_tpm_60s": bool(tk60 <= tpm) if tpm else None,
            },
        }
    )
    return out


def per_second(arrivals: list[list[Any]], t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
    ts = np.array([a[0] for a in arrivals if a[1] == "chat" and t0 <= a[0] < t1], dtype=np.float64)
    tok = np.array([a[3] for a in arrivals if a[1] == "chat" and t0 <= a[0] < t1], dtype=np.float64)
    n = math.ceil(t1 - t0)
    idx = np.clip(((ts - t0) // 1).astype(np.int64), 0, max(n - 1, 0))
    return np.bincount(idx, minlength=n), np.bincount(idx, weights=tok, minlength=n)


# -------------------------------------------------------------------------------------------- processes
def yaml_config(
    fake_url: str, rpm: int, tpm: int, queue_timeout: float, redis_url: str | None, share: float, headroom: float
) -> str:
    lines = [
        "llm:",
        "  provider: gateway",
        "  model: chat",
        "  max_tokens: 32",
        "  gateway:",
        f"    queue_timeout_s: {queue_timeout}",
        f"    local_share: {share}",
        f"    headroom: {headroom}",
        "    upstreams:",
        f'      - {{base_url: "{fake_url}", model: chat, name: fake, rpm: {rpm}, tpm: {tpm}}}',
        "embedder:",
        "  threads: 1",
    ]
    if redis_url:
        lines += ["cache:", f'  redis_url: "{redis_url}"']
    return "\n".join(lines) + "\n"


def ingest_and_calibrate(data_dir: Path, fake_url: str, docs: list[dict[str, Any]], queries: list[str]) -> dict:
    """Ingest once (embedded store); then the tokens one request costs at the fake with k=1 and k=10."""
    from ragline.config import GatewaySettings, LLMSettings, Settings, UpstreamSettings
    from ragline.pipeline import AsyncRAG
    from ragline.types import Document

    llm = LLMSettings(
        provider="gateway",
        model="chat",
        max_tokens=32,
        gateway=GatewaySettings(upstreams=(UpstreamSettings(base_url=fake_url, model="chat", name="fake"),)),
    )
    settings = Settings(data_dir=data_dir, llm=llm)

    async def go() -> dict[str, Any]:
        async with AsyncRAG(settings) as rag:
            await rag.ingest([Document(id=str(d["_id"]), text=d["text"], title=d.get("title", "")) for d in docs])
            with httpx.Client(timeout=10, trust_env=False) as c:
                base = fake_url.removesuffix("/v1")
                costs: dict[str, list[int]] = {}
                for k in (1, 10):
                    c.post(base + "/_reset").raise_for_status()
                    for q in queries[:30]:
                        await rag.ask(q, k=k, cache_mode="bypass")
                    costs[f"k{k}"] = [a[3] for a in c.get(base + "/_arrivals").json()["arrivals"]]
                c.post(base + "/_reset").raise_for_status()
            return {
                "stats": rag.stats(),
                **{f"tokens_{n}_mean": round(float(np.mean(v)), 1) for n, v in costs.items()},
                **{f"tokens_{n}_max": int(max(v)) for n, v in costs.items()},
            }

    return asyncio.run(go())


@contextlib.contextmanager
def instances(tmp: Path, name: str, config: str, data_dir: Path, ports: list[int], workers: int) -> Iterator[list[str]]:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(config)
    with contextlib.ExitStack() as stack:
        urls = []
        for i, port in enumerate(ports):
            env = clean_env(
                HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false",
                RAGLINE_CONFIG=str(cfg),
                RAGLINE_DATA_DIR=str(data_dir),
            )
            cmd = [sys.executable, "-m", "ragline.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--workers", str(workers)]
            log = tmp / f"{name}-node{i}.log"
            proc = stack.enter_context(process(cmd, env, log))
            urls.append((f"http://127.0.0.1:{port}", proc, log))
        for url, proc, log in urls:
            wait_http(url, proc, log, path="/readyz", timeout_s=180)
        yield [u for u, _, _ in urls]


def warm_up(urls: list[str], queries: list[str]) -> None:
    """A few concurrent requests per instance, so that every worker has loaded its embedder."""

    async def go() -> None:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
            for _ in range(3):
                await asyncio.gather(
                    *(
                        c.post(u + "/v1/query", json={"query": q, "k": 1, "cache": "bypass"})
                        for u in urls
                        for q in queries[:6]
                    )
                )
                await asyncio.sleep(0.5)

    asyncio.run(go())


def run_wrk(urls: list[str], script: Path, duration: int, connections: int) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "30s", "-s", str(script), u],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for u in urls
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=duration + 90)
        outs.append(parse_wrk(out))
    return outs


def snapshot(urls: list[str]) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(timeout=10, trust_env=False) as c:
        for u in urls:
            with contextlib.suppress(httpx.HTTPError, KeyError, TypeError, IndexError):
                llm = c.get(u + "/v1/upstreams").json()["llm"]
                up = llm["upstreams"][0]
                rows.append(
                    {
                        "state": llm["state"],
                        "retries": llm["retries"],
                        **{
                            k: up[k]
                            for k in ("requests", "errors", "rate_factor", "breaker", "cooling_down_s", "in_flight")
                        },
                    }
                )
    return rows


# ------------------------------------------------------------------------------------------------- run
def run(a: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None or shutil.which("redis-server") is None:
        sys.exit("needs wrk and redis-server (Debian packages; scripts/test.sh installs them)")
    docs = [orjson.loads(x) for x in (DATA / "scifact" / "corpus.jsonl").read_bytes().splitlines()][: a.docs]
    queries = [orjson.loads(x)["text"] for x in (DATA / "scifact" / "queries.jsonl").read_bytes().splitlines()][
        : a.queries
    ]
    report: dict[str, Any] = {
        "setup": {
            "instances": 2,
            "workers_per_instance": a.workers,
            "docs": a.docs,
            "queries": len(queries),
            "duration_s_per_phase": a.duration,
            "connections_per_instance": a.connections,
            "fake_latency_ms": a.latency_ms,
            "queue_timeout_s": a.queue_timeout,
            "headroom": a.headroom,
            "commit": git_head(),
            "llm_max_tokens": 32,
        },
        "runs": {},
    }
    series: dict[str, dict[str, Any]] = {}
    t_begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ragline-gwlimits-") as t:
        tmp = Path(t)
        redis_port, fake_port = free_port(), free_port()
        fake_url = f"http://127.0.0.1:{fake_port}/v1"
        fake_base = f"http://127.0.0.1:{fake_port}"
        redis_cmd = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        fake_cmd = [sys.executable, "-m", "ragline.testing.fake_upstream", "--port", str(fake_port)]
        fake_cmd += ["--latency-ms", str(a.latency_ms)]
        with (
            process([*redis_cmd, "no"], clean_env(), tmp / "redis.log"),
            process(fake_cmd, clean_env(), tmp / "fake.log") as fake,
        ):
            wait_http(fake_base, fake, tmp / "fake.log", path="/v1/models", timeout_s=30)
            data_dir = tmp / "data"
            t_cal = time.monotonic()
            cal = ingest_and_calibrate(data_dir, fake_url, docs, queries)
            cal["seconds"] = round(time.monotonic() - t_cal, 1)
            tpm = a.tpm or int(round(a.rpm * math.sqrt(cal["tokens_k1_mean"] * cal["tokens_k10_mean"]), -3))
            cal["tpm_chosen"] = tpm
            cal["expected_rpm_bound_k1"] = round(tpm * a.headroom / cal["tokens_k1_mean"], 1)
            cal["expected_rpm_bound_k10"] = round(tpm * a.headroom / cal["tokens_k10_mean"], 1)
            report["calibration"] = cal
            report["limits"] = {"rpm": a.rpm, "tpm": tpm, "rps": a.rpm / 60}
            print(f"calibration: {cal}", flush=True)
            scripts = {}
            for phase, k in (("rpm", 1), ("tpm", 10)):
                bodies = tmp / f"{phase}.jsonl"
                bodies.write_text(
                    "".join(orjson.dumps({"query": q, "k": k, "cache": "bypass"}).decode() + "\n" for q in queries)
                )
                (tmp / f"{phase}.lua").write_text(LUA % bodies)
                scripts[phase] = tmp / f"{phase}.lua"
            runs = [("redis", f"redis://127.0.0.1:{redis_port}/0", 1.0), ("no_redis", None, 1.0)]
            if a.fallback_run:
                runs.append(("fallback", f"redis://127.0.0.1:{free_port()}/0", 0.25))
            runs = [r for r in runs if r[0] in a.runs.split(",") or (r[0] == "fallback" and a.fallback_run)]
            phase_names = [p for p in ("rpm", "tpm") if p in a.phases.split(",")]
            for name, redis_url, share in runs:
                ports = [free_port(), free_port()]
                config = yaml_config(fake_url, a.rpm, tpm, a.queue_timeout, redis_url, share, a.headroom)
                t_start = time.monotonic()
                with instances(tmp, name, config, data_dir, ports, a.workers) as urls:
                    warm_up(urls, queries)
                    startup_s = round(time.monotonic() - t_start, 1)
                    httpx.post(fake_base + "/_reset", timeout=10, trust_env=False).raise_for_status()
                    phases: dict[str, Any] = {}
                    bounds: dict[str, tuple[float, float]] = {}
                    for phase in phase_names:
                        w0 = time.time()
                        parts = run_wrk(urls, scripts[phase], a.duration, a.connections)
                        w1 = time.time()
                        bounds[phase] = (w0, w1)
                        phases[phase] = {"client": merge_wrk(parts), "wall_s": round(w1 - w0, 2)}
                        time.sleep(a.queue_timeout + 1.0)  # let every queued request end before the next phase
                    arrivals = httpx.get(fake_base + "/_arrivals", timeout=30, trust_env=False).json()["arrivals"]
                    snap = snapshot(urls)
                    # each phase's arrivals: from its wrk start to the next phase's start (queued tail included)
                    starts = [bounds[p][0] for p in phase_names] + [time.time()]
                    edges = {p: (starts[i], starts[i + 1]) for i, p in enumerate(phase_names)}
                    if a.arrivals_out:
                        a.arrivals_out.mkdir(parents=True, exist_ok=True)
                        (a.arrivals_out / f"{name}.json").write_bytes(
                            orjson.dumps({"bounds": bounds, "arrivals": arrivals})
                        )
                    for phase, (p0, p1) in edges.items():
                        phases[phase]["upstream"] = analyse(arrivals, p0, p1, a.rpm, tpm)
                        late = [x for x in arrivals if bounds[phase][1] <= x[0] < p1]
                        phases[phase]["upstream"]["arrivals_after_clients_stopped"] = len(late)
                        c, tk = per_second(arrivals, p0, p1)
                        series.setdefault(name, {})[phase] = (c.tolist(), tk.tolist())
                    whole = analyse(arrivals, starts[0], starts[-1], a.rpm, tpm)
                    report["runs"][name] = {
                        "redis_url": redis_url,
                        "local_share": share,
                        "startup_s": startup_s,
                        "phases": phases,
                        "whole_run": {k: whole[k] for k in ("arrivals", "max_req_sliding_1s", "max_req_sliding_60s",
                                                            "max_tokens_sliding_60s", "vs_limits") if k in whole},
                        "fake_early_arrivals": httpx.get(fake_base + "/_stats", timeout=10, trust_env=False).json()[
                            "early_arrivals"
                        ],
                        "gateway_snapshots": snap,
                    }  # fmt: skip
                    print(f"run {name}: {orjson.dumps(phases).decode()}", flush=True)
    report["total_seconds"] = round(time.monotonic() - t_begin, 1)
    report["summary"] = summarise(report)
    report["series_per_second"] = series
    return report


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lim = report["limits"]
    for name, r in report["runs"].items():
        for phase, p in r["phases"].items():
            u, c = p["upstream"], p["client"]
            out[f"{name}/{phase}"] = {
                "upstream_max_req_1s": u.get("max_req_sliding_1s"),
                "upstream_max_req_60s": u.get("max_req_sliding_60s"),
                "upstream_max_tokens_60s": u.get("max_tokens_sliding_60s"),
                "upstream_mean_rpm": u.get("mean_rpm"),
                "upstream_mean_tpm": u.get("mean_tpm"),
                "within_limits": u.get("vs_limits"),
                "client_200": c["status_mix"]["200"],
                "client_429": c["status_mix"]["429"],
                "client_503": c["status_mix"]["503"],
                "client_other": c["status_mix"]["other"],
                "429_without_retry_after": c["limited_without_retry_after"],
            }
    if "redis" in report["runs"] and "no_redis" in report["runs"]:
        for phase in report["runs"]["redis"]["phases"]:
            red = report["runs"]["redis"]["phases"][phase]["upstream"].get("mean_rpm") or 0
            alone = report["runs"]["no_redis"]["phases"][phase]["upstream"].get("mean_rpm") or 0
            out[f"no_redis_over_redis_{phase}_phase"] = round(alone / red, 2) if red else None
    out["limits"] = lim
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    series = report["series_per_second"]
    lim = report["limits"]
    phases = sorted({p for by_phase in series.values() for p in by_phase}, key=("rpm", "tpm").index)
    fig, axes = plt.subplots(2, len(phases), figsize=(6.5 * len(phases), 7), sharex="col", squeeze=False)
    smooth = np.ones(5) / 5
    for col, phase in enumerate(phases):
        for name, by_phase in series.items():
            c, tk = by_phase[phase]
            axes[0][col].plot(range(len(c)), c, label=name, lw=1)
            tps = np.convolve(np.asarray(tk, dtype=np.float64), smooth, mode="valid")
            axes[1][col].plot(np.arange(tps.size) + 2, tps, label=name, lw=1)
        axes[0][col].axhline(lim["rps"], color="k", ls="--", lw=0.8, label=f"limit {lim['rpm']} rpm")
        axes[1][col].axhline(lim["tpm"] / 60, color="k", ls="--", lw=0.8, label=f"limit {lim['tpm']} tpm / 60")
        axes[0][col].set_title(f"phase {phase} ({'k=1' if phase == 'rpm' else 'k=10'}): requests/s at the fake")
        axes[1][col].set_title("tokens/s at the fake (5 s moving average)")
        axes[1][col].set_xlabel("seconds since phase start")
        axes[0][col].legend(fontsize=8)
        axes[1][col].legend(fontsize=8)
    fig.suptitle("2 ragline instances x 2 workers, one fake upstream: shared Redis limiter vs none")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--duration", type=int, default=65, help="seconds of load per phase (>= 60 covers a window)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections per instance")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rpm", type=int, default=600)
    ap.add_argument("--tpm", type=int, default=0, help="0: chosen from the calibration")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--queue-timeout", type=float, default=2.0)
    ap.add_argument("--headroom", type=float, default=0.97, help="llm.gateway.headroom (ragline's default 0.97)")
    ap.add_argument("--fallback-run", action="store_true", help="also: Redis unreachable, local_share 0.25")
    ap.add_argument("--runs", default="redis,no_redis", help="which of redis,no_redis to run")
    ap.add_argument("--phases", default="rpm,tpm", help="which of rpm,tpm to run")
    ap.add_argument("--arrivals-out", type=Path, default=None, help="also write the raw arrivals of each run here")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="gateway_limits")
    a = ap.parse_args()
    report = run(a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    plot(report, a.out / f"{a.name}.png")
    print(orjson.dumps(report["summary"], option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
