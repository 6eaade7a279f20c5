"""Overload: admission control and cancellation of abandoned work over real HTTP (issue 10, evidence 3).

    python benchmarks/overload.py [--docs 300] [--duration 30] [--factor 4] [--out overload.json]

Starts ``ragline serve`` (default settings: the local MiniLM embedder, the extractive answerer, admission
control at its defaults) on 127.0.0.1, ingests ``--docs`` SciFact documents, then:

0. every SciFact query is asked once, so its embedding is cached: every phase then does the same work;
1. **capacity**: ``wrk`` (Debian, a C load generator) posts uncached queries (``"cache": "bypass"``:
   retrieval + packing + answer every time; the query embedding from the embedding cache) for 10 s with 4
   and with 8 connections; the best
   requests/s is the capacity;
2. **unloaded p99**: one connection (``wrk -c1``): the p99 of an uncached query when nothing waits;
3. **overload**: an open-loop client (Poisson arrivals at ``--factor`` × capacity for ``--duration`` s, each
   request on its own connection with a 10 s timeout, a minimal asyncio HTTP client so the generator costs
   little CPU) records every response's status, latency and Retry-After: goodput (200s per second) against
   capacity, p99 of the admitted requests against the unloaded p99, p99 latency of the refusals (503/429)
   and whether each carried Retry-After;
4. **abandoned work**: the same arrival rate with clients that give up after 1 s (they close the socket);
   after they stop, the server's ``ragline_answers_total`` minus the answers the clients received is the
   work the server finished for clients that had left (with cancellation: near 0), with
   ``ragline_requests_cancelled_total`` the requests it stopped.

The client shares the 2 cores with the server, which lowers every number a little; the report says so.
Writes ``benchmarks/results/overload.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from _common import DATA, RESULTS, clean_env, free_port, process, wait_http
from scale import LUA, wrk  # the same wrk script and output parsing as the scale benchmark


async def one(port: int, body: bytes, timeout: float) -> tuple[int, float, bool]:
    """(status, seconds, had Retry-After) of one POST /v1/query on its own connection; status 0: gave up."""
    t0 = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            await reader.read()
            return status, time.perf_counter() - t0, b"\r\nretry-after:" in head.lower()
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return 0, time.perf_counter() - t0, False
    finally:
        if writer is not None:
            writer.close()


async def open_loop(port: int, bodies: list[bytes], rate: float, seconds: float, timeout: float) -> list[Any]:
    rng = random.Random(7)
    tasks: list[asyncio.Task[tuple[int, float, bool]]] = []
    t_end = time.perf_counter() + seconds
    i = 0
    next_t = time.perf_counter()
    while next_t < t_end:
        delay = next_t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(port, bodies[i % len(bodies)], timeout)))
        i += 1
        next_t += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def run(a: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        sys.exit("needs wrk (Debian package; scripts/test.sh installs it)")
    queries = [orjson.loads(x)["text"] for x in (DATA / "scifact" / "queries.jsonl").read_bytes().splitlines()]
    docs = [orjson.loads(x) for x in (DATA / "scifact" / "corpus.jsonl").read_bytes().splitlines()][: a.docs]
    bodies = [orjson.dumps({"query": q, "cache": "bypass"}) for q in queries]
    report: dict[str, Any] = {"docs": a.docs, "duration_s": a.duration, "factor": a.factor}
    with tempfile.TemporaryDirectory(prefix="ragline-overload-") as t:
        tmp = Path(t)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = clean_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAGLINE_DATA_DIR=str(tmp / "data"))
        cmd = [sys.executable, "-m", "ragline.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        with process(cmd, env, tmp / "serve.log") as proc:
            wait_http(url, proc, tmp / "serve.log", path="/readyz", timeout_s=300)
            with httpx.Client(base_url=url, timeout=120) as c:
                for i in range(0, len(docs), 50):
                    part = [{"id": d["_id"], "title": d.get("title", ""), "text": d["text"]} for d in docs[i : i + 50]]
                    c.post("/v1/documents", json={"documents": part}).raise_for_status()
            (tmp / "bodies.jsonl").write_text("".join(b.decode() + "\n" for b in bodies))
            script = tmp / "q.lua"
            script.write_text(LUA % (tmp / "bodies.jsonl"))
            with httpx.Client(base_url=url, timeout=120) as c:  # every query embedded once: the phases below
                for b in bodies:  # then all do the same work (answer cache bypassed, embeddings cached)
                    c.post("/v1/query", content=b, headers={"content-type": "application/json"}).raise_for_status()
            cap = {str(c): wrk(url, script, 10, c) for c in (4, 8)}
            capacity = max(r["rps"] for r in cap.values())
            unloaded = wrk(url, script, 10, 1)
            report["capacity"] = {"per_connections": cap, "rps": capacity}
            report["unloaded"] = unloaded
            rate = a.factor * capacity
            print(f"capacity {capacity:.1f} req/s, unloaded p99 {unloaded['p99_ms']} ms; offering {rate:.0f} req/s")
            res = asyncio.run(open_loop(port, bodies, rate, a.duration, 10.0))
            ok = [s for st, s, _ in res if st == 200]
            refused = [(s, ra) for st, s, ra in res if st in (429, 503)]
            statuses: dict[str, int] = {}
            for st, _, _ in res:
                statuses[str(st)] = statuses.get(str(st), 0) + 1
            report["overload"] = {
                "offered_rps": round(rate, 1),
                "sent": len(res),
                "statuses": statuses,
                "goodput_rps": round(len(ok) / a.duration, 2),
                "goodput_over_capacity": round(len(ok) / a.duration / capacity, 3),
                "admitted_p50_ms": pct(ok, 0.50),
                "admitted_p99_ms": pct(ok, 0.99),
                "admitted_p99_over_unloaded_p99": round(pct(ok, 0.99) / unloaded["p99_ms"], 2),
                "refused_p50_ms": pct([s for s, _ in refused], 0.50),
                "refused_p99_ms": pct([s for s, _ in refused], 0.99),
                "refused_with_retry_after": sum(1 for _, ra in refused if ra),
                "refused": len(refused),
            }
            print("overload", report["overload"])
            time.sleep(2)
            answers0 = metric(url, "ragline_answers_total")
            cancelled0 = metric(url, "ragline_requests_cancelled_total")
            res = asyncio.run(open_loop(port, bodies, rate, a.duration, 1.0))
            received = sum(1 for st, _, _ in res if st == 200)
            time.sleep(3)  # whatever the server still finishes, it finishes now
            finished = metric(url, "ragline_answers_total") - answers0
            report["abandoned"] = {
                "client_timeout_s": 1.0,
                "sent": len(res),
                "answers_received": received,
                "gave_up": sum(1 for st, _, _ in res if st == 0),
                "answers_the_server_finished": finished,
                "work_done_after_disconnect": finished - received,
                "requests_cancelled": metric(url, "ragline_requests_cancelled_total") - cancelled0,
            }
            print("abandoned", report["abandoned"])
    report["note"] = "client and server share 2 cores; the open-loop client opens one connection per request"
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--out", default="overload.json")
    a = ap.parse_args()
    t0 = time.time()
    report = run(a)
    report["wall_s"] = round(time.time() - t0, 1)
    (RESULTS / a.out).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {RESULTS / a.out}")


if __name__ == "__main__":
    main()
