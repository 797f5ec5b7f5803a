"""Simple preference optimisation (stage=simpo): TRL's CPOTrainer with loss_type="simpo" (cpo_alpha=0), i.e. the
length-normalised log-likelihood margin with target gap `pref.simpo_gamma`; no reference model.

Rows and the lifecycle are orpo.py's: CPOTrainer prepares its dataset with the same no-op maps and `tokenize_row`.
"""

from __future__ import annotations

from trl.experimental.cpo import CPOConfig, CPOTrainer

from finetune.config import Recipe
from finetune.rundir import RunDir
from finetune.train.orpo import run_paired


class PretokenizedCPOTrainer(CPOTrainer):
    """CPOTrainer fed our exact-template paired columns (orpo.paired_row) as they are."""

    def tokenize_row(self, feature, model=None) -> dict:
        return {}


def run(recipe: Recipe, *, force: bool = False, trust_remote_code: bool = False) -> RunDir:
    beta = recipe.pref.beta if recipe.pref.beta is not None else 2.0  # the SimPO paper's range is 2-2.5
    return run_paired(recipe, PretokenizedCPOTrainer, CPOConfig, force=force, trust_remote_code=trust_remote_code,
                      loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=recipe.pref.simpo_gamma)
