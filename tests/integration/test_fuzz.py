"""Fuzzing every operation of ``/openapi.json`` with schemathesis (issue 10, evidence 1): with API and
admin keys configured, bounded examples per operation, no response is a 5xx.

The server runs for real (uvicorn in a thread, the fast HashEmbedder and ScriptedLLM) so the whole
stack — middleware, routing, validation, the pipeline and the store — sees the generated input.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import HashEmbedder, ScriptedLLM
from tests.fixtures.http import ThreadedServer

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("RAGLINE_FUZZ_EXAMPLES", "40"))
KEYS = ({"x-api-key": "key-a"}, {"x-api-key": "admin-key"}, {}, {"authorization": "Bearer key-b"})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    s = Settings(
        data_dir=Path(tmp_path_factory.mktemp("fuzz")) / "data",
        cache={"enabled": True, "redis_url": None},
        server={"api_keys": {"key-a": "tenant-a", "key-b": "tenant-b"}, "admin_keys": ["admin-key"]},
    )
    app = create_app(s, AsyncRAG(s, embedder=HashEmbedder(), llm=ScriptedLLM()))
    with ThreadedServer(app) as srv:
        docs = {"documents": [{"id": "tea", "text": "Green tea contains catechins and caffeine."}]}
        httpx.post(srv.url + "/v1/documents", json=docs, headers=KEYS[0], timeout=30).raise_for_status()
        yield srv.url


def test_no_operation_answers_5xx(server: str) -> None:
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) >= 10
    tried: dict[str, int] = {}
    for op in ops:
        name = f"{op.method.upper()} {op.path}"

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            for headers in KEYS:
                response = case.call(base_url=server, headers=headers, timeout=30)
                tried[name] = tried.get(name, 0) + 1  # noqa: B023
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
                )

        run()
    print({k: v for k, v in sorted(tried.items())})
    assert set(tried) == {f"{op.method.upper()} {op.path}" for op in ops}
