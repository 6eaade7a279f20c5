"""Throughput with 1 and 2 ragline instances behind nginx, measured with wrk (issue 8).

    python benchmarks/scale.py [--docs 500] [--duration 10] [--connections 16] [--rounds 3]

Starts, on 127.0.0.1 only: a redis-server, PostgreSQL + pgvector (pgserver, in a temporary folder),
two ``ragline serve`` instances (store: postgres, shared Redis) and Debian nginx running
``deploy/nginx/ragline.conf`` (upstreams rewritten to the instances).  SciFact documents are
ingested through the balancer, then for each instance count (1: nginx points at one instance,
reloaded; 2: both) and each workload, ``wrk`` runs for ``--duration`` seconds:

* ``cached``: ``POST /v1/query`` cycling over 50 SciFact queries asked once before (exact hits);
* ``uncached``: the same queries with ``"cache": "bypass"`` (retrieval + the extractive answerer).

Rounds alternate 1 and 2 instances (same machine load for both); medians are reported with the
ratio 2/1.  wrk is the Debian package (a C load generator: a Python client saturates first).
Writes ``scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from _common import DATA, REPO, RESULTS, clean_env, free_port, process, wait_http
from _common import WRK_QUERY_LUA as LUA

CONF = REPO / "deploy" / "nginx" / "ragline.conf"


def nginx_conf(ports: list[int], listen: int, tmp: Path) -> str:
    conf = CONF.read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=2 fail_timeout=5s;\n" for p in ports)
    conf = re.sub(r"(?m)^\s*server ragline-\d:8080[^\n]*\n", "", conf)
    conf = conf.replace("        least_conn;\n", "        least_conn;\n" + servers)
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    return conf.replace("/tmp/ragline-nginx", str(tmp / "nginx"))


def wrk(url: str, script: Path, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps": rps, "p50_ms": ms("50"), "p99_ms": ms("99"), "non_2xx": float(non2xx.group(1)) if non2xx else 0.0}


@contextlib.contextmanager
def services(tmp: Path) -> Iterator[tuple[str, str]]:
    import pgserver

    redis_port = free_port()
    with process(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        clean_env(),
        tmp / "redis.log",
    ):
        srv = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
        try:
            yield f"redis://127.0.0.1:{redis_port}/0", srv.get_uri()
        finally:
            srv.cleanup()


def run(a: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None or (shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists()):
        sys.exit("needs wrk and nginx (Debian packages; scripts/test.sh installs them)")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    report: dict[str, Any] = {"docs": a.docs, "duration_s": a.duration, "connections": a.connections, "rounds": []}
    queries = [orjson.loads(x)["text"] for x in (DATA / "scifact" / "queries.jsonl").read_bytes().splitlines()][:50]
    docs = [orjson.loads(x) for x in (DATA / "scifact" / "corpus.jsonl").read_bytes().splitlines()][: a.docs]
    with tempfile.TemporaryDirectory(prefix="ragline-scale-") as t, services(Path(t)) as (redis_url, dsn):
        tmp = Path(t)
        ports = [free_port(), free_port()]
        with contextlib.ExitStack() as stack:
            for i, port in enumerate(ports):
                env = clean_env(
                    HF_HUB_OFFLINE="1",
                    RAGLINE_DATA_DIR=str(tmp / f"node{i}"),
                    RAGLINE_STORE="postgres",
                    RAGLINE_POSTGRES_DSN=dsn,
                    RAGLINE_CACHE__REDIS_URL=redis_url,
                )
                cmd = [sys.executable, "-m", "ragline.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
                proc = stack.enter_context(process(cmd, env, tmp / f"node{i}.log"))
                wait_http(f"http://127.0.0.1:{port}", proc, tmp / f"node{i}.log", path="/readyz", timeout_s=300)
            listen = free_port()
            (tmp / "nginx").mkdir()
            conf = tmp / "nginx.conf"
            lb = f"http://127.0.0.1:{listen}"

            def point(n: int) -> None:
                conf.write_text(nginx_conf(ports[:n], listen, tmp))

            point(2)
            ng = [nginx, "-p", str(tmp / "nginx"), "-c", str(conf), "-e", str(tmp / "nginx.err"), "-g", "daemon off;"]
            nproc = stack.enter_context(process(ng, clean_env(), tmp / "nginx.log"))
            wait_http(lb, nproc, tmp / "nginx.log", path="/healthz", timeout_s=20)
            with httpx.Client(base_url=lb, timeout=120) as c:
                for i in range(0, len(docs), 50):
                    part = [{"id": d["_id"], "title": d.get("title", ""), "text": d["text"]} for d in docs[i : i + 50]]
                    c.post("/v1/documents", json={"documents": part}).raise_for_status()
                for q in queries:  # every cached query asked once: from now on exact hits
                    c.post("/v1/query", json={"query": q}).raise_for_status()
            scripts = {}
            for name, extra in (("cached", {}), ("uncached", {"cache": "bypass"})):
                bodies = tmp / f"{name}.jsonl"
                bodies.write_text("".join(orjson.dumps({"query": q, **extra}).decode() + "\n" for q in queries))
                (tmp / f"{name}.lua").write_text(LUA % bodies)
                scripts[name] = tmp / f"{name}.lua"
            for r in range(a.rounds):
                for n in (1, 2):
                    point(n)
                    subprocess.run([nginx, "-p", str(tmp / "nginx"), "-c", str(conf), "-s", "reload"], check=True)
                    time.sleep(1.0)
                    for name, script in scripts.items():
                        res = wrk(lb, script, a.duration, a.connections)
                        report["rounds"].append({"round": r, "instances": n, "workload": name, **res})
                        print(f"round {r} instances {n} {name}: {res}", flush=True)
    summary: dict[str, Any] = {}
    for name in ("cached", "uncached"):
        med = {
            n: {
                k: statistics.median(x[k] for x in report["rounds"] if x["instances"] == n and x["workload"] == name)
                for k in ("rps", "p50_ms", "p99_ms", "non_2xx")
            }
            for n in (1, 2)
        }
        summary[name] = {
            "1_instance": med[1],
            "2_instances": med[2],
            "ratio_2_over_1": round(med[2]["rps"] / med[1]["rps"], 3),
        }
    report["summary"] = summary
    report["machine_note"] = (
        "2 cores shared by nginx, wrk (2 threads), redis, PostgreSQL and both instances: a second instance adds "
        "no cores, so the ratio shows the overhead of sharing them, not scale-out"
    )
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    report = run(a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scale.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(report["summary"], option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
