"""The dry run's per-process plan against what each of two CPU ranks really holds, for distributed=zero2|zero3|fsdp
at reduced real widths, bf16: scripts/bench_memory_ranks.py trains two steps through the Trainer training uses (our
trainer arguments, the engine's DeepSpeed JSON or FSDP plugin) while bench_memory's allocation tracker records every
storage each rank makes and frees.

What holds within TOLERANCE on both ranks, and is asserted here (HOLDS): the weights each rank holds (zero2: the
16-bit module and its fp32 master partition; zero3 and fsdp: the partition or shard, against the plan's weights
without its two gathered units) and the optimizer states, exactly, for LoRA and full fine-tuning under all three;
zero3 full's gradients (+2.1%); fsdp full's gradients (exact) and peak (+2.8%: accelerate's fp32 upcast of what FSDP
trains, now planned); the training peak of LoRA under zero2 (-1.1%) and fsdp (-6.6%).
What does not, measured and left to the estimator (docs/memory.md, the ranks section, says why): LoRA's gradients
at the step under every engine, zero2 full's, zero3's peaks (-12.6%) and zero2 full's peak (-30.5%).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_distributed import ACCELERATE, ENGINE, ONE_THREAD, REPO, free_port

pytestmark = pytest.mark.distributed

TOLERANCE = 0.10
HOLDS = {("zero2", "lora"): ("weights", "optimizer", "peak"), ("zero3", "lora"): ("sharded", "optimizer"),
         ("fsdp", "lora"): ("sharded", "optimizer", "peak"),
         ("zero2", "full"): ("weights", "optimizer"), ("zero3", "full"): ("sharded", "gradients", "optimizer"),
         ("fsdp", "full"): ("sharded", "gradients", "optimizer", "peak")}
"""The terms held to TOLERANCE for each engine and method (the module docstring says why the others are not)."""


def ranks(engine: str, method: str, out: Path) -> dict:
    """scripts/bench_memory_ranks.py on 2 CPU processes, as a user launches training: the estimate and each rank's
    figures."""
    figures = out / f"{engine}_{method}.json"
    done = subprocess.run(
        [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(REPO / "scripts" / "bench_memory_ranks.py"), "--engine", engine, "--method", method,
         "--json", str(figures)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads(figures.read_text())


@pytest.mark.parametrize(("engine", "method"), list(HOLDS))
def test_each_ranks_memory_is_the_plans_within_ten_percent(engine, method, tmp_path):
    got = ranks(engine, method, tmp_path)
    assert [r["rank"] for r in got["ranks"]] == [0, 1]
    assert {r["engine"] for r in got["ranks"]} == {ENGINE[engine]}  # not a silent fall back to DDP
    for rank in got["ranks"]:
        for term in HOLDS[engine, method]:
            estimate, measured = got["estimate"][term], rank[term]
            assert abs(estimate - measured) <= TOLERANCE * measured, (engine, method, rank["rank"], term, estimate,
                                                                      measured)
