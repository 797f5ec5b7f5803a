"""Shared test setup: an isolated cache per test session, and the CLI as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models, converted checkpoints and tokenizers are cached (keyed by content) in the usual cache;
    # the tests never reach a model hub: tiny models are built locally.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        # pytest-xdist workers share the cores: one thread per process (and the CLIs it starts) instead of
        # OpenMP pools that spin against each other. Tiny models gain nothing from intra-op threads.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")


LONGEST_FIRST = ("test_distributed.py", "test_real_lora.py", "test_distributed_memory.py", "test_real_qlora.py",
                 "test_stages.py", "test_web.py", "test_export.py", "test_train.py", "test_first_hour_cli.py",
                 "test_resume.py", "test_chat.py", "test_demo.py")
"""The test files that take longest (minutes each), started first so that pytest-xdist's workers finish together
instead of one running the browser test alone at the end (scripts/test.sh keeps this order: --no-loadscope-reorder)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e and tests/real runs the CLI or a whole pipeline in subprocesses: `-m "not e2e"` is
    the fast loop; tests/real is also `real` (`-m real` runs that tier alone)."""
    e2e, real = REPO / "tests" / "e2e", REPO / "tests" / "real"
    for item in items:
        parents = Path(item.path).parents
        if e2e in parents or real in parents:
            item.add_marker(pytest.mark.e2e)
        if real in parents:
            item.add_marker(pytest.mark.real)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.path).name, len(rank)))  # stable: the rest keep their order


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS` exactly as a user runs it."""
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def multi_turn_chat() -> list[dict]:
    """The conversation the template tests render: a system prompt, Chinese and English, a newline inside a
    message, two answered turns, ending with a user turn (an inference prompt)."""
    return [
        {"role": "system", "content": "你是一个乐于助人的助手。Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "长城有多长？\nGive a number."},
        {"role": "assistant", "content": "About 21,196 km."},
        {"role": "user", "content": "Thanks! And the Nile?"},
    ]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(template, messages) -> text: an Ollama TEMPLATE rendered by Go's own text/template (tests/gotmpl,
    built once; Debian's golang-go in CI), the way Ollama renders it."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install -y golang-go); it renders the Ollama templates")
    binary = tmp_path_factory.mktemp("gotmpl") / "gotmpl"
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=REPO / "tests" / "gotmpl", check=True,
                   capture_output=True)

    def render(template: str, messages: list[dict]) -> str:
        return subprocess.run([str(binary)], input=json.dumps({"template": template, "messages": messages}),
                              capture_output=True, text=True, check=True).stdout

    return render
