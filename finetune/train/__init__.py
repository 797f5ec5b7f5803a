"""Training: `run(recipe)` trains one stage (sft, dpo, kto, orpo, simpo, rm, grpo) and returns its run directory.

The same call serves `finetune recipe=X` (one process) and `accelerate launch -m finetune recipe=X` / torchrun
(one call per process; the launcher's environment makes it distributed, see distributed.py).
"""

from __future__ import annotations

import importlib

from finetune.config import Recipe
from finetune.rundir import RunDir
from finetune.schema import Stage

STAGES: dict[Stage, str] = {"sft": "sft", "dpo": "dpo", "kto": "kto", "orpo": "orpo", "simpo": "simpo",
                            "rm": "rm", "grpo": "grpo"}
"""recipe stage → its module in finetune.train (imported only when that stage runs: each pulls in its trainer)."""


def run(recipe: Recipe, *, force: bool = False, trust_remote_code: bool = False) -> RunDir:
    """Train `recipe` (its memory estimate first: refuses when it will not fit, unless `force`). `trust_remote_code`
    lets transformers run Python files from the model's repository; it is never part of a recipe, so only the
    person typing the command can turn it on."""
    module = importlib.import_module(f"finetune.train.{STAGES[recipe.stage]}")  # one module per stage
    return module.run(recipe, force=force, trust_remote_code=trust_remote_code)


__all__ = ["run"]
