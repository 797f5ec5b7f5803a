"""Outputs appear whole or not at all: write under a temporary name in the same directory, then rename.

A crash, Ctrl-C or error mid-way leaves only a `.tmp-*` name behind (removed when we can), never a file or
directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_path(final: Path, kind: str = "tmp") -> Path:
    """A name next to `final` that no other process or thread picks (pid and a random part), for a writer that
    makes the file or directory itself (a subprocess, a C library, a trainer saving a model). Nothing is created."""
    return final.with_name(f".{kind}-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextmanager
def directory(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `final`, on any error it is removed.

    `final` must not exist unless `replace` is true (then the old one is swapped out only after success).
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes 0700; a finished output is as readable as any directory the user makes
        if final.exists():
            old = temp_path(final, "old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_once(final: Path, build: Callable[[Path], Any], *, marker: str) -> Path:
    """A cache entry made once and shared: `final` as it is when `final/marker` exists; otherwise `build(path)`
    writes a new directory at a private temporary path, which is renamed to `final` when complete — or dropped when
    another process finished the same entry first (entries are keyed by content, so either copy is right)."""
    final = Path(final)
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        built = scratch / final.name
        build(built)
        built.chmod(0o755)  # a cache others may read
        try:
            os.rename(built, final)
        except OSError:  # `final` exists now: another process won the race
            if not (final / marker).exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def link_or_copy(src: Path, dst: Path) -> Path:
    """`dst` as a hard link to `src` when the filesystem allows (no second copy of a multi-GB file), else a copy
    under a temporary name renamed when complete."""
    dst = Path(dst)
    try:
        os.link(src, dst)
    except OSError:
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".tmp-{dst.name}-")
        os.close(fd)
        try:
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dst


def write_figure(path: Path, figure: Any, **savefig: Any) -> Path:
    """Save a matplotlib figure whole or not at all, and close it (charts are written once, at the end of a step)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        figure.savefig(tmp, **savefig)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
        Path(tmp).unlink(missing_ok=True)
    return path
