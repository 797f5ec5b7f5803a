"""Resume through the CLI after `kill -9` and after Ctrl-C: the same losses as a run that was never stopped.

Same seed, same data order: the Trainer's checkpoint holds the optimizer, the scheduler, the RNG states (LoRA
dropout draws from them here) and the data position (16 steps over 4-step epochs, so the resumed runs cross
epoch boundaries). On CPU in fp32 nothing is left to chance, so the final loss must agree to 1e-6 relative.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import config
from finetune.errors import UserError
from finetune.rundir import RunDir
from finetune.train import run

REPO = Path(__file__).resolve().parents[2]

ARGS = ["model=tiny_llama2", "method=lora", f"data.path={REPO / 'data' / 'messages_system.jsonl'}",
        "data.max_samples=8", "data.val_size=0", "train.max_steps=16", "train.micro_batch=2", "train.grad_accum=1",
        "train.max_length=256", "train.lr=1e-2", "train.warmup_ratio=0.2", "train.scheduler=cosine",
        "train.precision=fp32", "train.gradient_checkpointing=false", "train.logging_steps=1", "train.save_steps=2",
        "train.sample_prompts=0", "lora.r=8", "lora.alpha=16", "lora.dropout=0.1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a shared 2-core machine: tiny matmuls run far faster on one thread


def start(extra: list[str], log: Path) -> subprocess.Popen:
    """`python -m finetune ...` as a user runs it, output to a log file (a full pipe would block it)."""
    return subprocess.Popen([sys.executable, "-m", "finetune", *ARGS, *extra], cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.timeout(900)
def test_kill9_and_ctrl_c_then_resume_reach_the_uninterrupted_loss(tmp_path):
    killed, stopped = tmp_path / "killed", tmp_path / "stopped"
    procs = {killed: start([f"output_dir={killed}"], tmp_path / "killed.log"),
             stopped: start([f"output_dir={stopped}"], tmp_path / "stopped.log")}

    # kill -9 right after the step-2 checkpoint: the steps after it are lost mid-way
    wait_for(lambda: RunDir(killed).last_checkpoint() is not None, procs[killed], "checkpoint-2")
    procs[killed].kill()
    assert procs[killed].wait() == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    resumes = [start([f"resume={killed}"], tmp_path / "killed-resume.log")]  # `finetune recipe=X resume=<run>`

    # Ctrl-C between checkpoints: the running step finishes, a checkpoint is saved, exit 130
    wait_for(lambda: any(step >= 3 for step in logged_steps(stopped)), procs[stopped], "step 3")
    procs[stopped].send_signal(signal.SIGINT)
    assert procs[stopped].wait(timeout=300) == 130, (tmp_path / "stopped.log").read_text()[-2000:]
    assert not (stopped / "summary.json").exists()
    saved = max(int(p.name.split("-")[1]) for p in (stopped / "checkpoints").glob("checkpoint-*"))
    assert saved >= 3 and logged_steps(stopped)[-1] == saved  # stopped right after the checkpoint it saved
    assert f"resume={stopped}" in (tmp_path / "stopped.log").read_text()
    resumes.append(start([f"resume={stopped}"], tmp_path / "stopped-resume.log"))

    # meanwhile, the run that is never interrupted (in this process: the same `run` the CLI calls)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run(config.load(None, [*ARGS, f"output_dir={tmp_path / 'reference'}"])).path
    finally:
        torch.set_num_threads(threads)
    for proc, out in zip(resumes, (killed, stopped)):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{out.name}-resume.log").read_text()[-3000:]

    want = step_losses(reference)
    final = json.loads((reference / "summary.json").read_text())["final_loss"]
    for out in (killed, stopped):
        assert sorted(step_losses(out)) == list(range(1, 17))  # lines logged after the checkpoint were dropped
        got = json.loads((out / "summary.json").read_text())
        assert got["resumed_from"] is not None and got["global_step"] == 16
        assert abs(got["final_loss"] - final) <= 1e-6 * abs(final), (got["final_loss"], final)
        for step, loss in step_losses(out).items():
            assert abs(loss - want[step]) <= 1e-6 * abs(want[step]), (out.name, step, loss, want[step])


def test_resume_of_a_run_without_checkpoint_says_so(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("model: tiny_llama2\n")
    with pytest.raises(UserError, match="has no complete checkpoint yet"):
        run(config.load(None, [*ARGS, f"resume={tmp_path / 'run'}"]))


def test_resume_auto_continues_the_newest_unfinished_run_else_starts_anew(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs land in ./outputs/<recipe>-<timestamp>
    short = [*ARGS, "train.max_steps=2", "train.save_steps=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = run(config.load(None, short)).path
        time.sleep(1.1)  # run directories are named to the second
        fresh = run(config.load(None, [*short, "resume=auto"])).path  # the newest run finished: a new one
        assert fresh != first and fresh.parent == first.parent == Path("outputs")
        (fresh / "summary.json").unlink()  # as if it had been killed after its last checkpoint
        again = run(config.load(None, [*short, "resume=auto"])).path
    finally:
        torch.set_num_threads(threads)
    assert again == fresh
    assert json.loads((fresh / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")
