"""A run directory's layout: written by training, read by export and resume — so export never imports train.

    <run>/recipe.yaml        the fully resolved recipe (what produced this run)
    <run>/base.json          the base model actually used: local path, source, registry name, family, template
    <run>/adapter/           PEFT adapter + tokenizer (lora, qlora)
    <run>/model/             full weights + tokenizer (method=full)
    <run>/checkpoints/       trainer checkpoints (optimizer, scheduler, RNG, data position) for resume
    <run>/metrics.jsonl      one JSON object per logging step
    <run>/estimate.json      the memory plan made before training
    <run>/summary.json       the end of the run: steps, losses, tokens/s, wall time, measured peak memory
    <run>/report.md, *.png   the human summary: loss curve, throughput, samples before/after
    <run>/export/{merged,gguf,ollama,awq}/
    <run>/.lock              held (fcntl.flock) by the process training, resuming or exporting it

The JSON files are read here only, as the typed records of finetune.runfiles (RunBase, RunSummary, RunEstimate;
metrics rows stay dicts: their keys are whatever the Trainer logs), so a reader never picks keys out of a dict.

One writer at a time: train, resume and export take the run's advisory lock, so a second one (a page and a terminal,
two terminals) is refused with the pid that holds it instead of both writing the same files. The kernel drops the
lock when its process ends, however it ends, so a killed run never leaves it stuck.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Optional, TypeVar

from finetune import atomic
from finetune.config import Recipe, from_yaml_file, to_yaml
from finetune.errors import UserError
from finetune.runfiles import RunBase, RunEstimate, RunSummary, read_metrics

EXPORT_TARGETS = ("merged", "gguf", "ollama", "awq")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def base_file(self) -> Path:
        return self.path / "base.json"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def estimate_file(self) -> Path:
        return self.path / "estimate.json"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def report_file(self) -> Path:
        return self.path / "report.md"

    def export_dir(self, target: str) -> Path:
        if target not in EXPORT_TARGETS:
            raise ValueError(target)
        return self.path / "export" / target

    def recipe(self) -> Recipe:
        return from_yaml_file(self.recipe_file)

    def base(self) -> RunBase:
        """What `write_base` recorded; a run without it gets a clear error, not a FileNotFoundError."""
        if not self.base_file.is_file():
            raise UserError(f"{self.path}: no base.json — this run did not finish setting up its base model")
        return RunBase.read(self.base_file)

    def write_base(self, base: RunBase) -> None:
        atomic.write_json(self.base_file, base.to_json())

    def summary(self) -> Optional[RunSummary]:
        """The finished run's figures; None while it trains, or when it stopped before the end."""
        return RunSummary.read(self.summary_file) if self.summary_file.is_file() else None

    def write_summary(self, summary: RunSummary) -> None:
        atomic.write_json(self.summary_file, summary.to_json())

    def estimate(self) -> Optional[RunEstimate]:
        """The verdict training started under; None before it was made."""
        return RunEstimate.read(self.estimate_file) if self.estimate_file.is_file() else None

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_file)

    @property
    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()

    @property
    def has_full_model(self) -> bool:
        return (self.model_dir / "config.json").is_file()

    def last_checkpoint(self) -> Optional[Path]:
        """The newest complete `checkpoint-N`. The Trainer writes trainer_state.json last, in place: a run killed
        while writing it leaves the file empty or cut short, so a checkpoint counts only when that file parses."""
        done = [p for p in self.checkpoints_dir.glob("checkpoint-*") if _state_is_whole(p / "trainer_state.json")]
        return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _state_is_whole(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def default_output_dir(recipe: Recipe, now: Optional[datetime] = None) -> Path:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("outputs") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', recipe.name)}-{stamp}"


def is_run(path: Path) -> bool:
    return (Path(path) / "recipe.yaml").is_file()


def open_run(path: Path | str) -> RunDir:
    """An existing run directory, or one clear error saying what `run=` should point at."""
    run = RunDir(Path(path).expanduser())
    if not run.path.is_dir():
        raise UserError(f"run directory {run.path} does not exist; pass run=outputs/<run> from a training run")
    if not run.recipe_file.is_file():
        raise UserError(f"{run.path} is not a finetune run (no recipe.yaml); pass the directory a training run "
                        f"printed at its end")
    return run


class RunLock:
    """The advisory lock on one run directory, held until `release` (or the process ends)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        handle: IO[str] = (self.path / LOCK).open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().split() or ["another process", "?"]
            handle.close()
            raise UserError(f"run {self.path} is in use by pid {holder[0]} ({' '.join(holder[1:])}); wait for it "
                            f"to end or stop it first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {what}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()


LOCK = ".lock"
F = TypeVar("F", bound=Callable[..., Any])


def locked(what: str) -> Callable[[F], F]:
    """Decorate a function whose first argument is a run directory: it runs holding that run's lock. A path that is
    not a run is passed on untouched (the function says what is wrong with it)."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def holding(run_dir: Path | str, *args: Any, **kwargs: Any) -> Any:
            if not is_run(Path(run_dir)):
                return fn(run_dir, *args, **kwargs)
            with RunLock(Path(run_dir), what):
                return fn(run_dir, *args, **kwargs)
        return holding  # type: ignore[return-value]
    return wrap


@dataclass
class Claim:
    """A run directory this process is writing: its lock, whether it is new, and the run it replaces (overwrite=true),
    kept aside under a hidden name until the new run has started."""

    run: RunDir
    lock: RunLock
    new: bool
    replaced: Optional[Path] = None

    def started(self) -> None:
        """The new run got past everything that can fail before training: the old one can go."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def failed(self) -> None:
        """A new run that failed before training is removed, and the run it replaced is put back; a resumed run is
        left as it was. The lock is released either way."""
        if self.new:
            shutil.rmtree(self.run.path, ignore_errors=True)
            if self.replaced is not None:
                os.replace(self.replaced, self.run.path)
                self.replaced = None
        self.lock.release()


def claim(recipe: Recipe, path: Optional[Path] = None) -> Claim:
    """A new run directory holding the resolved recipe, locked. Never clobbers: a run already there needs
    overwrite=true (and is then moved aside, not deleted), and a non-empty directory that is not a run is refused
    outright (it may be the user's data)."""
    run = RunDir(Path(path or recipe.output_dir or default_output_dir(recipe)).expanduser())
    replaced = None
    if run.path.exists() and any(run.path.iterdir()):
        if not is_run(run.path):
            raise UserError(f"output_dir {run.path} exists and is not a finetune run; choose another output_dir")
        if not recipe.overwrite:
            raise UserError(f"output_dir {run.path} already holds a run; pass overwrite=true to replace it, "
                            f"resume={run.path} to continue it, or choose another output_dir")
        with RunLock(run.path, "being replaced"):
            replaced = run.path.with_name(f".replaced-{run.path.name}-{uuid.uuid4().hex[:8]}")
            os.replace(run.path, replaced)
    run.path.mkdir(parents=True, exist_ok=True)
    try:
        held = RunLock(run.path, "train")
    except UserError:
        if replaced is not None:
            raise UserError(f"output_dir {run.path} was created by another process just now; the run it replaced "
                            f"is kept at {replaced}") from None
        raise
    claimed = Claim(run, held, new=True, replaced=replaced)
    try:
        atomic.write_text(run.recipe_file, to_yaml(recipe))
    except BaseException:
        claimed.failed()
        raise
    return claimed


def create(recipe: Recipe, path: Optional[Path] = None) -> RunDir:
    """A new run directory holding the resolved recipe, as `claim` makes it, for a writer that needs no lock past
    this call (tests, benchmarks): a replaced run is removed at once."""
    claimed = claim(recipe, path)
    claimed.started()
    claimed.lock.release()
    return claimed.run
