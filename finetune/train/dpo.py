"""Direct preference optimisation as a second stage (stage=dpo), after supervised fine-tuning.

Starts from the SFT run named by dpo.sft_run: its adapter keeps training (TRL keeps a frozen copy of it as the
reference policy), or, for method=full, its full weights (TRL copies them as the reference). Without an SFT run
a fresh adapter is trained on the base, and the reference is the base itself (adapter disabled).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from datasets import DatasetDict
from peft import LoraConfig, PeftModel

from finetune import rundir
from finetune.config import Recipe
from finetune.errors import UserError
from finetune.schema import trains_weights
from finetune.train.driver import StageTrainer, base_with_new_adapter
from finetune.train.model import load_model
from finetune.train.session import Session
from finetune.train.trl_compat import DPOConfig, PretokenizedDPOTrainer


def options(recipe: Recipe, rows: DatasetDict) -> dict[str, Any]:
    return {"beta": recipe.dpo.beta, "loss_type": [recipe.dpo.loss],
            "max_length": None}  # rows already fit train.max_length


def sft_run_is_there(recipe: Recipe) -> dict[str, Any]:
    if recipe.dpo.sft_run:
        rundir.open_run(recipe.dpo.sft_run)  # a clear error before any weight is read
    return {}


def starting_point(session: Session) -> tuple[torch.nn.Module, Optional[LoraConfig]]:
    """(model, new adapter config or None): the SFT run's weights when given, else the base with a fresh adapter."""
    recipe = session.recipe
    if not recipe.dpo.sft_run:
        return base_with_new_adapter(session)
    sft_run = rundir.open_run(recipe.dpo.sft_run)
    if trains_weights(recipe.method):
        if not sft_run.has_full_model:
            raise UserError(f"dpo.sft_run={sft_run.path} has no full model ({sft_run.model_dir}); method="
                            f"{recipe.method} continues a method=full/freeze SFT run — use method=lora/qlora to "
                            f"continue an adapter")
        return load_model(session, sft_run.model_dir), None
    if not sft_run.has_adapter:
        raise UserError(f"dpo.sft_run={sft_run.path} has no adapter ({sft_run.adapter_dir}); it did not finish, "
                        f"or it was method=full — then use method=full for DPO too")
    trained_on = sft_run.base().path
    if trained_on != str(session.model.path):
        raise UserError(f"dpo.sft_run={sft_run.path} trained its adapter on {trained_on}, but this recipe's model "
                        f"is {session.model.path}; use the same model= as the SFT run")
    model: Any = PeftModel.from_pretrained(load_model(session), sft_run.adapter_dir, is_trainable=True)
    return model, None


STAGE = StageTrainer(trainer=PretokenizedDPOTrainer, config=DPOConfig, options=options, model=starting_point,
                     ready=sft_run_is_there)
