#!/usr/bin/env bash
# The main job, end to end on CPU: set-up, then tiny model + real tokenizer → 8 identity questions → LoRA →
# merge → GGUF f16 + Ollama directory → each question answered before training, after it (transformers) and by
# the GGUF (llama.cpp), side by side, with a summary of the loss and of where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
