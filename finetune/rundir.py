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
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from finetune import atomic
from finetune.config import Recipe, from_yaml_file, to_yaml
from finetune.errors import UserError

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

    def base(self) -> dict[str, Any]:
        """What `write_base` recorded; a run trained before this key existed gets a clear error, not a KeyError."""
        if not self.base_file.is_file():
            raise UserError(f"{self.path}: no base.json — this run did not finish setting up its base model")
        return json.loads(self.base_file.read_text())

    def write_base(self, info: dict[str, Any]) -> None:
        atomic.write_json(self.base_file, info)

    @property
    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()

    @property
    def has_full_model(self) -> bool:
        return (self.model_dir / "config.json").is_file()

    def last_checkpoint(self) -> Optional[Path]:
        """The newest complete `checkpoint-N` (trainer_state.json is written last by the Trainer)."""
        done = [p for p in self.checkpoints_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


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


def create(recipe: Recipe, path: Optional[Path] = None) -> RunDir:
    """A new run directory holding the resolved recipe. Never clobbers: a run already there needs overwrite=true,
    and a non-empty directory that is not a run is refused outright (it may be the user's data)."""
    run = RunDir(Path(path or recipe.output_dir or default_output_dir(recipe)).expanduser())
    if run.path.exists() and any(run.path.iterdir()):
        if not is_run(run.path):
            raise UserError(f"output_dir {run.path} exists and is not a finetune run; choose another output_dir")
        if not recipe.overwrite:
            raise UserError(f"output_dir {run.path} already holds a run; pass overwrite=true to replace it, "
                            f"resume={run.path} to continue it, or choose another output_dir")
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run.recipe_file, to_yaml(recipe))
    return run
