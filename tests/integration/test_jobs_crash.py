"""kill -9 during background jobs and direct ingests (issue 10, evidence item 5).

A real ``ragline serve`` (real model) runs a job while a client ingests documents one request at a
time; the server is killed with SIGKILL twice, mid-job, and restarted on the same data dir.  After
each restart: every document whose direct ingest was acknowledged (200) is there, every acknowledged
job (202) is there, and the interrupted job is resumed where it stopped; in the end it has succeeded
with all its documents, and no job is left ``running``.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.serve import free_port

pytestmark = pytest.mark.slow

KEYS = '{"key-a": "tenant-a", "key-b": "tenant-b"}'
A = {"authorization": "Bearer key-a"}
B = {"authorization": "Bearer key-b"}


@contextlib.contextmanager
def server(tmp: Path, n: int) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``ragline serve`` on the shared data dir; yields (url, process); the test may SIGKILL it."""
    port = free_port()
    log = (tmp / f"serve-{n}.log").open("wb")
    env = {
        **os.environ,
        "RAGLINE_DATA_DIR": str(tmp / "data"),
        "HF_HUB_OFFLINE": "1",
        "RAGLINE_SERVER__API_KEYS": KEYS,
        "RAGLINE_JOBS__BATCH_DOCUMENTS": "4",
        "RAGLINE_JOBS__POLL_S": "0.2",
    }
    cmd = [str(Path(sys.executable).parent / "ragline"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp / f"serve-{n}.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        log.close()


def synthetic(prefix: str, n: int, words: int) -> list[dict[str, str]]:
    rng = random.Random(prefix)
    vocab = [f"{rng.choice('bcdfgklmnprst')}{rng.choice('aeiou')}{i}" for i in range(2000)]
    return [{"id": f"{prefix}{i}", "text": " ".join(rng.choice(vocab) for _ in range(words))} for i in range(n)]


class DirectWriter(threading.Thread):
    """Ingests one document per request until stopped; remembers the acknowledged ids."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.url, self.prefix = url, prefix
        self.acked: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self.stop.is_set():
                doc_id = f"{self.prefix}{i}"
                i += 1
                try:
                    r = c.post(
                        "/v1/documents", json={"documents": [{"id": doc_id, "text": f"note {doc_id}"}]}, headers=B
                    )
                except httpx.HTTPError:
                    return  # the server died under it: this one was not acknowledged
                if r.status_code == 200:
                    self.acked.append(doc_id)


def ids(c: httpx.Client, headers: dict[str, str]) -> set[str]:
    return set(c.get("/v1/documents", params={"limit": 1000}, headers=headers).json()["ids"])


def job(c: httpx.Client, job_id: str) -> dict[str, object]:
    r = c.get(f"/v1/jobs/{job_id}", headers=A)
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def progress(j: dict[str, object]) -> int:
    return int(j["progress"]["documents_done"])  # type: ignore[index]


def test_kill_9_loses_no_acknowledged_document_and_no_job(tmp_path: Path) -> None:
    docs = synthetic("a", 60, 500)  # ~3 chunks each: about a minute of model time
    acked: list[str] = []
    done_before: list[int] = []
    job_id = ""
    for round_ in range(3):
        with server(tmp_path, round_) as (url, proc), httpx.Client(base_url=url, timeout=30) as c:
            if round_ == 0:
                r = c.post("/v1/jobs", json={"documents": docs}, headers=A)
                assert r.status_code == 202
                job_id = r.json()["id"]
            else:  # after a SIGKILL: nothing acknowledged is lost, and the job is picked up again
                missing = set(acked) - ids(c, B)
                assert not missing, f"acknowledged documents lost: {sorted(missing)[:5]}"
                j = job(c, job_id)
                assert j["resumes"] == round_ and j["state"] in ("queued", "running", "succeeded"), j
                assert progress(j) >= done_before[-1]  # resumed from where it stopped, not from zero
            if round_ == 2:
                deadline = time.monotonic() + 240
                while (j := job(c, job_id))["state"] in ("queued", "running"):
                    assert time.monotonic() < deadline, f"job still {j['state']} after 240 s: {j}"
                    time.sleep(0.5)
                print(f"\nafter 2 x SIGKILL: job {j['state']}, {progress(j)}/60 documents, resumes {j['resumes']}")
                assert j["state"] == "succeeded" and progress(j) == 60
                assert {d["id"] for d in docs} <= ids(c, A)
                assert all(x["state"] != "running" for x in c.get("/v1/jobs", headers=A).json()["jobs"])
                break
            # direct ingests alongside the job, then SIGKILL once the job is some way further
            writer = DirectWriter(url, f"b{round_}-")
            writer.start()
            target = (done_before[-1] if done_before else 0) + 8
            deadline = time.monotonic() + 180
            while progress(job(c, job_id)) < target:
                assert time.monotonic() < deadline, "the job made no progress"
                time.sleep(0.1)
            time.sleep(random.Random(round_).uniform(0.0, 1.5))  # somewhere inside a step
            done_before.append(progress(job(c, job_id)))
            proc.kill()  # SIGKILL: no shutdown, no hand-back
            proc.wait(10)
            writer.stop.set()
            writer.join(15)
            acked.extend(writer.acked)
            print(f"round {round_}: killed at job document {done_before[-1]}/60, {len(writer.acked)} direct acks")
            assert writer.acked, "no direct ingest was acknowledged before the kill"
