"""The web page's callbacks as plain functions (no browser, no gradio needed): the estimate a page shows for its
fields, the same one-line errors as the CLI, the recipe YAML, runs listed from a run directory, live metrics."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from finetune import config
from finetune.errors import UserError
from finetune.estimate import gpu, report
from finetune.models import registry
from finetune.rundir import RunDir
from finetune.web import actions, forms, jobs, labels, runs

GiB = 2**30


def test_both_languages_label_the_same_things():
    assert set(labels.LABELS["en"]) == set(labels.LABELS["zh"])
    assert labels.label("zh", "tab_train") == "训练" and labels.label("en", "tab_train") == "Train"


def test_fields_of_a_shipped_recipe_become_no_overrides_and_a_change_becomes_one():
    fields = forms.fields_of("tiny_qwen2_5_demo")
    assert fields["model"] == "tiny_qwen2_5_demo" and fields["lora_r"] == 32 and fields["micro_batch"] == 8
    assert forms.overrides("tiny_qwen2_5_demo", fields) == []
    changed = {**fields, "lora_r": 8.0, "gpu_mem": 24}  # gr.Number gives floats
    assert forms.overrides("tiny_qwen2_5_demo", changed, "train.max_steps=2 --force") == \
        ["lora.r=8", "gpu_mem=24", "train.max_steps=2"]
    assert forms.split_extra("train.max_steps=2 --force") == (["train.max_steps=2"], ["--force"])


def test_estimate_of_a_shipped_recipe_is_the_cli_estimate_with_chart_and_yaml(tmp_path):
    from PIL import Image

    view = forms.estimate("tiny_qwen2_5_demo", {"gpu_mem": 24}, None, tmp_path)
    want = report.estimate_report(config.load("tiny_qwen2_5_demo", ["gpu_mem=24"]),
                                  registry.spec("tiny_qwen2_5_demo"), gpu.detect(), gpu_mem=24)
    assert view.error is None and view.fits is True
    assert view.verdict.splitlines()[0] == want["verdict"] and view.verdict.startswith("fits:")
    assert view.report["peak_bytes"] == want["peak_bytes"]
    with Image.open(view.chart) as image:  # the estimator's own PNG, not blank
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 16
    assert view.yaml == config.to_yaml(config.load("tiny_qwen2_5_demo", ["gpu_mem=24"]))
    assert open(view.yaml_file, encoding="utf-8").read() == view.yaml
    assert config.from_yaml_file(tmp_path / "tiny_qwen2_5_demo.yaml").model == "tiny_qwen2_5_demo"
    assert view.command == "finetune estimate recipe=tiny_qwen2_5_demo gpu_mem=24"


def test_a_recipe_that_does_not_fit_shows_the_ranked_fixes(tmp_path):
    view = forms.estimate("qwen7b_lora", {"gpu_mem": 8}, None, tmp_path)
    want = report.estimate_report(config.load("qwen7b_lora", ["gpu_mem=8"]), registry.spec("qwen2_5_7b"),
                                  gpu.detect(), gpu_mem=8)
    assert view.fits is False and view.verdict.startswith("does not fit")
    assert [row[0] for row in view.suggestions] == [s["change"] for s in want["suggestions"]]
    assert view.suggestions and all(row[1].endswith("GiB") for row in view.suggestions)


def test_fields_without_a_recipe_build_one():
    view = forms.estimate(None, {"model": "qwen2_5_7b", "method": "qlora", "gpu_mem": 24})
    assert view.error is None and view.fits is True and "method=qlora" in view.command


@pytest.mark.parametrize("recipe,fields,extra,cli_args", [
    ("qwen7b_lora", {"method": "lorra"}, None, ["method=lorra"]),
    ("qwen7b_lora", {}, "lora.rnk=8", ["lora.rnk=8"]),
    ("qwen7b_lora", {"max_length": -5}, None, ["train.max_length=-5"]),
    ("qwen7b_lora", {"variant": "nope"}, None, ["variant=nope"]),
])
def test_bad_input_is_the_cli_one_line_message(recipe, fields, extra, cli_args):
    with pytest.raises(UserError) as cli:
        config.load(recipe, cli_args)  # what `finetune estimate recipe=... KEY=VALUE` prints after "error: "
    view = forms.estimate(recipe, fields, extra)
    assert view.error == f"error: {cli.value}" and "\n" not in view.error and view.chart is None


def test_no_recipe_and_no_model_says_what_the_cli_says():
    assert forms.estimate(None, {}).error == \
        "error: no recipe given: add recipe=NAME (`finetune list recipes`) or at least model=NAME"


def _fake_run(path, rows, checkpoint=None, finished=False):
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(config.to_yaml(config.load("tiny_qwen2_5_demo")))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    (path / "estimate.json").write_text(json.dumps({"fits": None, "verdict": "no GPU found", "peak_bytes": 12 * GiB}))
    if checkpoint:
        (path / "checkpoints" / f"checkpoint-{checkpoint}").mkdir(parents=True)
        (path / "checkpoints" / f"checkpoint-{checkpoint}" / "trainer_state.json").write_text("{}")
    if finished:
        (path / "summary.json").write_text("{}")
        (path / "report.md").write_text("# the report\n")


ROWS = [{"step": 2, "elapsed_s": 1.0, "loss": 2.5, "num_tokens": 100.0, "gpu_reserved_bytes": 10 * GiB,
         "gpu_peak_reserved_bytes": 11 * GiB},
        {"step": 4, "elapsed_s": 3.0, "loss": 2.0, "num_tokens": 500.0, "gpu_reserved_bytes": 9 * GiB,
         "gpu_peak_reserved_bytes": 11.5 * GiB},
        {"step": 4, "elapsed_s": 3.5, "train_loss": 2.2, "train_runtime": 3.4}]


def test_metrics_parse_into_loss_throughput_and_memory_vs_estimate(tmp_path):
    _fake_run(tmp_path / "run", ROWS)
    rows = RunDir(tmp_path / "run").metrics()
    assert len(rows) == 3  # the half-written last line is skipped
    p = runs.watched(tmp_path / "run")
    assert p["step"] == 4 and p["loss"] == 2.0 and p["tokens_per_s"] == 200.0
    assert p["losses"] == [(2, 2.5), (4, 2.0)]
    assert runs.progress_text(p) == \
        "step 4 · loss 2 · 200 tokens/s · GPU 9.00 GiB now / 11.50 peak (estimate 12.00 GiB)"
    cpu = runs.progress([{k: v for k, v in r.items() if not k.startswith("gpu")} for r in rows])
    assert "not measured on CPU (no estimate)" in runs.progress_text(cpu)


def test_runs_are_listed_with_status_and_report(tmp_path):
    _fake_run(tmp_path / "outputs" / "a-run", ROWS, checkpoint=4)
    _fake_run(tmp_path / "outputs" / "b-run", ROWS[:1], finished=True)
    (tmp_path / "outputs" / "not-a-run").mkdir()
    (tmp_path / "outputs" / "a-run.web.log").write_text("log")
    listed = {r["run"]: r for r in runs.list_runs(tmp_path / "outputs")}
    assert set(listed) == {"a-run", "b-run"}
    assert listed["a-run"]["status"] == "stopped at checkpoint-4 (resumable)" and listed["a-run"]["step"] == 4
    assert listed["b-run"]["status"] == "finished" and listed["b-run"]["loss"] == 2.5 and listed["b-run"]["report"]
    assert runs.report_text(str(tmp_path / "outputs"), listed["b-run"]["path"]) == "# the report\n"
    assert "no report.md yet" in runs.report_text(str(tmp_path / "outputs"), listed["a-run"]["path"])
    assert runs.list_runs(tmp_path / "missing") == []


def test_log_tail_shows_progress_bars_as_a_terminal_does(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("loading\n 10%|#  | 1/10\r 50%|### | 5/10\r100%|####| 10/10\nnext:\n"
                   "  ollama create tiny -f /tmp/run/export/ollama/Modelfile\n")
    assert jobs.log_tail(log, 3) == "100%|####| 10/10\nnext:\n  ollama create tiny -f /tmp/run/export/ollama/Modelfile"
    assert jobs.ollama_create(log.read_text()) == "ollama create tiny -f /tmp/run/export/ollama/Modelfile"
    assert jobs.ollama_create("export of run → merged") is None


def test_bad_input_starts_no_process(tmp_path):
    before = jobs.JOBS.get("train")
    message, run = actions.start_training(str(tmp_path), "qwen7b_lora", {"method": "lorra"}, None, None)
    assert message.startswith("error: overrides: method=lorra is not one of") and run is None
    assert jobs.JOBS.get("train") is before
    _fake_run(tmp_path / "r", ROWS)
    assert actions.resume_training(str(tmp_path), str(tmp_path / "r"))[0] == f"error: resume={tmp_path / 'r'}: it has no complete " \
        "checkpoint yet"
    assert actions.start_export(str(tmp_path), str(tmp_path / "nope"), "merged", None).startswith(
        "error: run directory")


def test_a_job_runs_the_cli_in_the_background_and_stops_with_sigint(tmp_path):
    job = jobs.start("test", ["list", "recipes"], tmp_path / "list.log")
    assert job.argv[:3] == [sys.executable, "-m", "finetune"]
    job.process.wait(timeout=300)
    assert job.state() == "done" and "tiny_qwen2_5_demo" in job.tail(400)


def test_the_package_imports_without_gradio_and_says_how_to_get_it(monkeypatch):
    from finetune.web import app  # gradio is imported only when the page is built

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'finetune\[web\]'"):
        app.serve(app.WebOptions())


def test_web_command_checks_its_keys(capsys):
    from finetune import cli

    assert cli.main(["web", "prot=1"]) == 2
    assert "unknown key 'prot'" in capsys.readouterr().err
