"""Unit-test fixtures shared across files."""

from __future__ import annotations

import pytest

from published import Converted, publish_and_convert


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(name) -> Converted: each tiny original checkpoint published and converted once per session."""
    done: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in done:
            done[name] = publish_and_convert(name, tmp_path_factory.mktemp(name))
        return done[name]

    return get
