"""Supervised fine-tuning (stage=sft): our token ids and labels go to TRL's SFTTrainer as they are (its collator
passes the labels through unchanged); TRL creates the PEFT adapter; the loss is TRL's chunked one, or transformers'
on full logits (train.logits=full). Packed rows train padding-free: position ids, no attention mask, no
cross-talk between the examples of a row.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from finetune.config import Recipe
from finetune.train.driver import StageTrainer
from finetune.train.trl_compat import FullLogitsSFTTrainer, SFTConfig, SFTTrainer


def trainer(recipe: Recipe) -> type[SFTTrainer]:
    """The trainer whose loss the recipe asks for (train.logits)."""
    return FullLogitsSFTTrainer if recipe.train.logits == "full" else SFTTrainer


def options(recipe: Recipe, rows: DatasetDict) -> dict[str, Any]:
    return {"dataset_kwargs": {"skip_prepare_dataset": True},  # our ids and labels as they are
            "max_length": None,  # every example already fits train.max_length
            "padding_free": "position_ids" in rows["train"].column_names}


STAGE = StageTrainer(trainer=trainer, config=SFTConfig, options=options)
