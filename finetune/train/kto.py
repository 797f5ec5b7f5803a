"""Kahneman-Tversky optimisation (stage=kto): learns from answers marked good or bad one at a time, no pairs needed.

Data: a preference file (each pair becomes one desirable and one undesirable example, trl_compat.unpaired) or
KTO's own judged answers, as exact-template ids. The reference policy is the base (adapter disabled) for
LoRA/QLoRA, a frozen copy for method=full.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from finetune.config import Recipe
from finetune.train.driver import StageTrainer
from finetune.train.trl_compat import KTOConfig, PretokenizedKTOTrainer


def options(recipe: Recipe, rows: DatasetDict) -> dict[str, Any]:
    return {"beta": recipe.pref.beta if recipe.pref.beta is not None else 0.1,
            "desirable_weight": recipe.pref.desirable_weight, "undesirable_weight": recipe.pref.undesirable_weight,
            "max_length": None}


STAGE = StageTrainer(trainer=PretokenizedKTOTrainer, config=KTOConfig, options=options)
