"""The hot-path benchmark's HTTP throughput measured with ``wrk`` (split from hotpath.py).

Three targets, each served with the same number of workers, driven by the same ``wrk`` command
(one thread, ``connections`` connections, ``duration_s`` seconds, ``--latency``) in interleaved
rounds (the order rotates each round, so no target always runs first or last):

* ``hello``: a bare FastAPI hello-world app (:mod:`_hello`) on uvicorn (``--no-access-log``);
* ``healthz``: ragline's own ``GET /healthz`` (the same ``ragline serve`` as below);
* ``query_hit``: ragline's ``POST /v1/query``, a Lua script cycling over queries answered before
  (every one an exact hit; counted on the server through ``ragline_answers_total``).

wrk is a C load generator: unlike a Python client it does not saturate before the servers do on
two cores.  Reported: req/s and p99 medians over the rounds, and the ratios query/hello and
query/healthz (median of per-round ratios, and of the medians).
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from _common import HERE, clean_env, free_port, process, wait_http
from _common import WRK_QUERY_LUA as LUA

TARGET_VS_HELLO = 1.0
TARGET_VS_HEALTHZ = 0.85
TARGETS = ("hello", "healthz", "query_hit")


def available() -> bool:
    return shutil.which("wrk") is not None


def version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0].strip()


def run_wrk(
    url: str, *, threads: int, connections: int, duration_s: int, script: Path | None = None
) -> dict[str, float]:
    """One wrk run; req/s, p50/p99 (ms), requests, non-2xx and socket errors."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", url]
    if script is not None:
        cmd[1:1] = ["-s", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")

    def ms(label: str) -> float:
        hit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if hit is None:
            return float("nan")
        v, unit = float(hit.group(1)), hit.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    n = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(m.group(1)),
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "requests": float(n.group(1)) if n else float("nan"),
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": float(sum(int(x) for x in sock.groups())) if sock else 0.0,
    }


def _exact_answers(url: str) -> float:
    """``ragline_answers_total{outcome="exact"}`` summed over the workers (multiprocess metrics)."""
    text = httpx.get(url + "/metrics", timeout=30, trust_env=False).text
    return sum(float(v) for v in re.findall(r'^ragline_answers_total\{outcome="exact"\} ([\d.e+]+)$', text, re.M))


def measure(
    ragline_url: str,
    bodies_file: Path,
    tmp: Path,
    *,
    workers: int,
    rounds: int,
    connections: int,
    duration_s: int,
    threads: int = 1,
    warmup_s: int = 2,
    granian_url: str | None = None,
) -> dict[str, Any]:
    """Start the hello-world app next to the running ragline server and run the interleaved rounds
    (with ``granian_url``, the same ragline app served by granian is measured in the same rounds)."""
    script = tmp / "query_hit.lua"
    script.write_text(LUA % bodies_file)
    port = free_port()
    hello_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "uvicorn", "_hello:app", "--app-dir", str(HERE), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    targets: dict[str, tuple[str, Path | None]] = {
        "hello": (hello_url + "/", None),
        "healthz": (ragline_url + "/healthz", None),
        "query_hit": (ragline_url + "/v1/query", script),
    }
    if granian_url is not None:
        targets["granian_healthz"] = (granian_url + "/healthz", None)
        targets["granian_query_hit"] = (granian_url + "/v1/query", script)
    how = f"{version()} -t{threads} -c{connections} -d{duration_s}s --latency"
    runs: list[dict[str, Any]] = []
    with process(cmd, clean_env(), tmp / "hello.log") as proc:
        wait_http(hello_url, proc, tmp / "hello.log", path="/", timeout_s=60)
        for u, s in targets.values():  # unrecorded: connections, JIT-free caches, both workers' L1
            run_wrk(u, threads=threads, connections=connections, duration_s=warmup_s, script=s)
        names = list(targets)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                u, s = targets[name]
                base = u.removesuffix("/v1/query")
                before = _exact_answers(base) if s is not None else 0.0
                res: dict[str, Any] = run_wrk(
                    u, threads=threads, connections=connections, duration_s=duration_s, script=s
                )
                if s is not None:
                    res["exact_answers"] = _exact_answers(base) - before
                res.update(round=r, target=name, load_generator=how)
                runs.append(res)
                print(
                    f"  round {r} {name:<17} {res['rps']:>8.0f} req/s  p50 {res['p50_ms']:>6.2f} ms  "
                    f"p99 {res['p99_ms']:>6.2f} ms  non-2xx {res['non_2xx']:.0f}  (wrk)",
                    flush=True,
                )
    return summarise(runs, how, workers)


