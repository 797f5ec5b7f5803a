"""The dry run's per-process plan against what each of two CPU ranks really holds, for distributed=zero2|zero3|fsdp
at reduced real widths, bf16: scripts/bench_memory_ranks.py trains two steps through the Trainer training uses (our
trainer arguments, the engine's DeepSpeed JSON or FSDP plugin) while bench_memory's allocation tracker records every
storage each rank makes and frees.

Every term is held within TOLERANCE on both ranks, for LoRA and full fine-tuning under all three engines: the
weights each rank holds (zero2: the 16-bit module and its fp32 master partition; zero3 and fsdp: the partition or
shard, against the plan's weights without its gathered units), the gradients as the optimizer steps (DeepSpeed: the
16-bit partition and its fp32 copy; FSDP: the shards and one unit's unsharded buffer), the optimizer states and the
training peak (ZeRO-3: the whole reduced model stays gathered at the loss head, as its reuse distance says).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_distributed import ACCELERATE, ENGINE, ONE_THREAD, REPO, free_port

pytestmark = pytest.mark.distributed

TOLERANCE = 0.10
CASES = [(engine, method) for method in ("lora", "full") for engine in ("zero2", "zero3", "fsdp")]


def held_terms(engine: str) -> tuple[str, ...]:
    """The terms compared: what a sharding engine holds is its shard (`sharded`), ZeRO-2 holds every weight."""
    return ("weights" if engine == "zero2" else "sharded", "gradients", "optimizer", "peak")


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


@pytest.mark.parametrize(("engine", "method"), CASES)
def test_each_ranks_memory_is_the_plans_within_ten_percent(engine, method, tmp_path):
    got = ranks(engine, method, tmp_path)
    assert [r["rank"] for r in got["ranks"]] == [0, 1]
    assert {r["engine"] for r in got["ranks"]} == {ENGINE[engine]}  # not a silent fall back to DDP
    for rank in got["ranks"]:
        for term in held_terms(engine):
            estimate, measured = got["estimate"][term], rank[term]
            assert abs(estimate - measured) <= TOLERANCE * measured, (engine, method, rank["rank"], term, estimate,
                                                                      measured)
