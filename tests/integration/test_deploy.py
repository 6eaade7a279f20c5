"""deploy/ checked against the real thing, as far as it runs here (no Docker): every metric the
Grafana dashboard and the alert rules name is one a running server's ``/metrics`` exposes;
``promtool check rules`` and ``promtool check metrics`` (Debian ``prometheus``) pass; the manifests
and the compose file parse.  (The nginx config is run by tests/integration/test_cluster.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import FakeUpstream, HashEmbedder
from tests.fixtures.http import ThreadedServer
from tests.fixtures.redis_server import RedisServer

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAME = re.compile(r"\bragline_[a-z0-9_]+")


def _promtool() -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: scripts/test.sh installs the Debian package prometheus"
    return exe


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[str]:
    """/metrics of a server (L1 + Redis L2 + L3, the LLM behind the gateway on a fake upstream) after a
    little of everything: ingest, a miss, a hit, a search, a bad request."""
    redis_server.resume()  # a fault test may have left it paused or stopped
    redis_server.start()
    with FakeUpstream() as fake:
        yield _scrape(tmp_path_factory, redis_server, fake)


def _scrape(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, fake: FakeUpstream) -> str:
    gateway = {"upstreams": [{"base_url": fake.url, "model": "chat", "name": "fake"}]}
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("deploy") / "data",
        cache={"enabled": True, "redis_url": redis_server.url},
        llm={"provider": "gateway", "model": "chat", "gateway": gateway},
    )
    app = create_app(settings, AsyncRAG(settings, embedder=HashEmbedder()))
    docs = [
        {"id": "paris", "text": "The Eiffel Tower opened in 1889."},
        {"id": "tea", "text": "Tea has caffeine."},
    ]
    with ThreadedServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
        assert c.post("/v1/documents", json={"documents": docs}).status_code == 200
        for _ in range(2):
            assert c.post("/v1/query", json={"query": "When did the Eiffel Tower open?"}).status_code == 200
        assert c.post("/v1/search", json={"query": "tea"}).status_code == 200
        assert c.post("/v1/query", json={"query": ""}).status_code == 400
        update = {"documents": [{"id": "paris", "text": "It opened in 1889."}]}
        assert c.post("/v1/documents", json=update).status_code == 200
        assert c.post("/v1/query", json={"query": "When did the Eiffel Tower open?"}).status_code == 200
        return c.get("/metrics").text


def _exposed(text: str) -> set[str]:
    """Sample names a PromQL expression may use: every family's, with the suffixes its type has."""
    names: set[str] = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(family)
        if kind == "counter":
            names.add(family if family.endswith("_total") else family + "_total")
        elif kind in ("histogram", "summary"):
            names.update(family + s for s in ("_bucket", "_sum", "_count", "_created"))
    return names


def _dashboard_exprs() -> list[str]:
    dash = orjson.loads((DEPLOY / "grafana" / "dashboards" / "ragline.json").read_bytes())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def _alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_every_metric_the_dashboard_and_alerts_name_is_exposed(scrape: str) -> None:
    exposed = _exposed(scrape)
    exprs = _dashboard_exprs() + _alert_exprs()
    assert len(exprs) >= 20
    named = {n for e in exprs for n in NAME.findall(e)}
    assert named and named <= exposed, sorted(named - exposed)


def test_promtool_accepts_the_rules_and_the_exposition(scrape: str, tmp_path: Path) -> None:
    rules = subprocess.run([_promtool(), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert rules.returncode == 0, rules.stdout + rules.stderr
    metrics = subprocess.run(
        [_promtool(), "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=60
    )
    assert metrics.returncode == 0, metrics.stdout + metrics.stderr


def test_the_manifests_parse() -> None:
    kinds = {d["kind"] for f in (DEPLOY / "k8s").glob("*.yaml") for d in yaml.safe_load_all(f.read_text()) if d}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    probes = deployment["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"ragline-1", "ragline-2", "ragline-3", "nginx", "redis", "postgres", "prometheus", "grafana"} <= set(
        compose["services"]
    )
