"""Simple preference optimisation (stage=simpo): TRL's CPOTrainer with loss_type="simpo" (cpo_alpha=0), i.e. the
length-normalised log-likelihood margin with target gap `pref.simpo_gamma`; no reference model. Rows are orpo.py's:
CPOTrainer prepares its dataset with the same no-op maps and `tokenize_row`.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from finetune.config import Recipe
from finetune.train.driver import StageTrainer
from finetune.train.orpo import paired_columns
from finetune.train.trl_compat import CPOConfig, PretokenizedCPOTrainer


def options(recipe: Recipe, rows: DatasetDict) -> dict[str, Any]:
    return {"loss_type": "simpo", "cpo_alpha": 0.0,
            "beta": recipe.pref.beta if recipe.pref.beta is not None else 2.0,  # the SimPO paper's range is 2-2.5
            "simpo_gamma": recipe.pref.simpo_gamma, "max_length": recipe.train.max_length}


STAGE = StageTrainer(trainer=PretokenizedCPOTrainer, config=CPOConfig, options=options, rows=paired_columns)
