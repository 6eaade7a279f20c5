"""Hot reload against a real ``ragline serve`` (uvicorn, MiniLM, L1 + L3 cache, the fake OpenAI upstream).

Under a bounded load (4 client threads for a few seconds on 127.0.0.1) the config file's LLM model is
flipped and the server reloaded by the admin endpoint and by SIGHUP, and once given an invalid config:
no request fails, every swap is under 100 ms, an invalid config is a 400 that changes nothing, and after
a reload to another model the same question is answered by that model, not from the old one's cache.
With ``--workers 2`` a SIGHUP to the master reloads every worker in place.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from ragline.testing import FakeUpstream
from tests.fixtures.serve import serve

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-key"}
DOCS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital of France. The Eiffel Tower opened in 1889."},
    {"id": "tea", "title": "Tea", "text": "Green tea contains caffeine and antioxidants called catechins."},
    {"id": "cats", "title": "Cats", "text": "Domestic cats sleep for sixteen hours a day and purr when content."},
]
QUESTIONS = ["When did the Eiffel Tower open?", "What does green tea contain?", "How long do cats sleep?"]


def config(path: Path, upstream: str, model: str, extra: str = "") -> None:
    text = (
        f"llm:\n  provider: openai\n  base_url: {upstream}\n  model: {model}\n"
        f"server:\n  admin_keys: [admin-key]\n{extra}cache:\n  redis_url: null\n"
    )
    path.with_suffix(".tmp").write_text(text)
    path.with_suffix(".tmp").replace(path)  # atomic: a reload never reads half a file


def server_pid(url: str) -> int:
    return int(httpx.get(url + "/v1/admin/reload", headers=ADMIN).json()["pid"])


def wait_generation(c: httpx.Client, n: int, timeout_s: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = c.get("/v1/admin/reload", headers=ADMIN).json()
        if st["generation"] >= n:
            return st  # type: ignore[no-any-return]
        time.sleep(0.1)
    pytest.fail(f"generation {n} not reached in {timeout_s} s")


def test_reload_under_load_fails_no_request_and_never_serves_the_old_models_answer(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    cfg = tmp_path / "ragline.yaml"
    config(cfg, fake_upstream.url, "model-a")
    with serve(tmp_path, {}, "--config", str(cfg)) as url, httpx.Client(base_url=url, timeout=60) as c:
        c.post("/v1/documents", json={"documents": DOCS}).raise_for_status()
        first = c.post("/v1/query", json={"query": QUESTIONS[0]}).json()
        assert (first["model"], first["cache"]["kind"]) == ("model-a", "miss")
        assert c.post("/v1/query", json={"query": QUESTIONS[0]}).json()["cache"]["kind"] == "exact"

        stop = threading.Event()
        done: list[int] = []
        failures: list[str] = []

        def client() -> None:
            with httpx.Client(base_url=url, timeout=30) as cc:
                i = 0
                while not stop.is_set():
                    try:
                        r = cc.post("/v1/query", json={"query": QUESTIONS[i % 3]})
                        if r.status_code != 200:
                            failures.append(f"{r.status_code}: {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    done.append(1)
                    i += 1

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        swaps: list[float] = []
        try:
            time.sleep(1)
            config(cfg, fake_upstream.url, "model-b")
            r = c.post("/v1/admin/reload", headers=ADMIN)
            assert r.status_code == 200, r.text
            rep = r.json()
            assert rep["changed"] == ["llm.model"] and rep["fingerprint"]["changed"] is True
            assert rep["reused"] == ["embedder", "store"]  # the model is not loaded again
            swaps.append(rep["swap_ms"])
            time.sleep(1)
            config(cfg, fake_upstream.url, "model-a")
            os.kill(server_pid(url), signal.SIGHUP)
            swaps.append(wait_generation(c, 3)["last"]["swap_ms"])  # type: ignore[index]
            time.sleep(1)
            cfg.write_text("llm:\n  temperature: 9\n")  # invalid: refused, the running pipeline stays
            bad = c.post("/v1/admin/reload", headers=ADMIN)
            assert bad.status_code == 400 and "llm.temperature" in bad.json()["error"]["message"]
            config(cfg, fake_upstream.url, "model-b")
            r = c.post("/v1/admin/reload", headers=ADMIN)
            assert r.status_code == 200 and r.json()["generation"] == 4
            swaps.append(r.json()["swap_ms"])
            time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert failures == [], failures[:5]
        assert len(done) > 20 and max(swaps) < 100, (len(done), swaps)
        # under model B now: the question model A answered (and cached) is answered by model B
        after = c.post("/v1/query", json={"query": QUESTIONS[1]}).json()
        assert after["model"] == "model-b"
        fresh = c.post("/v1/query", json={"query": "Which city is the capital of France?"}).json()
        assert (fresh["model"], fresh["cache"]["kind"]) == ("model-b", "miss")
        # a setting that needs a restart is reported, and the rest still applies
        config(cfg, fake_upstream.url, "model-a", extra="  port: 9\n")
        r = c.post("/v1/admin/reload", headers=ADMIN).json()
        assert r["restart_required"] == ["server.port"] and r["changed"] == ["llm.model"]
        back = c.post("/v1/query", json={"query": QUESTIONS[0]}).json()
        assert (back["model"], back["cache"]["kind"]) == ("model-a", "exact")  # model A's entry, same fingerprint


def test_sighup_to_the_workers_master_reloads_every_worker(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    cfg = tmp_path / "ragline.yaml"
    config(cfg, fake_upstream.url, "model-a")
    with serve(tmp_path, {}, "--config", str(cfg), "--workers", "2") as url, httpx.Client(base_url=url) as c:
        pids: set[int] = set()
        for _ in range(300):  # a new connection each time: the kernel spreads them over both workers
            pids.add(server_pid(url))
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids
        master = int(subprocess.check_output(["ps", "-o", "ppid=", "-p", str(next(iter(pids)))]).strip())
        config(cfg, fake_upstream.url, "model-b")
        os.kill(master, signal.SIGHUP)
        deadline = time.monotonic() + 90
        reloaded: dict[int, int] = {}
        while len(reloaded) < 2 and time.monotonic() < deadline:
            st = httpx.get(url + "/v1/admin/reload", headers=ADMIN).json()  # a new connection: either worker
            if st["generation"] == 2:
                reloaded[st["pid"]] = st["generation"]
            time.sleep(0.05)
        assert set(reloaded) == pids, "every worker reloads in place (same pids: no restart)"
        r = c.post("/v1/admin/reload", headers=ADMIN)  # several workers: the master is signalled, 202
        assert r.status_code == 202 and r.json()["reloaded"] == "signalled"
        cfg.write_text("llm:\n  temperature: 9\n")
        assert c.post("/v1/admin/reload", headers=ADMIN).status_code == 400  # checked before signalling
