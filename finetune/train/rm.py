"""Reward modelling (stage=rm): the base with a one-output value head learns to score chosen above rejected
(Bradley-Terry loss), for RLHF pipelines or to rank answers.

The model is AutoModelForSequenceClassification(num_labels=1): the family's decoder plus a new `score` head; LoRA
trains the adapters and the head in full (PEFT's SEQ_CLS task saves it in adapter/), method=full/freeze save it in
model/. TRL 1.16's RewardTrainer takes pre-tokenized chosen_ids / rejected_ids as they are: those are whole
sequences, our exact-template prompt followed by each answer. The head reads the last non-pad token, so the model's
config gets the tokenizer's pad id. No before/after samples: a reward model does not generate.
"""

from __future__ import annotations

from accelerate import PartialState
from datasets import DatasetDict
from transformers import AutoTokenizer
from trl import RewardConfig, RewardTrainer

from finetune import data
from finetune.config import Recipe
from finetune.rundir import RunDir
from finetune.train import session as lifecycle
from finetune.train.model import load_model, lora_config


def whole_sequences(splits: DatasetDict) -> DatasetDict:
    """prompt_ids + chosen_ids / rejected_ids → the two full sequences RewardTrainer's collator stacks."""
    def join(row: dict[str, list[int]]) -> dict[str, list[int]]:
        return {"chosen_ids": row["prompt_ids"] + row["chosen_ids"],
                "rejected_ids": row["prompt_ids"] + row["rejected_ids"]}

    return DatasetDict({name: split.map(join, remove_columns=["prompt_ids"], desc=f"Joining {name}")
                        for name, split in splits.items()})


def run(recipe: Recipe, *, force: bool = False, trust_remote_code: bool = False) -> RunDir:
    session = lifecycle.start(recipe, force=force, trust_remote_code=trust_remote_code)
    with lifecycle.discarded_on_failure(session):
        tokenizer = AutoTokenizer.from_pretrained(session.model.path, trust_remote_code=session.trust_remote_code)
        if tokenizer.pad_token is None:  # the collator pads with it; the head finds the last real token by it
            tokenizer.pad_token = tokenizer.eos_token
        with PartialState().local_main_process_first():
            splits = whole_sequences(data.build_preference(recipe, tokenizer, session.template))
        args = lifecycle.trainer_args(RewardConfig, session, has_eval="eval" in splits, max_length=None)
        model = load_model(session)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=args, train_dataset=splits["train"],
                                eval_dataset=splits.get("eval"), processing_class=tokenizer,
                                peft_config=lora_config(recipe, session.spec))
    return lifecycle.finish(session, trainer, [])
