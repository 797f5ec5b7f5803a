"""Odds-ratio preference optimisation (stage=orpo): SFT and preference in one stage, on the base, no reference model.

TRL's ORPOTrainer (trl.experimental) tokenizes prompt/chosen/rejected text itself, with its own BOS/EOS rules and
the tokenizer's chat template — other ids than the official formats of ChatGLM3, Baichuan2, Qwen-1 and Llama-2. We
hand it exactly the columns its `tokenize_row` would produce, built from our exact-template prompt_ids /
chosen_ids / rejected_ids (paired_columns), and make `tokenize_row` the identity (trl_compat). stage=simpo uses the
same rows with CPOTrainer.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from finetune.config import Recipe
from finetune.models.chat.labels import IGNORE
from finetune.train.driver import StageTrainer
from finetune.train.trl_compat import ORPOConfig, PretokenizedORPOTrainer


def paired_row(row: dict[str, list[int]]) -> dict[str, list[int]]:
    """prompt_ids / chosen_ids / rejected_ids → the columns ORPO's and CPO's `tokenize_row` would have made: full
    sequences, their masks, and labels with the prompt masked (the completion ends with its trained stop token)."""
    prompt = list(row["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(row[f"{side}_ids"])
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [IGNORE] * len(prompt) + answer
    return out


def paired_columns(splits: DatasetDict, tokenizer: Any, recipe: Recipe) -> DatasetDict:
    return DatasetDict({name: split.map(paired_row, remove_columns=split.column_names, desc=f"Pairing {name}")
                        for name, split in splits.items()})


def options(recipe: Recipe, rows: DatasetDict) -> dict[str, Any]:
    return {"beta": recipe.pref.beta if recipe.pref.beta is not None else 0.1, "max_length": recipe.train.max_length}


STAGE = StageTrainer(trainer=PretokenizedORPOTrainer, config=ORPOConfig, options=options, rows=paired_columns)
