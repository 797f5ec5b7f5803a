"""Outputs appear whole or not at all; a shared cache entry is built once, and a lost race is not an error."""

from __future__ import annotations

import pytest

from finetune import atomic


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
