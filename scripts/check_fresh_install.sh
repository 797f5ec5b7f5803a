#!/usr/bin/env bash
# Proof that finetune installs and runs as a new user gets it, with nothing borrowed from this checkout:
#   a wheel built from the checkout → a NEW venv with the core dependencies only (no extras, not editable) →
#   every command run from an empty temporary directory with an empty FINETUNE_CACHE.
# It checks: each core module imports; `finetune list recipes` pipes; a dry-run of a shipped 7B recipe; a
# SentencePiece family's data report (protobuf); converting an original ChatGLM3 checkpoint; a tiny LoRA run and
# its export to merged; and the llama.cpp sdist download (download only, no 5-minute build) into an empty cache.
# Usage: bash scripts/check_fresh_install.sh      (PIP_CACHE_DIR=$(mktemp -d) to also prove it with no pip cache)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
WORK=$(mktemp -d -t finetune-fresh-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export FINETUNE_CACHE="$WORK/cache" HF_HOME="$WORK/hf" WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
unset FINETUNE_RECIPES FINETUNE_TOKENIZERS PYTHONPATH
step() { printf '\n== %s\n' "$*" >&2; }
started=$SECONDS

step "wheel from the checkout"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO"  # build isolation, as `pip install .` does
WHEEL=$(ls "$WORK"/dist/finetune-*.whl)
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
needed = ["finetune/recipes/qwen7b_qlora.yaml", "finetune/recipes/base/lora.yaml", "finetune/recipes/deepspeed/zero3.json",
          "finetune/recipes/accelerate/fsdp.yaml", "finetune/models/configs/qwen2_5_7b.json",
          "finetune/models/tokenizer_files/qwen2_5/tokenizer.json", "finetune/models/tokenizer_files/llama2/tokenizer.model",
          "finetune/samples/messages_system.jsonl", "finetune/estimate/seed/manifest.json"]
missing = [n for n in needed if n not in names]
if not any(n.startswith("finetune/estimate/seed/") and not n.endswith("/manifest.json") for n in names):
    missing.append("finetune/estimate/seed/*.json (the seed of model facts)")
sys.exit(f"FAIL: not in the wheel: {missing}" if missing else 0)
EOF
echo "$(basename "$WHEEL"): recipes, DeepSpeed/accelerate configs, model configs, tokenizers, samples, facts seed inside" >&2

step "new venv: torch CPU first, then the wheel with its core dependencies only"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q "$WHEEL"
for extra in deepspeed wandb tensorboard llama_cpp llmcompressor modelscope pytest; do
  if "$VPY" -c "import $extra" 2>/dev/null; then echo "FAIL: $extra came with the core install" >&2; exit 1; fi
done

mkdir -p "$WORK/elsewhere" && cd "$WORK/elsewhere"   # no checkout, no recipes/, no data/ here
FT="$WORK/venv/bin/finetune"

step "every module of the package imports from the core dependencies alone"
"$VPY" - <<'EOF'
import importlib, pkgutil, finetune
names = [m.name for m in pkgutil.walk_packages(finetune.__path__, "finetune.")]
for name in names:
    importlib.import_module(name)
print(f"{len(names)} modules import (from {finetune.__path__[0]})")
assert "site-packages" in finetune.__path__[0], "finetune was imported from the checkout, not the install"
EOF

step "finetune list recipes | grep qwen7b"
"$FT" list recipes | grep -q qwen7b_qlora

step "finetune recipe=qwen7b_qlora --dry-run gpu_mem=24"
"$FT" recipe=qwen7b_qlora --dry-run gpu_mem=24 | grep -q "7,615,616,512"
"$VPY" - <<'EOF'  # its facts came from the package's seed (nothing counted), unless pip resolved other versions
import json, os, pathlib, sys
from finetune.estimate import params
made = json.loads((params.SEED / "manifest.json").read_text())["versions"]
counted = sorted(p.name for p in pathlib.Path(os.environ["FINETUNE_CACHE"], "estimate").glob("*.json"))
if made != params.versions():
    print(f"note: the seed was made under {made}, installed: {params.versions()}; counted {counted}", file=sys.stderr)
elif counted:
    sys.exit(f"FAIL: the dry-run counted {counted} though the seed was made under these versions")
EOF

step "finetune data on a SentencePiece family (Llama-2's tokenizer: protobuf)"
"$FT" data recipe=tiny_llama2_lora --json | "$VPY" -c "import json,sys; r=json.load(sys.stdin); assert r['count'] > 0, r"

step "finetune convert: an original ChatGLM3 checkpoint into the native class"
"$VPY" -c "from finetune.models import tiny; tiny.build_tiny('tiny_chatglm3', '$WORK/glm-original', layout='original')"
"$FT" convert "$WORK/glm-original" "$WORK/glm-native" >/dev/null
test -f "$WORK/glm-native/config.json"

step "a tiny LoRA run, then export to merged"
"$FT" recipe=tiny_qwen2_5_lora train.max_steps=2 train.save_steps=2 train.eval_steps=2 train.sample_prompts=0 \
  output_dir="$WORK/run" >/dev/null
"$FT" export run="$WORK/run" to=merged >/dev/null
test -f "$WORK/run/export/merged/config.json"

step "the llama.cpp sdist download into an empty cache (no build)"
FINETUNE_CACHE="$WORK/empty-cache" "$VPY" -c "from finetune.export import llamacpp; print(llamacpp.ensure_sdist())" >&2

echo "fresh install: all checks passed in $((SECONDS - started)) s" >&2
