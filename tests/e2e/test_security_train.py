"""Replacing and resuming runs for real (training in this process on a tiny model): a rerun with overwrite=true that
fails before training gives the old run back; a run being written by another process is refused, naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import config, rundir
from finetune.errors import UserError
from finetune.train import run

from tests.e2e.test_train import REPO, tiny


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


def test_remote_code_allowed_on_the_command_line_is_said_and_recorded(tmp_path):
    """The one way to allow it is the CLI flag: the run says so on stderr as it starts, and summary.json keeps it
    for whoever reads the run later."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "finetune", "train", "recipe=tiny_qwen2_5_demo", "data.max_samples=2",
                           "data.val_size=0", "train.max_steps=1", "train.sample_prompts=0", f"output_dir={out}",
                           "--trust-remote-code"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "remote code --trust-remote-code: transformers may run Python files from the model's repository" in \
        done.stderr.splitlines()
    assert json.loads((out / "summary.json").read_text())["trust_remote_code"] is True
