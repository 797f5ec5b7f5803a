#!/usr/bin/env bash
# Set up everything the demo and the tests use, in .venv. Idempotent: a second run takes seconds.
#   torch first (the CPU wheel on a CPU box; keeps an existing CUDA torch), then the project with its extras,
#   then llama.cpp: the pinned llama-cpp-python sdist (checksum-verified) built PORTABLE once into a wheel cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
# A bare `pip install torch` range would pull a multi-GB CUDA build on a CPU machine: pin the CPU one first.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -e ".[scale,track,awq,serve,eval,web,dev]"
"$VENV/bin/python" -m finetune.export.llamacpp setup
echo "set-up done: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
