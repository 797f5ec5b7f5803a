"""Group relative policy optimisation (stage=grpo): the model samples grpo.num_generations answers per prompt, the
recipe's reward functions (rewards.py) score them, and each answer is pushed up or down by how it scored against
its group. No value model; a reference model only with grpo.beta > 0.

Data: any SFT data; each conversation's last answer is the reference (`answer`, for exact_match) and everything
before it is the prompt, as our exact-template ids, which TRL's GRPOTrainer takes as they are (trl_compat).
Sampling stops at the family's stop tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset, DatasetDict

from finetune.config import Recipe
from finetune.models.chat.labels import trained_spans
from finetune.train import session as lifecycle
from finetune.train.driver import StageTrainer
from finetune.train.rewards import reward_functions
from finetune.train.session import Session
from finetune.train.trl_compat import GRPOConfig, PretokenizedGRPOTrainer


def prompts_and_answers(split: Dataset, tokenizer: Any) -> Dataset:
    """SFT rows (input_ids, labels) → prompt: the ids before the last trained run, answer: that run as text."""
    def cut(row: dict[str, list[int]]) -> dict[str, Any]:
        ids = row["input_ids"]
        start, end = trained_spans(row["labels"])[-1]
        answer = tokenizer.decode(ids[start:end], skip_special_tokens=True).strip()
        return {"prompt": list(ids[:start]), "answer": answer}

    return split.map(cut, remove_columns=split.column_names, desc="Prompts")


def prompts(splits: DatasetDict, tokenizer: Any, recipe: Recipe) -> DatasetDict:
    return DatasetDict({name: prompts_and_answers(split, tokenizer) for name, split in splits.items()})


def options(recipe: Recipe, rows: DatasetDict) -> dict[str, Any]:
    g = recipe.grpo
    return {"num_generations": g.num_generations, "max_completion_length": g.max_completion_length, "beta": g.beta,
            "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k}


def rewards(recipe: Recipe) -> dict[str, Any]:
    """The reward functions, imported before any weight is read (a `module:function` that fails, fails first)."""
    return {"reward_funcs": reward_functions(recipe)}


def answers_end_at_stops(model: torch.nn.Module, tokenizer: Any, session: Session) -> None:
    model.generation_config.eos_token_id = lifecycle.stop_ids(session, tokenizer)


STAGE = StageTrainer(trainer=PretokenizedGRPOTrainer, config=GRPOConfig, options=options, rows=prompts,
                     ready=rewards, tune=answers_end_at_stops)
