"""What a run reports about its memory: on a CPU, what training added to the process's RSS (measured from the
moment training starts, not the process's all-time peak), next to the estimate's terms above the weights."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from finetune.runfiles import RunSummary
from finetune.train import callbacks, report

MiB = 2**20

SUMMARY = RunSummary(model="qwen2_5_0_5b", source="hub", method="lora", stage="sft", world_size=1, device="cpu",
                     global_step=1, train_runtime_s=1.0, wall_s=2.0, next="finetune export run=x to=ollama",
                     weights="x/adapter", estimate_peak_bytes=5 * 2**30, estimate_training_bytes=3 * 2**30)


def _touched(mib: int) -> torch.Tensor:
    return torch.ones(mib * MiB, dtype=torch.uint8)  # written: resident, not just reserved


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is restarted through Linux's /proc")
def test_cpu_peak_counts_what_training_adds_not_what_came_before():
    before = _touched(512)  # model loading's transient copies: resident, then gone before training
    del before
    peak = callbacks.PeakMemory()
    peak.on_train_begin(None, None, None)
    during = _touched(128)
    del during
    peak.on_train_end(None, None, None)
    added = peak.peak["host_peak_rss_bytes"] - peak.peak["host_rss_at_train_start_bytes"]
    assert 120 * MiB <= added < 384 * MiB, added / MiB  # the 128 MiB, not the 512 MiB before


def test_a_cpu_report_sets_the_rss_growth_against_the_estimate_above_the_weights():
    summary = dataclasses.replace(SUMMARY, memory={"host_rss_at_train_start_bytes": 2 * 2**30,
                                                    "host_peak_rss_bytes": 5 * 2**30})
    rows = dict(report.memory_rows(summary))
    assert rows["estimate: training on top of the loaded weights (no CUDA context)"] == "3.00 GiB"
    assert rows["measured: peak RSS while training − RSS when it started (CPU process)"] == "3.00 GiB"


def test_a_gpu_report_sets_the_reserved_peak_against_the_estimate():
    summary = dataclasses.replace(SUMMARY, device="cuda", memory={"gpu_peak_reserved_bytes": 6 * 2**30})
    assert report.memory_rows(summary) == [("memory estimate (per GPU)", "5.00 GiB"),
                                          ("measured peak (CUDA reserved)", "6.00 GiB")]


def test_training_bytes_are_the_estimate_without_weights_and_cuda_overhead():
    breakdown = {"weights": 10, "trainable_weights": 1, "gradients": 2, "optimizer": 4, "activations": 8,
                 "logits": 16, "overhead": 32}
    assert report.training_bytes({"breakdown": breakdown}) == 30
    assert report.training_bytes({"verdict": "no estimate"}) is None