def summarise(runs: list[dict[str, Any]], how: str, workers: int) -> dict[str, Any]:
    def med(target: str, field: str) -> float:
        return round(statistics.median(float(r[field]) for r in runs if r["target"] == target), 3)

    out: dict[str, Any] = {"load_generator": how, "workers": workers}
    for t in TARGETS:
        out[t] = {f: med(t, f) for f in ("rps", "p50_ms", "p99_ms")}
        out[t]["non_2xx"] = sum(r["non_2xx"] for r in runs if r["target"] == t)
        out[t]["socket_errors"] = sum(r["socket_errors"] for r in runs if r["target"] == t)
    q = [r for r in runs if r["target"] == "query_hit"]
    out["query_hit"]["exact_answers"] = f"{sum(r['exact_answers'] for r in q):.0f}/{sum(r['requests'] for r in q):.0f}"
    for base, target in (("hello", TARGET_VS_HELLO), ("healthz", TARGET_VS_HEALTHZ)):
        per_round = []
        for r in sorted({x["round"] for x in runs}):
            b = next(x for x in runs if x["round"] == r and x["target"] == base)
            qq = next(x for x in runs if x["round"] == r and x["target"] == "query_hit")
            per_round.append(round(qq["rps"] / max(b["rps"], 1e-9), 3))
        out[f"ratio_vs_{base}"] = round(statistics.median(per_round), 3)
        out[f"ratio_vs_{base}_per_round"] = per_round
        out[f"ratio_vs_{base}_of_medians"] = round(out["query_hit"]["rps"] / max(out[base]["rps"], 1e-9), 3)
        out[f"target_vs_{base}"] = target
    if any(r["target"] == "granian_query_hit" for r in runs):
        g: dict[str, Any] = {"server": "granian (ASGI, 2 workers, uvloop), the same ragline app and data dir"}
        for t in ("granian_healthz", "granian_query_hit"):
            g[t] = {f: med(t, f) for f in ("rps", "p50_ms", "p99_ms")}
            g[t]["non_2xx"] = sum(r["non_2xx"] for r in runs if r["target"] == t)
        gq = [r for r in runs if r["target"] == "granian_query_hit"]
        g["granian_query_hit"]["exact_answers"] = (
            f"{sum(r['exact_answers'] for r in gq):.0f}/{sum(r['requests'] for r in gq):.0f}"
        )
        g["query_hit_granian_over_uvicorn"] = round(g["granian_query_hit"]["rps"] / out["query_hit"]["rps"], 3)
        g["healthz_granian_over_uvicorn"] = round(g["granian_healthz"]["rps"] / out["healthz"]["rps"], 3)
        out["granian"] = g
    out["runs"] = runs
    return out


def print_summary(w: dict[str, Any]) -> None:
    rounds = len(w["ratio_vs_hello_per_round"])
    print(f"\n(b) HTTP, {w['workers']} workers each, {w['load_generator']} (medians of {rounds} interleaved rounds)")
    print(f"    {'target':<34}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    labels = {
        "hello": "bare FastAPI hello world (uvicorn)",
        "healthz": "ragline GET /healthz",
        "query_hit": "ragline POST /v1/query exact hit",
    }
    for t, label in labels.items():
        r = w[t]
        print(f"    {label:<34}{r['rps']:>8.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}")
    print(
        f"    exact hit / hello world: {w['ratio_vs_hello']} (rounds {w['ratio_vs_hello_per_round']}; "
        f"target ≥ {TARGET_VS_HELLO});  exact hit / healthz: {w['ratio_vs_healthz']} "
        f"(rounds {w['ratio_vs_healthz_per_round']}; target ≥ {TARGET_VS_HEALTHZ});  "
        f"exact answers {w['query_hit']['exact_answers']}"
    )
    g = w.get("granian")
    if g is not None:
        print(
            f"    granian, same app: healthz {g['granian_healthz']['rps']:.0f} req/s "
            f"(×{g['healthz_granian_over_uvicorn']} of uvicorn), exact hit {g['granian_query_hit']['rps']:.0f} req/s "
            f"p99 {g['granian_query_hit']['p99_ms']:.2f} ms (×{g['query_hit_granian_over_uvicorn']} of uvicorn)"
        )
