"""Outputs appear whole or not at all; a shared cache entry is built once, and a lost race is not an error; two
writers of one output never share a temporary name."""

from __future__ import annotations

import os

import pytest

from finetune import atomic
from finetune.export import gguf


def _writer(calls: list[str], text: str = "ok"):
    def build(path):
        calls.append(str(path))
        path.mkdir()
        (path / "done").write_text(text)
    return build


def test_build_once_builds_then_reuses(tmp_path):
    calls: list[str] = []
    final = tmp_path / "cache" / "entry-abc"
    assert atomic.build_once(final, _writer(calls), marker="done") == final
    assert atomic.build_once(final, _writer(calls), marker="done") == final
    assert len(calls) == 1 and (final / "done").read_text() == "ok"
    assert [p.name for p in final.parent.iterdir()] == ["entry-abc"]  # no temporary left behind


def test_build_once_keeps_the_entry_another_process_finished_first(tmp_path):
    final = tmp_path / "entry"

    def racing(path):  # while we build, someone else completes the same entry
        _writer([], "theirs")(final)
        _writer([], "ours")(path)

    assert atomic.build_once(final, racing, marker="done") == final
    assert (final / "done").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_build_once_failure_leaves_nothing_that_looks_finished(tmp_path):
    def broken(path):
        path.mkdir()
        (path / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.build_once(tmp_path / "entry", broken, marker="done")
    assert list(tmp_path.iterdir()) == []


def test_directory_refuses_to_clobber_unless_asked(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        with atomic.directory(tmp_path / "out"):
            pass
    with atomic.directory(tmp_path / "out", replace=True) as tmp:
        (tmp / "new").write_text("1")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


def test_two_writers_of_one_gguf_file_have_their_own_temporary_names(tmp_path):
    """An export from the page and one from the command line may write the same file at once: with one fixed
    temporary name, the second truncated (or, failing, removed) the file the first was still writing."""
    out = tmp_path / "model.gguf"
    with gguf.atomic_file(out) as first, gguf.atomic_file(out) as second:
        assert first != second and first.parent == second.parent == tmp_path
        assert first.name.startswith(f".tmp-model.gguf-{os.getpid()}-")
        first.write_text("first")
        second.write_text("second")
        assert first.read_text() == "first"
    assert out.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    with gguf.atomic_file(out) as kept:
        kept.write_text("whole")
        with pytest.raises(RuntimeError, match="quantizer died"), gguf.atomic_file(out) as failed:
            failed.write_text("half")
            raise RuntimeError("quantizer died")
        assert kept.read_text() == "whole"
    assert out.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
