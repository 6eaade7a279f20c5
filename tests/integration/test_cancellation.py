"""A request whose client disconnects stops its work (issue 10): nothing is generated for a client that
left, unless another caller still awaits the same single-flight computation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from ragline.config import Settings
from ragline.llm.base import Completion, GenParams
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Message
from tests.fixtures.http import ThreadedServer

pytestmark = pytest.mark.slow


class CountingLLM(ScriptedLLM):
    """Counts the completions that ran to their end (a cancelled one never does)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s=delay_s)
        self.finished = 0

    async def complete(self, messages: list[Message], params: GenParams) -> Completion:
        out = await super().complete(messages, params)
        self.finished += 1
        return out


def _server(tmp_path: Path, llm: CountingLLM) -> ThreadedServer:
    s = Settings(data_dir=tmp_path / "d", cache={"enabled": True, "redis_url": None, "semantic": False})
    return ThreadedServer(create_app(s, AsyncRAG(s, embedder=HashEmbedder(), llm=llm)))


def test_abandoned_requests_stop_their_work(tmp_path: Path) -> None:
    llm = CountingLLM(delay_s=1.0)
    with _server(tmp_path, llm) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        docs = [{"id": "tea", "text": "Green tea contains catechins."}]
        assert c.post("/v1/documents", json={"documents": docs}).status_code == 200
        gave_up = 0
        for i in range(8):
            try:
                httpx.post(srv.url + "/v1/query", json={"query": f"what is in tea {i}?"}, timeout=0.2)
            except httpx.TimeoutException:
                gave_up += 1
        assert gave_up == 8
        time.sleep(1.5)  # long enough for any generation that was not stopped to finish
        assert llm.calls == 8 and llm.finished == 0  # every one started, none finished
        metrics = c.get("/metrics").text
        assert "ragline_requests_cancelled_total 8.0" in metrics
        assert "ragline_requests_finished_after_disconnect_total 0.0" in metrics


def test_a_shared_computation_survives_one_callers_disconnect(tmp_path: Path) -> None:
    llm = CountingLLM(delay_s=0.8)
    with _server(tmp_path, llm) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        docs = [{"id": "tea", "text": "Green tea contains catechins."}]
        assert c.post("/v1/documents", json={"documents": docs}).status_code == 200
        body = {"query": "what is in green tea?"}
        result: dict[str, int] = {}

        def patient() -> None:
            time.sleep(0.1)  # joins the first caller's computation
            result["status"] = httpx.post(srv.url + "/v1/query", json=body, timeout=10).status_code

        t = threading.Thread(target=patient)
        t.start()
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/query", json=body, timeout=0.3)  # the first caller leaves
        t.join()
        assert result["status"] == 200
        assert llm.calls == 1 and llm.finished == 1  # one computation, kept alive for the one who waited
