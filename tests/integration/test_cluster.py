"""Two ragline instances behind Debian nginx, sharing a real redis-server (L2, bus, single-flight)
and PostgreSQL + pgvector from pgserver (the corpus): one service (DESIGN.md §6, issue 8).

nginx runs deploy/nginx/ragline.conf itself, with only the upstream servers, the listen port and
the temp paths pointed at this test's processes and folders.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "ragline.conf"
Q = "When did the Eiffel Tower open?"
DOCS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital of France. The Eiffel Tower opened in 1889."},
    {"id": "cats", "title": "Cats", "text": "Domestic cats sleep for sixteen hours a day and purr when content."},
    {"id": "tea", "title": "Tea", "text": "Green tea contains caffeine and antioxidants called catechins."},
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self.fh = log.open("wb")
        self.p = subprocess.Popen(cmd, env=env, stdout=self.fh, stderr=subprocess.STDOUT)

    def died(self) -> str | None:
        if self.p.poll() is None:
            return None
        return f"{self.name} exited with status {self.p.returncode}:\n{self.log.read_text()[-3000:]}"

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.fh.close()


def _wait_ready(url: str, procs: list[Proc], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if (why := p.died()) is not None:
                pytest.fail(why)
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not ready after {timeout} s")
        time.sleep(0.3)


def _nginx_conf(ports: list[int], listen: int, tmp: Path) -> str:
    conf = DEPLOY_CONF.read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=2 fail_timeout=5s;\n" for p in ports)
    conf, n = re.subn(r"(?m)^\s*server ragline-\d:8080[^\n]*\n", "", conf)
    assert n == 3, "deploy/nginx/ragline.conf changed shape: update this test"
    conf = conf.replace("        least_conn;\n", "        least_conn;\n" + servers)
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    return conf.replace("/tmp/ragline-nginx", str(tmp / "nginx"))


@pytest.fixture
def cluster(tmp_path: Path, pg_dsn: str, redis_url: str) -> Iterator[dict[str, Any]]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(nginx), "nginx is missing: scripts/test.sh installs the Debian package nginx-light"
    ports = [_free_port(), _free_port()]
    exe = str(Path(sys.executable).parent / "ragline")
    procs: list[Proc] = []
    try:
        for i, port in enumerate(ports):
            env = {
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "RAGLINE_DATA_DIR": str(tmp_path / f"node{i}"),
                "RAGLINE_STORE": "postgres",
                "RAGLINE_POSTGRES_DSN": pg_dsn,
                "RAGLINE_CACHE__REDIS_URL": redis_url,  # running and empty (a fault test may have stopped it)
                "RAGLINE_CACHE__SEMANTIC": "false",
            }
            cmd = [exe, "serve", "--host", "127.0.0.1", "--port", str(port)]
            procs.append(Proc(f"ragline-{i}", cmd, env, tmp_path / f"node{i}.log"))
        for port in ports:
            _wait_ready(f"http://127.0.0.1:{port}", procs)
        listen = _free_port()
        (tmp_path / "nginx").mkdir()
        conf = tmp_path / "nginx.conf"
        conf.write_text(_nginx_conf(ports, listen, tmp_path))
        cmd = [nginx, "-p", str(tmp_path / "nginx"), "-c", str(conf), "-e", str(tmp_path / "nginx-error.log"),
               "-g", "daemon off;"]  # fmt: skip
        procs.append(Proc("nginx", cmd, dict(os.environ), tmp_path / "nginx.log"))
        _wait_ready(f"http://127.0.0.1:{listen}", procs, timeout=20)
        yield {"lb": f"http://127.0.0.1:{listen}", "nodes": [f"http://127.0.0.1:{p}" for p in ports], "procs": procs}
    finally:
        for p in reversed(procs):
            p.stop()


def _post(url: str, path: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=timeout, headers={"connection": "close"})


def _sources(r: httpx.Response) -> set[tuple[str, str]]:
    assert r.status_code == 200, r.text
    return {(s["chunk_id"], s["text"]) for s in r.json()["sources"]}


def test_two_instances_behind_nginx_are_one_service(cluster: dict[str, Any]) -> None:
    lb, (a, b) = cluster["lb"], cluster["nodes"]
    assert _post(lb, "/v1/documents", {"documents": DOCS}).status_code == 200  # through the balancer
    for node in (a, b):  # every instance retrieves the new documents at once
        hits = _post(node, "/v1/search", {"query": "Eiffel Tower", "cache": "bypass"}).json()["hits"]
        assert hits and hits[0]["doc_id"] == "paris", node
    # an answer computed while an instance hears of a change is not cached (it may predate the change):
    # ask until A has cached it (the first time, unless the ingest's notification was still on its way)
    deadline = time.monotonic() + 5
    while _post(a, "/v1/query", {"query": Q}).json()["cache"]["kind"] != "exact":
        assert time.monotonic() < deadline, "A never cached the answer"
        time.sleep(0.1)
    on_b = _post(b, "/v1/query", {"query": Q}).json()
    assert on_b["cache"]["kind"] == "exact" and on_b["cache"]["tier"] == "l2"  # cached on A, served by B
    assert _post(a, "/v1/query", {"query": Q}).json()["cache"]["tier"] == "l1"  # A holds an L1 copy
    update = {"documents": [{"id": "paris", "title": "Paris", "text": "The Eiffel Tower opened in March 1889."}]}
    assert _post(b, "/v1/documents", update).status_code == 200  # an update through B ...
    deadline = time.monotonic() + 3
    while True:  # ... reaches A's L1 (pub/sub and A's change feed: milliseconds)
        served, fresh = _post(a, "/v1/query", {"query": Q}), _post(a, "/v1/query", {"query": Q, "cache": "bypass"})
        if _sources(served) == _sources(fresh):
            break
        assert time.monotonic() < deadline, "A kept serving the answer B's update invalidated"
        time.sleep(0.05)
    assert any("March" in t for _, t in _sources(served))


def test_killing_an_instance_loses_no_acknowledged_write(cluster: dict[str, Any]) -> None:
    lb, procs = cluster["lb"], cluster["procs"]
    assert _post(lb, "/v1/documents", {"documents": DOCS}).status_code == 200
    acked: list[str] = []
    failures: list[tuple[float, str]] = []
    stop = threading.Event()
    killed_at: list[float] = []

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 400:
            doc = {"id": f"w{i}", "text": f"Write number {i} about owls and bees."}
            try:
                r = _post(lb, "/v1/documents", {"documents": [doc]}, timeout=10)
                if r.status_code == 200:
                    acked.append(doc["id"])
                else:
                    failures.append((time.monotonic(), f"write {r.status_code}"))
            except httpx.HTTPError as exc:
                failures.append((time.monotonic(), f"write {type(exc).__name__}"))
            i += 1

    def reader(_: int) -> None:
        while not stop.is_set():
            try:
                r = _post(lb, "/v1/query", {"query": Q}, timeout=10)
                if r.status_code != 200:
                    failures.append((time.monotonic(), f"read {r.status_code}"))
            except httpx.HTTPError as exc:
                failures.append((time.monotonic(), f"read {type(exc).__name__}"))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(writer), *(pool.submit(reader, i) for i in range(3))]
        time.sleep(3)
        procs[0].p.send_signal(signal.SIGKILL)  # instance A dies mid-load
        killed_at.append(time.monotonic())
        time.sleep(6)
        stop.set()
        for f in futures:
            f.result()
    after = [f for t, f in failures if t > killed_at[0] + 1.0]
    print(f"\n{len(acked)} writes acknowledged; {len(failures)} failed requests, {len(after)} > 1 s after the kill")
    assert len(acked) >= 20 and not after, failures
    listed = httpx.get(lb + "/v1/documents", params={"limit": 1000}, timeout=30).json()["ids"]
    assert set(acked) <= set(listed)  # no acknowledged write is lost
