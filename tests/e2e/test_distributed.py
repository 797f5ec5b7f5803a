"""A real 2-process data-parallel run on CPU (gloo), launched the way users launch on GPUs:
`accelerate launch --multi_gpu --num_processes 2 -m finetune recipe=...`.

The trap it guards against: without `use_cpu=True` on a GPU-less machine both processes silently train alone
(world size 1 each) — then the world size, the per-rank report and the data consumed per step all give it away.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["model=tiny_llama2", "method=lora", "distributed=ddp", f"data.path={REPO / 'data' / 'messages_system.jsonl'}",
        "data.max_samples=8", "data.val_size=0", "train.max_steps=2", "train.micro_batch=1", "train.grad_accum=1",
        "train.precision=fp32", "train.gradient_checkpointing=false", "train.logging_steps=1", "train.save_steps=2",
        "train.sample_prompts=1", "train.lr=1e-2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_cpu_processes_train_one_model_and_only_rank0_writes(tmp_path):
    out = tmp_path / "runs" / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(free_port()), "-m", "finetune", *ARGS, f"output_dir={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=580, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    assert all(r["global_step"] == 2 for r in ranks)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2]  # one writer: every step logged once
    # 2 steps x 1 example x 2 ranks = 4 of the 8 examples: each rank took its own share of the data
    assert rows[-1]["epoch"] == pytest.approx(0.5)
    assert list((tmp_path / "runs").iterdir()) == [out]  # one run directory, not one per process
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()
    assert "2 process(es) on cpu (gloo)" in proc.stderr
