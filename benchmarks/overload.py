"""Overload: admission control and cancellation of abandoned work over real HTTP (issue 10, evidence 3).

    flock -w 1500 /work/notes/cpu.lock python benchmarks/overload.py [--docs 300] [--duration 30] [--factor 4]

Starts ``ragline serve`` (the local MiniLM embedder, the extractive answerer, admission control at its
defaults unless ``--work/--queue/--queue-timeout`` say otherwise) on 127.0.0.1, ingests ``--docs``
SciFact documents, then drives it with ``wrk`` (Debian, a C load generator) and a paced Lua script:

* every request is a full miss: a SciFact query made unique by a suffix (``"… [run.thread.n]"``, so its
  embedding is computed too) with ``"cache": "bypass"``: embed + retrieve + pack + extractive answer;
* the script runs one connection per wrk thread and logs, per response, its status, its latency from
  the moment it was sent and from the moment it was *scheduled*, and whether it carried Retry-After.
  Paced, each connection sends on a fixed grid (``connections / rate`` apart, staggered): an
  open-loop offered rate as long as responses come back within one interval (the report gives how
  late sends were, and latencies from the schedule, so a stalled connection cannot hide a stall).

Phases: **A capacity** — closed loop (no pacing) with 1, 2 and 4 connections for ``--cap-duration`` s;
the best rate of 200s is the capacity.  **B unloaded** — one connection paced at a quarter of capacity:
the p99 of a miss when nothing waits.  **C overload** — ``--factor`` × capacity for ``--duration`` s over
``--connections`` connections: goodput (200s per second) over capacity, p99 of the admitted requests
over the unloaded p99, latency of the refusals (503/429) and how many carried Retry-After, the status
mix.  **D abandoned work** — wrk cannot give up on a request (its ``--timeout`` only counts), so a
bounded asyncio client (64 workers, each request on its own connection, closed after 1 s without an
answer) runs for ``--abandon-duration`` s, against this server and against a second one whose queue is
deep and long (``max_queued_work`` 256, ``queue_timeout_s`` 30: clients do give up while queued or in
flight there); after they stop, ``ragline_answers_total`` minus the answers the clients received is the
work the server finished for clients that had left, next to ``ragline_requests_cancelled_total`` and
``ragline_requests_finished_after_disconnect_total``.

wrk and the server share the 2 cores; the report says how much CPU each used.  Writes
``benchmarks/results/overload.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import orjson
from _common import DATA, RESULTS, clean_env, free_port, process, tree_cpu, wait_http

PACED_LUA = """
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } rl_ts; int clock_gettime(int, rl_ts *); ]]
local ts = ffi.new("rl_ts")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end
local BODIES, LOGDIR, RATE, CONNS, RUN = "%(bodies)s", "%(logdir)s", %(rate)f, %(conns)d, "%(run)s"
local counter = 0
function setup(thread) counter = counter + 1; thread:set("id", counter) end
function init(args)
  queries = {}
  for line in io.lines(BODIES) do queries[#queries + 1] = line end
  k, qi = 0, (id * 7919) %% #queries
  interval = RATE > 0 and CONNS / RATE or 0
  start = now() + 0.05 + (id - 1) * interval / CONNS
  log = io.open(LOGDIR .. "/" .. id .. ".log", "w")
  log:setvbuf("line")
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
if RATE > 0 then
  function delay()
    local d = (start + k * interval - now()) * 1000
    if d < 0 then return 0 end
    return math.floor(d)
  end
end
function request()
  scheduled = RATE > 0 and start + k * interval or now()
  k = k + 1
  qi = qi %% #queries + 1
  sent = now()
  return wrk.format(nil, "/v1/query", nil,
    '{"query":"' .. queries[qi] .. ' [' .. RUN .. '.' .. id .. '.' .. k .. ']","cache":"bypass","timings":false}')
end
function response(status, headers, body)
  local t = now()
  local ra = (headers["retry-after"] or headers["Retry-After"]) and 1 or 0
  log:write(string.format("%%d %%.3f %%.3f %%d %%.4f\\n", status, (t - sent) * 1000, (t - scheduled) * 1000, ra, sent))
end
"""


def run_wrk(url: str, tmp: Path, name: str, *, conns: int, seconds: float, rate: float) -> list[tuple[float, ...]]:
    """One wrk run (``rate`` 0: closed loop); the per-response log: (status, ms, ms from schedule, RA, sent_s)."""
    logdir = tmp / name
    logdir.mkdir()
    script = tmp / f"{name}.lua"
    # the run's name is in every query text: "cache": "bypass" still caches query embeddings, so texts that
    # repeated across runs (the same thread id and counter) made later runs' requests cheaper than a miss
    script.write_text(
        PACED_LUA % {"bodies": tmp / "queries.txt", "logdir": logdir, "rate": rate, "conns": conns, "run": name}
    )
    subprocess.run(
        ["wrk", f"-t{conns}", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    rows = [tuple(float(x) for x in line.split()) for f in logdir.glob("*.log") for line in f.read_text().splitlines()]
    t0 = min((r[4] for r in rows), default=0.0)
    return [(*r[:4], r[4] - t0) for r in rows]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2)


def summarise(rows: list[tuple[float, ...]], seconds: float) -> dict[str, Any]:
    ok = [r[1] for r in rows if r[0] == 200]
    ok_sched = [r[2] for r in rows if r[0] == 200]
    refused = [r for r in rows if r[0] in (429, 503)]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(int(r[0]))] = statuses.get(str(int(r[0])), 0) + 1
    late = [r[2] - r[1] for r in rows]  # how late each request was sent against its schedule
    return {
        "responses": len(rows),
        "sent_rps": round(len(rows) / seconds, 1),
        "statuses": statuses,
        "ok_rps": round(len(ok) / seconds, 2),
        "ok_p50_ms": pct(ok, 0.50),
        "ok_p99_ms": pct(ok, 0.99),
        "ok_p99_from_schedule_ms": pct(ok_sched, 0.99),
        "refused": len(refused),
        "refused_p50_ms": pct([r[1] for r in refused], 0.50),
        "refused_p99_ms": pct([r[1] for r in refused], 0.99),
        "refused_max_ms": round(max((r[1] for r in refused), default=float("nan")), 2),
        "refused_with_retry_after": sum(1 for r in refused if r[3]),
        "send_lateness_p99_ms": pct(late, 0.99),
    }


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def _one(port: int, body: bytes, timeout: float) -> int:
    """Status of one POST /v1/query on its own connection; 0: no answer within ``timeout`` (socket closed)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.read()
            return int(head.split(b" ", 2)[1])
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return 0
    finally:
        if writer is not None:
            writer.close()


async def _abandoning(port: int, queries: list[str], workers: int, seconds: float, timeout: float) -> list[int]:
    out: list[int] = []
    t_end = time.monotonic() + seconds

    async def worker(w: int) -> None:
        n = 0
        while time.monotonic() < t_end:
            n += 1
            q = queries[(w * 7919 + n) % len(queries)]
            body = orjson.dumps({"query": f"{q} [a{w}.{n}]", "cache": "bypass", "timings": False})
            out.append(await _one(port, body, timeout))

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return out


@contextlib.contextmanager
def server(
    tmp: Path, name: str, docs: list[dict[str, Any]], limits: dict[str, str], profile: str | None = None
) -> Iterator[tuple[str, int, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAGLINE_DATA_DIR=str(tmp / f"data-{name}"))
    env.update({f"RAGLINE_LIMITS__{k.upper()}": v for k, v in limits.items()})
    if profile:
        env["RAGLINE_PROFILE"] = profile
    cmd = [sys.executable, "-m", "ragline.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with process(cmd, env, tmp / f"serve-{name}.log") as proc:
        wait_http(url, proc, tmp / f"serve-{name}.log", path="/readyz", timeout_s=300)
        with httpx.Client(base_url=url, timeout=300) as c:
            for i in range(0, len(docs), 50):
                part = [{"id": d["_id"], "title": d.get("title", ""), "text": d["text"]} for d in docs[i : i + 50]]
                c.post("/v1/documents", json={"documents": part}).raise_for_status()
        yield url, port, proc.pid


def abandon(url: str, port: int, queries: list[str], seconds: float) -> dict[str, Any]:
    names = (
        "ragline_answers_total",
        "ragline_requests_cancelled_total",
        "ragline_requests_finished_after_disconnect_total",
    )
    before = {n: metric(url, n) for n in names}
    res = asyncio.run(_abandoning(port, queries, 64, seconds, 1.0))
    time.sleep(3)  # whatever the server still finishes, it finishes now
    after = {n: metric(url, n) for n in names}
    finished = after[names[0]] - before[names[0]]
    received = sum(1 for st in res if st == 200)
    statuses: dict[str, int] = {}
    for st in res:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    return {
        "clients": 64,
        "client_timeout_s": 1.0,
        "seconds": seconds,
        "sent": len(res),
        "statuses (0: gave up)": statuses,
        "answers_received": received,
        "answers_the_server_finished": finished,
        "work_done_after_disconnect": finished - received,
        "requests_cancelled": after[names[1]] - before[names[1]],
        "finished_after_disconnect_metric": after[names[2]] - before[names[2]],
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        sys.exit("needs wrk (Debian package; scripts/test.sh installs it)")
    queries = [orjson.loads(x)["text"] for x in (DATA / "scifact" / "queries.jsonl").read_bytes().splitlines()]
    docs = [orjson.loads(x) for x in (DATA / "scifact" / "corpus.jsonl").read_bytes().splitlines()][: a.docs]
    limits = {
        k: str(v)
        for k, v in (
            ("max_concurrent_work", a.work),
            ("max_queued_work", a.queue),
            ("queue_timeout_s", a.queue_timeout),
        )
        if v is not None
    }
    report: dict[str, Any] = {
        "docs": a.docs,
        "duration_s": a.duration,
        "factor": a.factor,
        "limits": limits or "defaults",
        "profile": a.profile,
    }
    with tempfile.TemporaryDirectory(prefix="ragline-overload-") as t:
        tmp = Path(t)
        (tmp / "queries.txt").write_text("".join(orjson.dumps(q).decode()[1:-1] + "\n" for q in queries))
        with server(tmp, "main", docs, limits, a.profile) as (url, port, pid):
            run_wrk(url, tmp, "warmup", conns=2, seconds=5, rate=0)
            cap = {}
            for c in (1, 2, 4):
                cap[str(c)] = summarise(
                    run_wrk(url, tmp, f"cap{c}", conns=c, seconds=a.cap_duration, rate=0), a.cap_duration
                )
                print(f"capacity c={c}: {cap[str(c)]}", flush=True)
            capacity = max(x["ok_rps"] for x in cap.values())
            report["capacity"] = {"closed_loop_by_connections": cap, "rps": capacity}
            unloaded = summarise(run_wrk(url, tmp, "unloaded", conns=1, seconds=20, rate=capacity / 4), 20)
            report["unloaded"] = unloaded
            print(f"capacity {capacity} req/s; unloaded {unloaded}", flush=True)
            rate = a.factor * capacity
            cpu0, w0 = tree_cpu(pid), time.perf_counter()
            rows = run_wrk(url, tmp, "overload", conns=a.connections, seconds=a.duration, rate=rate)
            server_cpu = (tree_cpu(pid) - cpu0) / (time.perf_counter() - w0)
            o = summarise(rows, a.duration)
            o.update(
                offered_rps=round(rate, 1),
                connections=a.connections,
                goodput_over_capacity=round(o["ok_rps"] / capacity, 3),
                admitted_p99_over_unloaded_p99=round(o["ok_p99_ms"] / unloaded["ok_p99_ms"], 2),
                every_refusal_had_retry_after=o["refused_with_retry_after"] == o["refused"],
                server_cpu_cores=round(server_cpu, 2),
                early_shed=metric(url, 'ragline_admission_rejected_total{reason="early"}'),
            )
            report["overload"] = o
            print("overload", o, flush=True)
            time.sleep(2)
            report["abandoned"] = {"default_queue": abandon(url, port, queries, a.abandon_duration)}
            print("abandoned", report["abandoned"], flush=True)
        deep = {**limits, "max_queued_work": "256", "queue_timeout_s": "30"}
        with server(tmp, "deep", docs, deep, a.profile) as (url, port, _):
            run_wrk(url, tmp, "warmup-deep", conns=2, seconds=5, rate=0)
            report["abandoned"]["deep_queue"] = {"limits": deep, **abandon(url, port, queries, a.abandon_duration)}
            print("abandoned deep", report["abandoned"]["deep_queue"], flush=True)
    report["note"] = (
        "wrk (one thread per connection, paced by a Lua delay()) and the server share the 2 cores; "
        "every request is a full miss (unique query text, cache bypass)"
    )
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--cap-duration", type=float, default=10.0)
    ap.add_argument("--abandon-duration", type=float, default=20.0)
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--work", type=int, default=None, help="limits.max_concurrent_work (default: the server's)")
    ap.add_argument("--queue", type=int, default=None, help="limits.max_queued_work")
    ap.add_argument("--queue-timeout", type=float, default=None, help="limits.queue_timeout_s")
    ap.add_argument("--profile", default=None, help="the server's settings profile (e.g. latency)")
    ap.add_argument("--out", default="overload.json")
    a = ap.parse_args()
    t0 = time.time()
    report = run(a)
    report["wall_s"] = round(time.time() - t0, 1)
    (RESULTS / a.out).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {RESULTS / a.out}")


if __name__ == "__main__":
    main()
