#!/usr/bin/env bash
# One device call (at most 8 minutes on one H100/H200): install what the GPU image lacks from the wheels carried in
# .gpu-wheels/ (scripts/fetch_gpu_wheels.py; no network there), then run scripts/gpu_check.py, which writes its
# tables to $OUT (memory.md/.csv, speed.md/.csv, summary.json, logs/). Run it from the repository root:
#
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=480)
#
# The Python budget (GPU_CHECK_BUDGET_S, default 400 s) leaves time for the install and for writing the tables
# before the call's limit; groups that do not fit are listed as "not measured".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WHEELS=.gpu-wheels
want=(trl datasets bitsandbytes omegaconf liger-kernel dill multiprocess xxhash fsspec)
if [ "${1:-}" != "--cpu-smoke" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in $WHEELS (run scripts/fetch_gpu_wheels.py here, carry .gpu-wheels)" | tee "$OUT/install.log"
  else
    # resolve against what the image has; if an old pin there blocks it, install ours without their dependencies
    "$PY" -m pip install --no-index --find-links "$WHEELS" "${want[@]}" >"$OUT/install.log" 2>&1 \
      || "$PY" -m pip install --no-index --no-deps "$WHEELS"/*.whl >>"$OUT/install.log" 2>&1 \
      || echo "gpu_check: some wheels did not install (see install.log); their cells will say why" | tee -a "$OUT/install.log"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_SCRATCH="${GPU_CHECK_SCRATCH:-/tmp}"
export TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" | tee "$OUT/env.txt"
"$PY" -m pip list 2>/dev/null >>"$OUT/env.txt"
nvidia-smi >>"$OUT/env.txt" 2>&1 || true
exec "$PY" scripts/gpu_check.py --out "$OUT" --budget-s "${GPU_CHECK_BUDGET_S:-400}" "$@"
