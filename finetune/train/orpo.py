"""Odds-ratio preference optimisation (stage=orpo): SFT and preference in one stage, on the base, no reference model.

TRL's ORPOTrainer (trl.experimental) tokenizes prompt/chosen/rejected text itself, with its own BOS/EOS rules and
the tokenizer's chat template — other ids than the official formats of ChatGLM3, Baichuan2, Qwen-1 and Llama-2. Its
dataset preparation is three `map`s that do nothing to rows already holding the columns `tokenize_row` would
produce, so we hand it exactly those columns, built from our exact-template prompt_ids / chosen_ids / rejected_ids
(paired_columns), and make `tokenize_row` the identity. stage=simpo (simpo.py) uses the same rows with CPOTrainer.
"""

from __future__ import annotations

from typing import Any

from accelerate import PartialState
from datasets import DatasetDict
from transformers import AutoTokenizer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from finetune import data
from finetune.config import Recipe
from finetune.rundir import RunDir
from finetune.train import session as lifecycle
from finetune.train.model import load_model, lora_config

IGNORE = -100


class PretokenizedORPOTrainer(ORPOTrainer):
    """ORPOTrainer fed our paired columns as they are (see the module docstring)."""

    def tokenize_row(self, feature, model=None) -> dict:
        return {}


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


def paired_columns(splits: DatasetDict) -> DatasetDict:
    return DatasetDict({name: split.map(paired_row, remove_columns=split.column_names, desc=f"Pairing {name}")
                        for name, split in splits.items()})


def run_paired(recipe: Recipe, trainer_class: type, config_class: type, *, force: bool, trust_remote_code: bool,
               **objective: Any) -> RunDir:
    """A paired preference stage without a reference model (orpo, simpo): base (+ fresh adapter) → trainer → finish."""
    session = lifecycle.start(recipe, force=force, trust_remote_code=trust_remote_code)
    with lifecycle.discarded_on_failure(session):
        tokenizer = AutoTokenizer.from_pretrained(session.model.path, trust_remote_code=session.trust_remote_code)
        with PartialState().local_main_process_first():
            splits = data.build_preference(recipe, tokenizer, session.template)
        args = lifecycle.trainer_args(config_class, session, has_eval="eval" in splits,
                                      max_length=recipe.train.max_length, **objective)
        model = load_model(session)
        samples = lifecycle.before_samples(session, model, tokenizer, splits)
        paired = paired_columns(splits)
        trainer = trainer_class(model=model, args=args, train_dataset=paired["train"],
                                eval_dataset=paired.get("eval"), processing_class=tokenizer,
                                peft_config=lora_config(recipe, session.spec))
    return lifecycle.finish(session, trainer, samples)


def run(recipe: Recipe, *, force: bool = False, trust_remote_code: bool = False) -> RunDir:
    beta = recipe.pref.beta if recipe.pref.beta is not None else 0.1
    return run_paired(recipe, PretokenizedORPOTrainer, ORPOConfig, force=force, trust_remote_code=trust_remote_code,
                      beta=beta)
