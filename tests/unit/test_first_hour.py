"""The first-hour defects, at the unit that decides them: the tokenizer `finetune data` uses without a download,
the ranking of a superseded model, what report.md calls its samples, and the filters that quiet expected noise."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
from datasets import Dataset

from finetune import quiet
from finetune.estimate import gpu, recommend
from finetune.models import registry, tokenizers
from finetune.rundir import RunDir
from finetune.runfiles import RunSummary
from finetune.train import report

SUMMARY = RunSummary(model="tiny_qwen2_5", source="tiny model built locally", method="lora", stage="sft",
                     world_size=1, device="cpu", global_step=1, train_runtime_s=1.0, wall_s=2.0,
                     next="finetune export run=x to=ollama", weights="x/adapter")


def test_a_registry_variant_is_tokenized_from_shipped_files_with_its_own_eos():
    instruct = tokenizers.for_variant(registry.spec("qwen2_5_7b", "instruct"))
    base = tokenizers.for_variant(registry.spec("qwen2_5_7b", "base"))
    assert instruct.eos_token == "<|im_end|>" and base.eos_token == "<|endoftext|>"  # as each repo publishes
    assert base("你好").input_ids == instruct("你好").input_ids


def test_a_variant_with_its_own_vocabulary_is_not_tokenized_from_shipped_files():
    assert tokenizers.for_variant(registry.spec("llama2_7b", "zh")) is None  # Chinese-LLaMA-2: 55,296 pieces


def test_a_superseded_model_ranks_after_every_current_one():
    rows = recommend.recommend(12, "zh", None)
    superseded = [i for i, r in enumerate(rows) if r["superseded_by"]]
    assert {rows[i]["model"] for i in superseded} == {"qwen1_7b"}
    assert min(superseded) > max(i for i, r in enumerate(rows) if not r["superseded_by"])


def _samples(splits: dict) -> list[report.Sample]:
    tokenizer = tokenizers.bundled_tokenizer("qwen2_5")
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n").input_ids
    start = ids.index(tokenizer.convert_tokens_to_ids("<|im_start|>"), 1) + 3  # after "assistant\n"
    row = {"input_ids": [ids], "labels": [[-100] * start + ids[start:]]}
    return report.held_out({name: Dataset.from_dict(row) for name in splits}, 1)


def _report(tmp_path, samples: list[report.Sample]) -> str:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    report.write(run, SUMMARY, samples, tokenizers.bundled_tokenizer("qwen2_5"))
    return run.report_file.read_text(encoding="utf-8")


def test_report_calls_training_examples_training_prompts(tmp_path):
    text = _report(tmp_path, _samples({"train": None}))
    assert "## Samples of training prompts" in text and "held-out" not in text


def test_report_calls_eval_examples_held_out_prompts(tmp_path):
    text = _report(tmp_path, _samples({"train": None, "eval": None}))
    assert "## Samples of held-out prompts" in text and "training prompts" not in text


def _record(logger: str, message: str, *args: object) -> logging.LogRecord:
    return logging.getLogger(logger).makeRecord(logger, logging.WARNING, __file__, 1, message, args, None)


def test_expected_library_lines_are_filtered_and_actionable_ones_kept():
    quiet.install()
    quiet.install()  # idempotent: one filter per line
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == len(quiet.EXPECTED["bitsandbytes.backends.cpu.ops"])
    failed = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."
    assert not bnb.filter(_record(bnb.name, failed, ModuleNotFoundError("No module named 'kernels'")))
    assert bnb.filter(_record(bnb.name, failed, RuntimeError("kernels 0.10 is too old")))
    assert bnb.filter(_record(bnb.name, "some other warning"))


DEEPSPEED_CPU = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
"""DeepSpeed's line at import (deepspeed/accelerator/real_accelerator.py), logged on its "DeepSpeed" logger."""


def _one_card_driver() -> SimpleNamespace:
    """A stand-in for NVIDIA's driver library (pynvml) on a machine with one idle 24 GiB card: what gpu.detect asks
    of NVML, so detection itself runs as it does on such a machine."""
    class NVMLError(Exception):
        pass

    return SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: b"NVIDIA L4",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=24 * 2**30, free=24 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=0),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [], nvmlDeviceGetGraphicsRunningProcesses=lambda h: [])


@pytest.mark.skipif(bool(gpu.detect()), reason="this machine has a GPU: DeepSpeed's CPU line is news here")
def test_deepspeed_cpu_line_is_dropped_only_where_finetune_sees_no_gpu(monkeypatch):
    quiet.install()
    deepspeed = logging.getLogger("DeepSpeed")
    assert not deepspeed.filter(_record(deepspeed.name, DEEPSPEED_CPU))  # no GPU here: the line is expected
    monkeypatch.setitem(sys.modules, "pynvml", _one_card_driver())
    assert [g.name for g in gpu.detect()] == ["NVIDIA L4"]
    assert deepspeed.filter(_record(deepspeed.name, DEEPSPEED_CPU))  # DeepSpeed missed a GPU finetune sees: kept
    assert deepspeed.filter(_record(deepspeed.name, "some other warning"))
