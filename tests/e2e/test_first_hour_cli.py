"""What a newcomer meets in the first hour with the README in hand, through the CLI as they run it: `finetune data`
on a 7B recipe without its weights, `gpus --watch` without a GPU, one memory figure per recipe across commands,
the GGUF chat's context, no library noise on a QLoRA run, and `next` commands left whole in a log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.estimate import gpu
from finetune.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "messages_system.jsonl"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": ""}
"""No hub to reach, and an empty Hugging Face cache (set per test): a fetch of the model fails at once."""
NOISE = ("kernels-community", "No module named 'kernels'", "Setting accelerator to CPU")


@pytest.fixture
def offline(tmp_path) -> dict[str, str]:
    return {**OFFLINE, "HF_HUB_CACHE": str(tmp_path / "hf-cache")}


def test_data_reports_a_missing_file_before_fetching_the_model(cli, offline):
    done = cli("data", "recipe=qwen7b_qlora", "data.path=no-such-file.jsonl", env=offline, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "data.path: file no-such-file.jsonl does not exist" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_data_inspects_a_7b_recipe_with_its_shipped_tokenizer_and_no_download(cli, offline, tmp_path):
    done = cli("data", "recipe=qwen7b_qlora", f"data.path={SAMPLE}", "preview=1", "--json", env=offline,
               timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["template"] == "qwen2_5" and report["count"] > 0 and report["examples"][0]["input_ids"]
    assert not (tmp_path / "hf-cache").exists() or not any((tmp_path / "hf-cache").iterdir())


@pytest.mark.skipif(bool(gpu.detect()), reason="this machine has a GPU to watch")
def test_gpus_watch_without_a_gpu_says_so_and_stops(cli):
    plain = cli("gpus", timeout=120)
    watched = cli("gpus", "--watch", "0.2", timeout=120)
    assert plain.returncode == watched.returncode == 0, watched.stderr[-2000:]
    assert watched.stdout.startswith("no NVIDIA GPU found") and watched.stdout == plain.stdout


def test_recommend_list_and_dry_run_show_one_figure_per_recipe(cli):
    recommended = cli("recommend", "gpu_mem=12", "lang=zh", "--json", timeout=300)
    assert recommended.returncode == 0, recommended.stderr[-2000:]
    rows = json.loads(recommended.stdout)
    assert rows[0]["superseded_by"] is None  # Qwen-1 (superseded by Qwen2.5) is not the first choice
    current = [i for i, r in enumerate(rows) if r["superseded_by"] is None]
    assert max(current) < min(i for i, r in enumerate(rows) if r["superseded_by"] is not None)
    qwen1 = next(r for r in rows if r["recipe"] == "qwen1_7b_qlora")
    dry_run = cli("recipe=qwen1_7b_qlora", "--dry-run", timeout=300)
    estimate = cli("estimate", "recipe=qwen1_7b_qlora", "--json", timeout=300)
    assert estimate.returncode == 0, estimate.stderr[-2000:]
    assert qwen1["peak_bytes"] == json.loads(estimate.stdout)["peak_bytes"]
    peak_row = next(line for line in dry_run.stdout.splitlines() if line.split()[:1] == ["peak"])
    assert peak_row.split()[2] == f"{qwen1['peak_bytes'] / 2**30:.2f}"  # "peak │ 9.25 │ ..." (GiB)
    listed = cli("list", "models", "--json", timeout=300)
    row = next(r for r in json.loads(listed.stdout) if r["model"] == "qwen1_7b")
    assert row["qlora_gib@2048"] == round(qwen1["peak_bytes"] / 2**30, 1)


LONG_DIRECTORY = "a-directory-nested-deep-enough-that-its-commands-outrun-80-and-160-columns-" * 2
"""Makes the run's path over 170 characters: 80 columns is rich's width for a pipe, 160 the CLI's own."""


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, RunDir]:
    """One QLoRA step on the tiny Qwen2.5 with samples before and after, nothing held out (bitsandbytes and
    DeepSpeed are imported, as in every training run), in a directory whose path is longer than a log line."""
    path = tmp_path_factory.mktemp("qlora") / LONG_DIRECTORY / "run"
    done = subprocess.run([sys.executable, "-m", "finetune", "recipe=tiny_qwen2_5_qlora", "train.max_steps=1",
                           "data.max_samples=2", "data.val_size=0", "train.sample_prompts=1", f"output_dir={path}"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    return done, RunDir(path)


def test_qlora_run_prints_no_expected_library_noise(qlora_run):
    done, _ = qlora_run
    assert done.returncode == 0, done.stderr[-3000:]
    for line in NOISE:
        assert line not in done.stderr and line not in done.stdout, line


def test_next_command_stays_one_line_in_a_log(qlora_run):
    """stderr is a pipe here, as in a CI log or `2>&1 | tee`: a command wrapped there breaks when copied."""
    done, run = qlora_run
    assert done.returncode == 0, done.stderr[-3000:]
    command = f"finetune export run={run.path} to=ollama"
    assert len(str(run.path)) > 170
    assert any(line.split() == ["next", *command.split()] for line in done.stderr.splitlines()), done.stderr[-3000:]


def test_report_calls_samples_training_prompts_when_nothing_is_held_out(qlora_run):
    done, run = qlora_run
    assert done.returncode == 0, done.stderr[-3000:]
    report = run.report_file.read_text(encoding="utf-8")
    assert "## Samples of training prompts" in report and "held-out" not in report


@pytest.mark.llamacpp
def test_gguf_chat_runs_in_the_trained_context_window_without_an_overflow_warning(cli, tmp_path):
    pytest.importorskip("llama_cpp")
    run = tmp_path / LONG_DIRECTORY / "run"
    trained = cli("recipe=tiny_qwen2_5_demo", "train.max_steps=1", "data.max_samples=2", "train.sample_prompts=0",
                  f"output_dir={run}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    export = cli("export", f"run={run}", "to=gguf", "quant=f16", "verify=false", timeout=900)
    assert export.returncode == 0, export.stderr[-3000:]
    assert f"  finetune export run={run} to=ollama quant=f16   #" in export.stdout  # its `next:` line, unbroken
    done = cli("chat", f"run={run}", "backend=gguf", "quant=f16", "prompt=hi", "max_tokens=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "n_ctx_train" not in done.stderr and "overflow" not in done.stderr
    line = " ".join(done.stderr.split())  # the memory line, however the console wrapped it
    assert ("KV cache of a full 8,192-token context" in line
            and "trained for a 32,768-token context, llama.cpp runs it in a window of 8,192 tokens" in line)
