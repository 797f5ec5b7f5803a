"""`finetune eval` as a user runs it: a tiny trained run scored by BLEU/ROUGE and on a benchmark in C-Eval's layout,
its base model for the before/after, the files and the report section it leaves, and one clear line (exit 2) for
each kind of bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from finetune.evaluate import metrics

QUESTIONS = [("中国的首都是哪里？", "上海", "北京", "广州", "深圳", "B"), ("1+1等于几？", "1", "3", "2", "4", "C")]


def write_ceval(root: Path) -> Path:
    for split, rows in (("val", QUESTIONS), ("dev", QUESTIONS * 3)):
        path = root / split / f"computer_network_{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
            writer.writerows([i, *q, ""] for i, q in enumerate(rows))
    return root


@pytest.fixture(scope="module")
def run(chat_run, tmp_path_factory):
    """A copy of the shared tiny run (16 steps on two identity answers), so its eval/ and report.md are ours."""
    path = tmp_path_factory.mktemp("eval") / "tiny-eval"
    shutil.copytree(chat_run.path, path, ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    return path


def _ok(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_eval_scores_the_run_writes_results_and_compares_with_its_base(cli, run, tmp_path):
    done = _ok(cli("eval", f"run={run}", "eval.max_new_tokens=32"))
    assert "BLEU-4" in done.stdout and "ROUGE-L" in done.stdout
    assert "TRAINING" in done.stderr  # the demo holds nothing out: said, and recorded
    results = json.loads((run / "eval" / "results.json").read_text())
    gen = results["generation"]
    assert gen["count"] == 2 and "training data" in gen["data"]
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [set(r) >= {"messages", "reference", "prediction", "bleu-4", "rouge-l"} for r in rows] == [True, True]
    for name in metrics.METRICS:  # the summary is the mean of the rows, each the metric of its pair
        assert gen[name] == pytest.approx(sum(r[name] for r in rows) / 2, abs=1e-3)
        assert all(r[name] == metrics.score(r["prediction"], r["reference"])[name] for r in rows)
    assert (run / "eval" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "report.md").read_text()
    assert report.count("<!-- finetune eval -->") == 1 and "## Evaluation" in report and "eval/scores.png" in report
    assert report.startswith("# tiny-chat\n")  # the training report above it is kept

    again = cli("eval", f"run={run}")
    assert again.returncode == 2 and "already holds an evaluation" in again.stderr
    assert "Traceback" not in again.stderr

    _ok(cli("eval", f"run={run}", "base=true", "eval.max_new_tokens=32"))
    before = json.loads((run / "eval-base" / "results.json").read_text())["generation"]
    assert before["count"] == 2
    assert gen["rouge-l"] > before["rouge-l"]  # 16 steps on these very answers beat the random base
    report = (run / "report.md").read_text()
    assert report.count("<!-- finetune eval -->") == 1 and report.count("<!-- finetune eval-base -->") == 1
    assert "| metric | base model | after training |" in report


def test_eval_on_a_benchmark_in_ceval_layout(cli, run, tmp_path):
    bench = write_ceval(tmp_path / "ceval")
    done = _ok(cli("eval", f"run={run}", f"eval.dir={bench}", "eval.task=ceval", "eval.shots=5", "--force"))
    assert "ceval overall (5-shot, val)" in done.stdout
    results = json.loads((run / "eval" / "results.json").read_text())
    assert "generation" not in results
    mc = results["choice"]
    assert mc["subjects"]["computer_network"]["total"] == 2 and mc["overall"]["total"] == 2
    assert len((run / "eval" / "answers.jsonl").read_text().splitlines()) == 2
    assert (run / "report.md").read_text().count("<!-- finetune eval -->") == 1


def test_bad_input_is_one_clear_line(cli, run, tmp_path):
    bench = write_ceval(tmp_path / "ceval")
    (bench / "val" / "computer_network_val.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(run / "recipe.yaml", empty / "recipe.yaml")
    shutil.copy(run / "base.json", empty / "base.json")
    cases = [
        (("eval.task=ceval",), "add eval.dir=DIR"),
        ((f"eval.dir={tmp_path / 'missing'}", "eval.task=cmmlu"), "does not exist"),
        ((f"eval.dir={bench}", "eval.task=ceval"), "computer_network_val.csv: no column 'answer'"),
        ((f"eval.dir={bench}", "eval.task=cevl"), "unknown eval.task=cevl (did you mean: ceval?)"),
    ]
    for args, message in cases:
        done = cli("eval", f"run={run}", "overwrite=true", *args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    done = cli("eval", f"run={empty}")
    assert done.returncode == 2 and "has no adapter/ and no model/" in done.stderr
