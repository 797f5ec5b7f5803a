"""DPO as the second stage: it starts from the SFT run's adapter, trains on the preference sample, logs to wandb
offline, and leaves an adapter export can use like any other."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import config
from finetune.train import run

REPO = Path(__file__).resolve().parents[2]
COMMON = ["model=tiny_llama2", "method=lora", "data.val_size=0", "train.micro_batch=2", "train.grad_accum=1",
          "train.warmup_ratio=0", "train.scheduler=constant", "train.precision=fp32",
          "train.gradient_checkpointing=false", "train.logging_steps=1", "train.save_steps=1000",
          "train.sample_prompts=1", "lora.r=8", "lora.alpha=16", "lora.dropout=0"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def test_dpo_after_sft_continues_the_adapter_and_prefers_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    sft = run(config.load(None, [*COMMON, f"output_dir={tmp_path / 'sft'}",
                                 f"data.path={REPO / 'data' / 'messages_system.jsonl'}", "data.max_samples=2",
                                 "train.max_steps=1", "train.lr=1e-2", "train.sample_prompts=0"]))
    dpo = run(config.load(None, [*COMMON, "stage=dpo", f"output_dir={tmp_path / 'dpo'}",
                                 f"data.path={REPO / 'data' / 'preference_zh_en.jsonl'}", "data.max_samples=2",
                                 "train.max_steps=3", "train.lr=5e-3", "dpo.beta=0.1",
                                 f"dpo.sft_run={sft.path}", "report_to=wandb"]))
    rows = [json.loads(line) for line in dpo.metrics_file.read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as its reference: the SFT model
    assert losses[-1] < losses[0] and margins[-1] > 0, (losses, margins)

    before, after = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (sft.path, dpo.path))
    assert before.keys() == after.keys()  # the same adapter, trained further; no reference copy saved
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (dpo.adapter_dir / "ref").exists()
    assert json.loads(dpo.base_file.read_text())["path"] == json.loads(sft.base_file.read_text())["path"]
    assert "After:" in dpo.report_file.read_text()
    assert list(tmp_path.glob("wandb/offline-run-*"))
