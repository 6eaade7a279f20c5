"""Hot reload under load: failed requests, swap time, and no answer from the old model's cache.

    python benchmarks/hot_reload.py [--data ../shared/data/scifact] [--docs 100] [--queries 50] [--rounds 3]
                                    [--duration 8] [--connections 4] [--interval 1.0] [--workers 1]

One ``ragline serve`` on 127.0.0.1 (real MiniLM embedder, L1 + L3 cache) answers with the fake
OpenAI-compatible upstream (:mod:`ragline.testing.fake_upstream`) as its LLM, over ``--docs`` SciFact
documents; ``wrk`` (a C client) sends ``POST /v1/query`` for ``--queries`` SciFact questions over
``--connections`` connections.  Interleaved rounds of ``--duration`` seconds each:

* baseline: no reload;
* reload: every ``--interval`` s the config file's ``llm.model`` flips between two model names and the
  server is told to reload, alternately by ``POST /v1/admin/reload`` and by SIGHUP (with ``--workers
  N`` both go through the master, which forwards SIGHUP to each worker).

Reported per mode: requests, failed requests (non-2xx + socket errors), latency p50/p99/max; per reload
the server's ``swap_ms`` (the assignment that stops routing to the old pipeline and starts routing to the
new one) and ``build_ms`` (the new pipeline built off to the side).  Then a cache check on a question outside
the load, asked twice under model A (a miss, then cached): after a reload to model B it is answered by model
B (a miss, not model A's cached answer), and after a reload back to model A, A's cached answer is served
again (same fingerprint).  Writes ``hot_reload.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from _common import DATA, RESULTS, clean_env, free_port, load_beir, process, wait_http
from _common import WRK_QUERY_LUA as LUA

from ragline.config import Settings
from ragline.ingest.loaders import iter_documents
from ragline.testing import FakeUpstream

ADMIN = "bench-admin-key"
MODELS = ("model-a", "model-b")


def write_config(path: Path, data_dir: Path, upstream: str, model: str) -> None:
    """The YAML the server starts from and reloads (atomically replaced: a reload never reads half a file)."""
    text = (
        f"data_dir: {data_dir}\n"
        f"llm:\n  provider: openai\n  base_url: {upstream}\n  model: {model}\n"
        f"server:\n  admin_keys: [{ADMIN}]\n"
        "cache:\n  redis_url: null\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def wrk(url: str, script: Path, duration: float, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    ).stdout

    def ms(text: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
        if m is None:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    def pct(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+(\S+)\s*$", out, re.M)
        return ms(m.group(1)) if m else float("nan")

    lat = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(x) for x in sock.groups()) if sock else 0
    return {
        "requests": float(total.group(1)) if total else 0.0,
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": float(errors),
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "max_ms": ms(lat.group(3)) if lat else float("nan"),
    }


class Reloader(threading.Thread):
    """Flips the model and reloads every ``interval`` s until stopped; keeps each reload's report."""

    def __init__(self, url: str, pid: int, cfg: Path, data_dir: Path, upstream: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.pid, self.cfg, self.data_dir, self.upstream = url, pid, cfg, data_dir, upstream
        self.interval = interval
        self.stop = threading.Event()
        self.reports: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.flips = 0

    def run(self) -> None:
        h = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as c:
            while not self.stop.wait(self.interval):
                self.flips += 1
                write_config(self.cfg, self.data_dir, self.upstream, MODELS[self.flips % 2])
                before = c.get("/v1/admin/reload", headers=h).json()["generation"]
                if self.flips % 2:
                    r = c.post("/v1/admin/reload", headers=h)
                    if r.status_code not in (200, 202):
                        self.errors.append(f"reload {r.status_code}: {r.text[:200]}")
                        continue
                else:
                    os.kill(self.pid, signal.SIGHUP)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # the report of this reload (SIGHUP answers nothing)
                    st = c.get("/v1/admin/reload", headers=h).json()
                    if st["generation"] > before and st["last"]:
                        self.reports.append(st["last"])
                        break
                    time.sleep(0.05)
                else:
                    self.errors.append("a reload did not finish within 30 s")


def ask(c: httpx.Client, q: str) -> dict[str, Any]:
    r = c.post("/v1/query", json={"query": q})
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def reload_to(c: httpx.Client, cfg: Path, data_dir: Path, upstream: str, model: str) -> dict[str, Any]:
    write_config(cfg, data_dir, upstream, model)
    r = c.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        sys.exit("needs wrk (Debian package)")
    queries, qrels = load_beir(a.data)
    keep = {d for q in list(queries)[: a.queries] for d in qrels[q]}
    docs = [d for d in iter_documents([a.data / "corpus.jsonl"], Settings().limits) if d.id in keep]
    docs += [d for d in iter_documents([a.data / "corpus.jsonl"], Settings().limits) if d.id not in keep][
        : max(0, a.docs - len(docs))
    ]
    questions = list(queries.values())[: a.queries]
    extra = list(queries.values())[a.queries]  # never in the load: its only answers are the check's
    with tempfile.TemporaryDirectory(prefix="ragline-reload-") as tmp_s, FakeUpstream() as fake:
        tmp = Path(tmp_s)
        cfg, data_dir = tmp / "ragline.yaml", tmp / "data"
        write_config(cfg, data_dir, fake.url, MODELS[0])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        script = tmp / "query.lua"
        bodies = tmp / "bodies.jsonl"
        bodies.write_bytes(b"\n".join(orjson.dumps({"query": q}) for q in questions) + b"\n")
        script.write_text(LUA % bodies)
        cmd = [sys.executable, "-m", "ragline.cli", "serve", "--config", str(cfg), "--port", str(port),
               "--workers", str(a.workers)]  # fmt: skip
        env = clean_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        log = tmp / "serve.log"
        with process(cmd, env, log) as proc:
            wait_http(url, proc, log, path="/readyz", timeout_s=300)
            with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
                payload = [{"id": d.id, "text": d.text, "title": d.title} for d in docs]
                for i in range(0, len(payload), 50):
                    c.post("/v1/documents", json={"documents": payload[i : i + 50]}).raise_for_status()
                for q in questions:  # warm: every question cached under model A
                    ask(c, q)
                rounds: dict[str, list[dict[str, float]]] = {"baseline": [], "reload": []}
                reports: list[dict[str, Any]] = []
                errors: list[str] = []
                for r in range(a.rounds):
                    for mode in ("baseline", "reload") if r % 2 == 0 else ("reload", "baseline"):
                        reloader = None
                        if mode == "reload":
                            reloader = Reloader(url, proc.pid, cfg, data_dir, fake.url, a.interval)
                            reloader.start()
                        res = wrk(url, script, a.duration, a.connections)
                        if reloader is not None:
                            reloader.stop.set()
                            reloader.join(60)
                            reports += reloader.reports
                            errors += reloader.errors
                            res["reloads"] = float(len(reloader.reports))
                        rounds[mode].append(res)
                        print(f"round {r} {mode}: {res}", flush=True)
                    write_config(cfg, data_dir, fake.url, MODELS[0])
                    reload_to(c, cfg, data_dir, fake.url, MODELS[0])
                # the cache check, on a question outside the load (so model B never answered it), cached under A
                q = extra
                a0, a0b = ask(c, q), ask(c, q)
                rb = reload_to(c, cfg, data_dir, fake.url, MODELS[1])
                b1, b2 = ask(c, q), ask(c, q)
                ra = reload_to(c, cfg, data_dir, fake.url, MODELS[0])
                a1 = ask(c, q)
                cache_check = {
                    "before": [a0["model"], a0["cache"]["kind"], a0b["cache"]["kind"]],
                    "after_reload_to_b": [b1["model"], b1["cache"]["kind"]],
                    "b_again": [b2["model"], b2["cache"]["kind"]],
                    "after_reload_back_to_a": [a1["model"], a1["cache"]["kind"]],
                    "fingerprint_changed": [rb["fingerprint"]["changed"], ra["fingerprint"]["changed"]],
                }
    swaps = [r["swap_ms"] for r in reports]
    builds = [r["build_ms"] for r in reports]

    def total(mode: str, key: str) -> float:
        return sum(x[key] for x in rounds[mode])

    def med(mode: str, key: str) -> float:
        return round(statistics.median(x[key] for x in rounds[mode]), 3)

    report: dict[str, Any] = {
        "dataset": str(a.data),
        "documents": len(docs),
        "queries": len(questions),
        "workers": a.workers,
        "connections": a.connections,
        "duration_s": a.duration,
        "rounds": rounds,
        "summary": {
            mode: {
                "requests": total(mode, "requests"),
                "failed": total(mode, "non_2xx") + total(mode, "socket_errors"),
                "p50_ms_median": med(mode, "p50_ms"),
                "p99_ms_median": med(mode, "p99_ms"),
                "max_ms_max": max(x["max_ms"] for x in rounds[mode]),
            }
            for mode in rounds
        },
        "reloads": len(reports),
        "reload_errors": errors,
        "swap_ms": {"median": statistics.median(swaps), "max": max(swaps)} if swaps else None,
        "build_ms": {"median": statistics.median(builds), "max": max(builds)} if builds else None,
        "cache_check": cache_check,
    }
    s = report["summary"]
    report["checks"] = {
        "zero_failed_requests_under_reload": s["reload"]["failed"] == 0 and not errors,
        "swap_under_100_ms": bool(swaps) and max(swaps) < 100,
        "cached_under_a_first": cache_check["before"] == [MODELS[0], "miss", "exact"],
        "new_model_not_served_from_old_cache": cache_check["after_reload_to_b"] == [MODELS[1], "miss"],
        "old_model_cache_back_with_old_settings": cache_check["after_reload_back_to_a"][0] == MODELS[0]
        and cache_check["after_reload_back_to_a"][1] == "exact",
    }
    a.out.mkdir(parents=True, exist_ok=True)
    name = "hot_reload.json" if a.workers == 1 else f"hot_reload_workers{a.workers}.json"
    (a.out / name).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(orjson.dumps({k: report[k] for k in ("summary", "reloads", "swap_ms", "build_ms", "cache_check", "checks")},
                       option=orjson.OPT_INDENT_2).decode())  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Hot reload under a bounded wrk load on 127.0.0.1.")
    ap.add_argument("--data", type=Path, default=DATA / "scifact")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved baseline/reload rounds")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of wrk per round and mode")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between reloads")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    a.data = a.data.resolve()
    run(a)


if __name__ == "__main__":
    main()
