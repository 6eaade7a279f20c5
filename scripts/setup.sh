#!/usr/bin/env bash
# Create .venv and install ragline with the given extras (default: none).
# torch's CPU wheel goes in first so that no CUDA packages are ever pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools
.venv/bin/pip install -q torch==2.13.0
# The llama extra is built portable first (see install_llama.sh), so the editable install below
# finds it satisfied and never builds a CPU-native wheel.
case ",$extras," in *,llama,*) bash scripts/install_llama.sh ;; esac
if [ -n "$extras" ]; then
  .venv/bin/pip install -q -e ".[${extras}]"
else
  .venv/bin/pip install -q -e .
fi
