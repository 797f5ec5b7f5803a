"""Training: `run(recipe)` trains one stage (sft or dpo) and returns its run directory.

The same call serves `finetune recipe=X` (one process) and `accelerate launch -m finetune recipe=X` / torchrun
(one call per process; the launcher's environment makes it distributed, see distributed.py).
"""

from __future__ import annotations

from finetune.config import Recipe
from finetune.rundir import RunDir


def run(recipe: Recipe, *, force: bool = False) -> RunDir:
    """Train `recipe` (its memory estimate first: refuses when it will not fit, unless `force`)."""
    if recipe.stage == "dpo":
        from finetune.train import dpo

        return dpo.run(recipe, force=force)
    from finetune.train import sft

    return sft.run(recipe, force=force)


__all__ = ["run"]
