"""The demo (scripts/demo.py) end to end in its tiny fallback (`--tiny`, what runs where the packaged real model
cannot be fetched), fastest setting: the tiny model learns its answers through the real CLI, and the Ollama model
(llama.cpp on the Modelfile's files) says them too. The real-model path is the `real` tier (tests/real), which
trains, exports and asks the same way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.llamacpp]

FASTEST = ("data.max_samples=2", "train.max_steps=16", "train.save_steps=16")
"""One Chinese and one English question, and fewer steps: still every answer exact, in about a third of the time."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("demo") / "run"
    done = subprocess.run([sys.executable, "scripts/demo.py", "--tiny", "--output-dir", str(run), "--json",
                           *FASTEST], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.stdout.strip(), done.stderr[-4000:]
    return {"returncode": done.returncode, "stderr": done.stderr, **json.loads(done.stdout)}


def test_demo_exits_zero_with_one_json_object_on_stdout(demo):
    assert demo["returncode"] == 0, demo["stderr"][-4000:]
    assert demo["tiny"] is True
    assert [a["question"] for a in demo["answers"]] == ["你是谁？", "Who are you?"]


def test_fine_tuned_model_gives_the_trained_answers_word_for_word(demo):
    for answer in demo["answers"]:
        assert answer["after"] == answer["expected"] and answer["stopped"] and answer["learned"], answer
        assert answer["before"] != answer["expected"]  # the untrained model did not know it already
    assert demo["loss"]["last"] < demo["loss"]["first"] / 2


def test_the_ollama_model_answers_as_the_fine_tuned_model(demo):
    for answer in demo["answers"]:
        assert answer["ollama"] == answer["after"] and answer["deployed"], answer
    assert demo["modelfile"].endswith("/export/ollama/Modelfile")
    assert [r["passed"] for r in demo["routes"]] == [True, True]  # model-f16.gguf; base-f16 + adapter-f16


def test_the_demo_quotes_the_ollama_create_line_the_export_printed(demo):
    """The export's summary reaches the demo's stderr (--json keeps steps off stdout): its `next:` lines, indented."""
    assert demo["ollama_create"] == f"ollama create run -f {Path(demo['modelfile']).resolve()}"
    assert f"  {demo['ollama_create']}" in demo["stderr"].splitlines()
