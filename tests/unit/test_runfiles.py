"""A run's JSON files read back as typed records: runs written before the records existed load unchanged, a file
that is missing or broken is one clear error, and metrics.jsonl's cut-short last line is skipped by its one reader."""

from __future__ import annotations

import json

import pytest

from finetune import config, rundir
from finetune.errors import UserError
from finetune.runfiles import RunBase, RunEstimate, RunSummary
from finetune.train import callbacks


@pytest.fixture
def run(tmp_path):
    return rundir.create(config.load(None, ["model=tiny_qwen2_5"]), tmp_path / "run")


OLD_BASE = {"path": "/models/qwen", "source": "local directory", "model": "qwen2_5_7b", "variant": "instruct",
            "family": "qwen2_5", "template": "qwen2_5", "native_class": "Qwen2ForCausalLM", "method": "lora"}
"""base.json exactly as training wrote it before RunBase existed."""


def test_base_json_written_before_the_record_reads_back_field_by_field(run):
    run.base_file.write_text(json.dumps(OLD_BASE))
    assert run.base() == RunBase(**OLD_BASE)
    run.write_base(run.base())
    assert json.loads(run.base_file.read_text()) == OLD_BASE  # the same JSON on disk


def test_base_json_with_only_a_path_or_unknown_keys_still_loads(run):
    run.base_file.write_text(json.dumps({"path": "~/models/x", "added_later": 1}))
    base = run.base()
    assert base.template is None and base.model is None
    assert base.directory == base.directory.expanduser() and "~" not in str(base.directory)


def test_base_json_missing_broken_or_without_a_path_is_a_clear_error(run):
    with pytest.raises(UserError, match="no base.json"):
        run.base()
    run.base_file.write_text('{"path": "/m", "mod')
    with pytest.raises(UserError, match="base.json is not valid JSON"):
        run.base()
    run.base_file.write_text(json.dumps({"model": "x"}))
    with pytest.raises(UserError, match="base.json has no 'path'"):
        run.base()


SUMMARY = {"status": "finished", "model": "tiny_qwen2_5", "source": "tiny", "method": "lora", "stage": "sft",
           "world_size": 1, "device": "cpu", "global_step": 4, "final_loss": 2.5, "final_eval_loss": None,
           "train_loss": 2.7, "train_runtime_s": 3.5, "train_tokens": 1000, "tokens_per_second": 285.7,
           "wall_s": 9.0, "estimate_peak_bytes": None, "memory": {"host_peak_rss_bytes": 123},
           "resumed_from": None, "next": "finetune export run=x to=ollama",
           "ranks": [{"rank": 0, "pid": 1, "global_step": 4, "device": "cpu", "engine": "NO"}],
           "weights": "x/adapter"}
"""summary.json as training wrote it before RunSummary existed (no trust_remote_code key unless it was on, no
estimate_training_bytes: older runs read back with None)."""


def test_summary_reads_back_and_a_run_still_training_has_none(run):
    assert run.summary() is None
    run.summary_file.write_text(json.dumps(SUMMARY))
    summary = run.summary()
    assert summary.global_step == 4 and summary.memory == {"host_peak_rss_bytes": 123}
    assert summary.trust_remote_code is False
    run.write_summary(summary)
    assert json.loads(run.summary_file.read_text()) == {**SUMMARY, "trust_remote_code": False,
                                                         "estimate_training_bytes": None}
    assert RunSummary(**{**SUMMARY, "trust_remote_code": True}).to_json()["trust_remote_code"] is True


def test_estimate_is_read_as_the_verdict_and_peak_of_the_whole_estimate(run):
    assert run.estimate() is None
    run.estimate_file.write_text(json.dumps({"model": "tiny_qwen2_5", "peak_bytes": 5, "fits": True, "verdict": "fits",
                                             "forced": False, "breakdown": {"weights": 5}}))
    assert run.estimate() == RunEstimate(verdict="fits", fits=True, peak_bytes=5)
    run.estimate_file.write_text(json.dumps({"fits": None, "verdict": "not in the registry: no memory estimate"}))
    assert run.estimate().peak_bytes is None


def test_metrics_skip_a_line_cut_short_and_resume_drops_it_with_the_later_steps(run):
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "grad_norm": float("nan")}, {"step": 3, "loss": 1.0}]
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]
    callbacks.keep_metrics_until(run.metrics_file, 2)
    assert [r["step"] for r in run.metrics()] == [1, 2]
    assert run.metrics_file.read_text().endswith("\n") and "NaN" in run.metrics_file.read_text()
