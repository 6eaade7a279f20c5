"""The fake OpenAI upstream for the gateway benchmarks: in a separate process (default) or a thread.

``ragline.testing.FakeUpstream`` as a context manager serves from a thread of the calling process,
so its request handling shares the GIL (and the event loop's core) with the client being measured.
``fake_upstream(mode="process")`` runs ``python -m ragline.testing.fake_upstream --port P`` instead
and steers it over its HTTP control routes.  Both give the same small interface: ``url``,
``configure(**fields)``, ``route_calls(route)``, ``reset()``.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from _common import REPO, clean_env, free_port, process, wait_http


class ProcessFake:
    """A fake upstream in its own process, controlled over HTTP (``/_control``, ``/_stats``)."""

    def __init__(self, port: int, pid: int | None = None) -> None:
        self.port = port
        self.pid = pid
        """The fake's process id (for CPU accounting)."""
        self.root = f"http://127.0.0.1:{port}"
        self.url = self.root + "/v1"
        self._http = httpx.Client(base_url=self.root, timeout=10, trust_env=False)

    def configure(self, **values: Any) -> None:
        r = self._http.post("/_control", json=values)
        r.raise_for_status()

    def stats(self) -> dict[str, Any]:
        r = self._http.get("/_stats")
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def route_calls(self, route: str) -> int:
        return int(self.stats()["routes"].get(route, 0))

    def reset(self) -> None:
        self._http.post("/_reset").raise_for_status()

    def close(self) -> None:
        self._http.close()


class ThreadFake:
    """``FakeUpstream`` served from a thread of this process (shares the GIL with the client)."""

    def __init__(self) -> None:
        from ragline.testing import FakeUpstream

        self.inner = FakeUpstream().start()
        self.url = self.inner.url
        self.pid: int | None = None

    def configure(self, **values: Any) -> None:
        self.inner.configure(**values)

    def route_calls(self, route: str) -> int:
        return self.inner.route_calls(route)

    def reset(self) -> None:
        self.inner.reset()

    def close(self) -> None:
        self.inner.stop()


@contextlib.contextmanager
def fake_upstream(mode: str = "process", log_dir: Path | None = None) -> Iterator[ProcessFake | ThreadFake]:
    """A running fake (``mode``: "process" or "thread"), stopped on exit."""
    if mode == "thread":
        local = ThreadFake()
        try:
            yield local
        finally:
            local.close()
        return
    if mode != "process":
        raise ValueError("mode must be 'process' or 'thread'")
    with contextlib.ExitStack() as stack:
        folder = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ragline-fake-")))
        port = free_port()
        log = folder / f"fake-{port}.log"
        cmd = [sys.executable, "-m", "ragline.testing.fake_upstream", "--port", str(port)]
        env = clean_env(PYTHONPATH=str(REPO))
        proc = stack.enter_context(process(cmd, env, log))
        wait_http(f"http://127.0.0.1:{port}", proc, log, path="/_stats", timeout_s=30)
        fake = ProcessFake(port, proc.pid)
        stack.callback(fake.close)
        yield fake


@contextlib.contextmanager
def redis_server(log_dir: Path) -> Iterator[str]:
    """A throw-away redis-server on a free 127.0.0.1 port (no persistence); yields its URL."""
    import time

    import redis

    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with process(cmd, clean_env(), log_dir / f"redis-{port}.log") as proc:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
