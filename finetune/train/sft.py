"""Supervised fine-tuning, top to bottom: session → tokenizer → data → model → TRL's SFTTrainer → finish.

Our token ids and labels go to TRL as they are (its collator passes the labels through unchanged); TRL creates
the PEFT adapter (r/alpha/dropout/targets/DoRA); the loss is TRL's chunked one, or transformers' on full logits
(train.logits=full). The lifecycle around it (memory check, run directory, saving, report) is session.py.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoTokenizer, Trainer
from trl import SFTConfig, SFTTrainer

from finetune import data
from finetune.config import Recipe
from finetune.rundir import RunDir
from finetune.train import session as lifecycle
from finetune.train.model import load_model, lora_config


def run(recipe: Recipe, *, force: bool = False, trust_remote_code: bool = False) -> RunDir:
    session = lifecycle.start(recipe, force=force, trust_remote_code=trust_remote_code)
    with lifecycle.discarded_on_failure(session):
        tokenizer = AutoTokenizer.from_pretrained(session.model.path, trust_remote_code=session.trust_remote_code)
        with PartialState().local_main_process_first():  # rank 0 tokenizes, the others read the datasets cache
            splits = data.build(recipe, tokenizer, session.template)
        packed = "position_ids" in splits["train"].column_names
        args = lifecycle.trainer_args(SFTConfig, session, has_eval="eval" in splits,
                                      dataset_kwargs={"skip_prepare_dataset": True},  # our ids and labels as they are
                                      max_length=None,  # every example already fits train.max_length
                                      padding_free=packed)  # packed: position ids, no attention mask, no cross-talk
        model = load_model(session)
        samples = lifecycle.before_samples(session, model, tokenizer, splits)
        trainer = trainer_class(recipe)(model=model, args=args, train_dataset=splits["train"],
                                        eval_dataset=splits.get("eval"), processing_class=tokenizer,
                                        peft_config=lora_config(recipe, session.spec))
    return lifecycle.finish(session, trainer, samples)


class FullLogitsSFTTrainer(SFTTrainer):
    """train.logits=full: the loss as transformers' Trainer computes it, the model's own ForCausalLMLoss over the
    materialized [tokens, vocab] logits upcast to fp32 — the stack most scripts run, so a user can reproduce (or
    compare) their memory. TRL's fused head, which never builds those logits, is the default; its entropy and token
    accuracy metrics are not logged here, since they come from that head."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        if model.training:
            self._count_tokens(inputs)
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        """The `num_tokens` TRL's own loss logs (the run summary's throughput): unmasked tokens, or whole packed
        rows."""
        mask = inputs.get("attention_mask")
        local = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].numel())
        self._total_train_tokens += self.accelerator.gather_for_metrics(local.to(self.args.device)).sum().item()
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]


def trainer_class(recipe: Recipe) -> type[SFTTrainer]:
    """The trainer whose loss the recipe asks for (train.logits)."""
    return FullLogitsSFTTrainer if recipe.train.logits == "full" else SFTTrainer
