"""Replacing and resuming runs for real (training in this process on a tiny model): a rerun with overwrite=true that
fails before training gives the old run back; a run being written by another process is refused, naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune import config, rundir
from finetune.errors import UserError
from finetune.train import run

from tests.e2e.test_train import tiny


def test_a_failed_overwrite_gives_the_finished_run_back(tmp_path):
    out = tmp_path / "run"
    run(tiny("tiny_qwen2_5", "lora", out, "train.max_steps=1"))
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "hi", "output": \n')
    with pytest.raises(UserError, match="broken.jsonl: 1 of 1 records is malformed: line 1"):
        run(tiny("tiny_qwen2_5", "lora", out, "train.max_steps=1", "overwrite=true", f"data.path={broken}"))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "run"]
    run(tiny("tiny_qwen2_5", "lora", out, "train.max_steps=2", "overwrite=true"))  # the lock was released
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "run"]
    assert "max_steps: 2" in (out / "recipe.yaml").read_text()


def test_resuming_a_run_that_another_process_holds_is_refused(tmp_path):
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "checkpoint-1"
    rundir.create(tiny("tiny_qwen2_5", "lora", out))
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    with rundir.RunLock(Path(out), "train"):
        with pytest.raises(UserError, match="in use by pid"):
            run(config.load(str(out / "recipe.yaml"), [f"resume={out}"]))
