"""Direct preference optimisation as a second stage (stage=dpo), after supervised fine-tuning.

Starts from the SFT run named by dpo.sft_run: its adapter keeps training (TRL keeps a frozen copy of it as the
reference policy), or, for method=full, its full weights (TRL copies them as the reference). Without an SFT run
a fresh adapter is trained on the base, and the reference is the base itself (adapter disabled).
Everything else — memory check, run directory, callbacks, saving, report — is the shared run lifecycle (session.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from finetune import data, rundir
from finetune.config import Recipe
from finetune.errors import UserError
from finetune.rundir import RunDir
from finetune.schema import trains_weights
from finetune.train import session as lifecycle
from finetune.train.model import load_model, lora_config
from finetune.train.session import Session


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer fed our prompt_ids / chosen_ids / rejected_ids as they are.

    TRL 1.16's DPOTrainer always re-tokenizes its dataset from text with the tokenizer's chat template, which gives
    other ids than the official chat formats of ChatGLM3, Baichuan2, Qwen-1 and Llama-2; its collator consumes the
    pre-tokenized columns directly, so skipping that preparation is all it takes."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def run(recipe: Recipe, *, force: bool = False, trust_remote_code: bool = False) -> RunDir:
    sft_run = rundir.open_run(recipe.dpo.sft_run) if recipe.dpo.sft_run else None
    session = lifecycle.start(recipe, force=force, trust_remote_code=trust_remote_code)
    with lifecycle.discarded_on_failure(session):
        tokenizer = AutoTokenizer.from_pretrained(session.model.path, trust_remote_code=session.trust_remote_code)
        with PartialState().local_main_process_first():
            splits = data.build_preference(recipe, tokenizer, session.template)
        args = lifecycle.trainer_args(DPOConfig, session, has_eval="eval" in splits, beta=recipe.dpo.beta,
                                      loss_type=[recipe.dpo.loss], max_length=None)  # rows already fit train.max_length
        model, adapter = starting_point(session, sft_run)
        samples = lifecycle.before_samples(session, model, tokenizer, splits)
        trainer = PretokenizedDPOTrainer(model=model, args=args, train_dataset=splits["train"],
                                         eval_dataset=splits.get("eval"), processing_class=tokenizer,
                                         peft_config=adapter)
    return lifecycle.finish(session, trainer, samples)


def starting_point(session: Session, sft_run: Optional[RunDir]) -> tuple[torch.nn.Module, Optional[LoraConfig]]:
    """(model, new adapter config or None): the SFT run's weights when given, else the base with a fresh adapter."""
    recipe = session.recipe
    if sft_run is None:
        return load_model(session), lora_config(recipe, session.spec)
    if trains_weights(recipe.method):
        if not sft_run.has_full_model:
            raise UserError(f"dpo.sft_run={sft_run.path} has no full model ({sft_run.model_dir}); method="
                            f"{recipe.method} continues a method=full/freeze SFT run — use method=lora/qlora to "
                            f"continue an adapter")
        return load_model(session, sft_run.model_dir), None
    if not sft_run.has_adapter:
        raise UserError(f"dpo.sft_run={sft_run.path} has no adapter ({sft_run.adapter_dir}); it did not finish, "
                        f"or it was method=full — then use method=full for DPO too")
    trained_on = sft_run.base().get("path")
    if trained_on and str(trained_on) != str(session.model.path):
        raise UserError(f"dpo.sft_run={sft_run.path} trained its adapter on {trained_on}, but this recipe's model "
                        f"is {session.model.path}; use the same model= as the SFT run")
    model: Any = PeftModel.from_pretrained(load_model(session), sft_run.adapter_dir, is_trainable=True)
    return model, None
