"""Supervised fine-tuning (stage=sft): our token ids and labels go to TRL's SFTTrainer as they are (its collator
passes the labels through unchanged); TRL creates the PEFT adapter; the loss is TRL's chunked one, or transformers'
on full logits (train.logits=full). Micro-batches train padding-free (padding_free below).
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
            "padding_free": padding_free(recipe, rows)}


def padding_free(recipe: Recipe, rows: DatasetDict) -> bool:
    """Packed rows always; otherwise whenever a micro-batch holds more than one example. TRL's padding-free collator
    lays a micro-batch's examples end to end in one row with positions restarting at 0 (and no label on each
    example's first token); transformers builds a block-diagonal causal mask from those positions (sdpa, eager; flash
    attention reads the boundaries), so no token sees another example — the same attention and loss as padded rows,
    without computing a single padding token. Rows of 100–500 tokens in pairs waste about a fifth of a padded batch."""
    return "position_ids" in rows["train"].column_names or recipe.train.micro_batch > 1


STAGE = StageTrainer(trainer=trainer, config=SFTConfig, options=options)
