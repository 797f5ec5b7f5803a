"""Shared test setup: an isolated cache per test session, and the CLI as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models, converted checkpoints and tokenizers are cached across sessions unless CI says otherwise;
    # nothing may reach a model hub from the tests.
    os.environ.setdefault("FINETUNE_CACHE", str(REPO / ".cache" / "finetune"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS` exactly as a user runs it."""
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def cli():
    return run_cli
