"""Training: `run(recipe)` trains one stage (sft, dpo, kto, orpo, simpo, rm, grpo) and returns its run directory.

The same call serves `finetune recipe=X` (one process) and `accelerate launch -m finetune recipe=X` / torchrun
(one call per process; the launcher's environment makes it distributed, see distributed.py). Each stage is a
declaration in finetune/train/<stage>.py run by driver.py.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from finetune.config import Recipe
from finetune.rundir import RunDir

if TYPE_CHECKING:
    from finetune.train.driver import StageTrainer


def stage_trainer(recipe: Recipe) -> StageTrainer:
    """The recipe's stage declaration, imported only when that stage runs (each pulls in its TRL trainer)."""
    return importlib.import_module(f"finetune.train.{recipe.stage}").STAGE


def run(recipe: Recipe, *, force: bool = False, trust_remote_code: bool = False) -> RunDir:
    """Train `recipe` (its memory estimate first: refuses when it will not fit, unless `force`). `trust_remote_code`
    lets transformers run Python files from the model's repository; it is never part of a recipe, so only the
    person typing the command can turn it on."""
    from finetune.train import driver  # torch, accelerate, transformers: only when training

    return driver.run(recipe, stage_trainer(recipe), force=force, trust_remote_code=trust_remote_code)


__all__ = ["run", "stage_trainer"]
