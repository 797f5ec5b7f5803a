"""CLI latency benchmark: the commands a user waits on, each run cold (empty $FINETUNE_CACHE) and then warm.

    .venv/bin/python scripts/bench_cli.py [--every-recipe] [--source DIR]

Each command runs as `python -m finetune ...` in a fresh process, as a user runs it: first with an empty
FINETUNE_CACHE (nothing counted yet; Python's bytecode and the OS file cache are warm), then again with the cache
that run left. Cold, the shipped recipes' model facts come from the seed in the package; a setting no recipe ships
(lora.r=24) is counted on the meta device, which imports torch, transformers, PEFT and bitsandbytes: each cold run
says how many models it counted. Reported per run: wall seconds, CPU seconds of the process (what the wall time
would be on an idle machine, for this single-threaded work) and its peak RSS. The machine's load average is
printed, since other jobs stretch wall time. --every-recipe also estimates every shipped recipe cold and warm;
--source DIR measures another checkout of finetune (e.g. `git worktree` of an older commit) with this same script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (
    ("help", ["--help"]),
    ("dry-run qwen7b_qlora", ["recipe=qwen7b_qlora", "--dry-run", "gpu_mem=24"]),
    ("dry-run qwen7b_qlora lora.r=24 (not shipped)", ["recipe=qwen7b_qlora", "--dry-run", "gpu_mem=24",
                                                     "lora.r=24"]),
    ("dry-run qwen7b_full (won't fit: suggestions)", ["recipe=qwen7b_full", "--dry-run", "gpu_mem=24", "num_gpus=1",
                                                     "distributed=none"]),
    ("estimate baichuan2_13b_qlora --json", ["estimate", "recipe=baichuan2_13b_qlora", "gpu_mem=16", "--json"]),
    ("list models", ["list", "models"]),
    ("recommend gpu_mem=24", ["recommend", "gpu_mem=24"]),
    ("recommend gpu_mem=8 lang=zh", ["recommend", "gpu_mem=8", "lang=zh"]),
)


def run(args: list[str], cache: Path, source: str | None) -> tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS MiB, exit code) of one `python -m finetune ARGS` process."""
    env = {**os.environ, "FINETUNE_CACHE": str(cache)}
    if source:
        env["PYTHONPATH"] = source
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "finetune", *args], env=env, cwd=source,
                                   stdout=subprocess.DEVNULL, stderr=errors)  # `-m` puts the cwd first
        _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time and peak RSS
        wall = time.perf_counter() - start
        code = process.returncode = os.waitstatus_to_exitcode(status)
        if code not in (0, 3):  # 3: the estimate says it will not fit, a normal answer
            errors.seek(0)
            sys.exit(f"finetune {' '.join(args)} failed ({code}):\n{errors.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, code


def measure(label: str, args: list[str], work: Path, source: str | None) -> tuple[float, float]:
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    cold = run(args, cache, source)
    counted = len(list((cache / "estimate").glob("*.json")))  # the seed's answers are read, never stored
    warm = run(args, cache, source)
    print(f"{label:46s} cold {cold[0]:5.1f} s ({cold[1]:4.1f} CPU-s, {cold[2]:4.0f} MiB, {counted:2d} counted)   "
          f"warm {warm[0]:5.2f} s ({warm[1]:4.2f} CPU-s, {warm[2]:4.0f} MiB)", flush=True)
    return cold[0], warm[0]


def _bench(work: Path, args: argparse.Namespace) -> None:
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; "
          f"finetune from {args.source or 'this environment'}", flush=True)
    for label, command in COMMANDS:
        measure(label, command, work, args.source)
    if args.every_recipe:
        from finetune import config

        colds, warms = [], []
        for name in config.shipped_recipes():
            cold, warm = measure(f"estimate recipe={name}", ["estimate", f"recipe={name}", "gpu_mem=24"], work,
                                 args.source)
            colds.append((cold, name))
            warms.append((warm, name))
        print(f"every shipped recipe: slowest cold {max(colds)[0]:.1f} s ({max(colds)[1]}), "
              f"slowest warm {max(warms)[0]:.2f} s ({max(warms)[1]})")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every-recipe", action="store_true", help="also estimate every shipped recipe")
    parser.add_argument("--source", help="a checkout whose finetune package to measure (put first on PYTHONPATH)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_cli-"))
    try:
        _bench(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
