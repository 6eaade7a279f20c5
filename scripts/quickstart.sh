#!/usr/bin/env bash
# One command: install, ingest (the shipped sample corpus or the paths given), answer one
# question, then serve the HTTP API on 127.0.0.1:8080 with embedded defaults (no services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
if [ "$#" -gt 0 ]; then paths=("$@"); else paths=(examples/sample_docs); fi
.venv/bin/ragline ingest "${paths[@]}"
.venv/bin/ragline ask "What does reciprocal rank fusion do?"
exec .venv/bin/ragline serve --host 127.0.0.1 --port "${RAGLINE_SERVER__PORT:-8080}"
