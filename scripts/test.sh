#!/usr/bin/env bash
# One command: install everything the tests need (Python extras incl. pgserver for PostgreSQL +
# pgvector, Debian redis-server, nginx, promtool and wrk, llama.cpp server + SmolLM2 GGUF), run the static gates (layers, dependencies, format, lint,
# types; any failure fails the run) and then the whole suite (unit + integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "dev,bench,llama,profile"
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  ($sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
gate() { echo "== $*" >&2; "$@" || { echo "gate failed: $*" >&2; exit 1; }; }
gate .venv/bin/lint-imports                       # layers point one way (pyproject [tool.importlinter])
gate .venv/bin/deptry .                           # declared dependencies = imported ones ([tool.deptry])
gate .venv/bin/ruff format --check .
gate .venv/bin/ruff check .
gate .venv/bin/python -m mypy                     # strict, packages = ["ragline"]
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
