"""Reward modelling (stage=rm): the base with a one-output value head learns to score chosen above rejected
(Bradley-Terry loss), for RLHF pipelines or to rank answers.

The model is AutoModelForSequenceClassification(num_labels=1) (model.py, from the plan's head): the family's decoder
plus a new `score` head; LoRA trains the adapters and the head in full (PEFT's SEQ_CLS task saves it in adapter/),
method=full/freeze save it in model/. TRL's RewardTrainer takes pre-tokenized chosen_ids / rejected_ids as they
are: whole sequences, our exact-template prompt followed by each answer. The head reads the last non-pad token, so
the model's config gets the tokenizer's pad id. No before/after samples: a reward model does not generate.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import DatasetDict

from finetune.config import Recipe
from finetune.train.driver import StageTrainer
from finetune.train.session import Session
from finetune.train.trl_compat import RewardConfig, RewardTrainer


def whole_sequences(splits: DatasetDict, tokenizer: Any, recipe: Recipe) -> DatasetDict:
    """prompt_ids + chosen_ids / rejected_ids → the two full sequences RewardTrainer's collator stacks."""
    def join(row: dict[str, list[int]]) -> dict[str, list[int]]:
        return {"chosen_ids": row["prompt_ids"] + row["chosen_ids"],
                "rejected_ids": row["prompt_ids"] + row["rejected_ids"]}

    return DatasetDict({name: split.map(join, remove_columns=["prompt_ids"], desc=f"Joining {name}")
                        for name, split in splits.items()})


def pad_marks_the_end(model: torch.nn.Module, tokenizer: Any, session: Session) -> None:
    """The collator pads with the pad token and the head scores the last token before it."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def options(recipe: Recipe, rows: DatasetDict) -> dict[str, Any]:
    return {"max_length": None}


STAGE = StageTrainer(trainer=RewardTrainer, config=RewardConfig, options=options, rows=whole_sequences,
                     tune=pad_marks_the_end)
