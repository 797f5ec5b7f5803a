"""QLoRA on the real Qwen2.5-0.5B on a CPU: bitsandbytes' CPU 4-bit path at the real widths (Qwen2.5's q/k/v
projections have biases — a 4-bit matmul adding a bias in place once broke the first step), trained through the
real CLI until it gives a trained answer."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from real_tier import QUESTIONS

from finetune.rundir import RunDir

pytestmark = [pytest.mark.real, pytest.mark.e2e]


def test_qlora_on_the_real_model_learns_an_identity_answer(real_gguf, tmp_path):
    run = RunDir(tmp_path / "qlora")
    done = subprocess.run([sys.executable, "-m", "finetune", "recipe=qwen2_5_0_5b_qlora", f"model={real_gguf}",
                           "data.path=${sample:identity_zh_en.jsonl}", "data.val_size=0", "data.max_samples=2",
                           "train.max_steps=8", "train.micro_batch=2", "train.grad_accum=1", "train.max_length=128",
                           "train.lr=2e-3", "train.warmup_ratio=0", "train.logging_steps=1", "train.save_steps=8",
                           "train.sample_prompts=1", f"output_dir={run.path}"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [row["loss"] for row in map(json.loads, run.metrics_file.read_text().splitlines()) if "loss" in row]
    assert losses[-1] < losses[0] / 10, losses
    adapter = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) >= {"q_proj", "k_proj", "v_proj"}  # the projections with biases train
    # the report's sample: the trained 4-bit model's own greedy answer to a trained prompt (`finetune chat` is the
    # LoRA tier's; here the generation through bitsandbytes' 4-bit layers is what is new)
    fences = re.findall(r"```\n(.*?)\n```", run.report_file.read_text(encoding="utf-8"), re.S)
    reference, before, after = fences[-4:-1]
    assert after.strip() == reference.strip() and reference.strip() in QUESTIONS.values(), fences
