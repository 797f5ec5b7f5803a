#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest (e.g. -k export, tests/unit).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Ollama templates are rendered with Go's own text/template in the export tests (Debian's golang-go); the web page
# is driven in headless Chromium (chromium + chromium-driver; fonts-noto-cjk so its 中文 labels render).
if ! { command -v go && command -v chromedriver; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go chromium chromium-driver \
    fonts-noto-cjk >/dev/null) \
    || echo "warning: golang-go / chromium could not be installed; Go template and browser tests will be skipped"
fi
# Two workers (at most four on bigger machines), a test file per worker at a time, the longest files first
# (tests/conftest.py LONGEST_FIRST; xdist would otherwise order files by their number of tests), one thread per
# process (tests/conftest.py). On 2 cores on 2026-12-07: 1099 tests in 24.3 min (48 CPU-minutes), 25.5 min after
# full fine-tuning was resumed under every engine (50 CPU-minutes), 32 min on a slower hour (62 CPU-minutes, every
# test ~25% longer): around the 25-minute goal; the distributed engines and the real-model tier are half of it.
.venv/bin/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder \
  --durations=15 "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "error: pytest collected no tests — the suite is broken, not green"; exit 1; fi
exit "$rc"
