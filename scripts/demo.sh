#!/usr/bin/env bash
# The main job, end to end on CPU: set-up, then tiny model + real tokenizer → sample data → LoRA training →
# merge → GGUF f16 + Ollama directory → one answer from llama.cpp, with a summary of where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
