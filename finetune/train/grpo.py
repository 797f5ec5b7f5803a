"""Group relative policy optimisation (stage=grpo): the model samples grpo.num_generations answers per prompt, the
recipe's reward functions (rewards.py) score them, and each answer is pushed up or down by how it scored against
its group. No value model; a reference model only with grpo.beta > 0.

Data: any SFT data; each conversation's last answer is the reference (`answer`, for exact_match) and everything
before it is the prompt, as our exact-template ids. TRL 1.16's GRPOTrainer renders prompts with the tokenizer's
chat template (`_tokenize_prompts`); here the `prompt` column already holds the ids, and `_tokenize_prompts` passes
them through. Sampling stops at the family's stop tokens (templates.stop_token_ids).
"""

from __future__ import annotations

from typing import Any

from accelerate import PartialState
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from finetune import data
from finetune.config import Recipe
from finetune.errors import UserError
from finetune.rundir import RunDir
from finetune.train import session as lifecycle
from finetune.train.model import load_model, lora_config
from finetune.train.rewards import reward_functions

IGNORE = -100


class PretokenizedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose prompts are our token ids (see the module docstring)."""

    def _tokenize_prompts(self, prompts: list):
        return [list(ids) for ids in prompts], None, {}


def prompts_and_answers(split: Dataset, tokenizer: Any) -> Dataset:
    """SFT rows (input_ids, labels) → prompt: the ids before the last trained run, answer: that run as text."""
    def cut(row: dict[str, list[int]]) -> dict[str, Any]:
        ids, labels = row["input_ids"], row["labels"]
        trained = [i for i, label in enumerate(labels) if label != IGNORE]
        start = trained[-1]
        while start - 1 >= 0 and labels[start - 1] != IGNORE:
            start -= 1
        answer = tokenizer.decode(ids[start:trained[-1] + 1], skip_special_tokens=True).strip()
        return {"prompt": list(ids[:start]), "answer": answer}

    return split.map(cut, remove_columns=split.column_names, desc="Prompts")


def run(recipe: Recipe, *, force: bool = False, trust_remote_code: bool = False) -> RunDir:
    g = recipe.grpo
    if (recipe.train.micro_batch * recipe.train.grad_accum) % g.num_generations:
        raise UserError(f"stage=grpo: train.micro_batch × train.grad_accum ({recipe.train.micro_batch} × "
                        f"{recipe.train.grad_accum}) must be a multiple of grpo.num_generations={g.num_generations}: "
                        "each prompt's answers are scored as one group")
    rewards = reward_functions(recipe)  # a bad reward.fn fails before any weight is read
    session = lifecycle.start(recipe, force=force, trust_remote_code=trust_remote_code)
    with lifecycle.discarded_on_failure(session):
        tokenizer = AutoTokenizer.from_pretrained(session.model.path, trust_remote_code=session.trust_remote_code)
        with PartialState().local_main_process_first():
            built = data.build(recipe, tokenizer, session.template)
        if "position_ids" in built["train"].column_names:
            raise UserError("stage=grpo samples answers to whole prompts: set data.packing=false")
        splits = DatasetDict({name: prompts_and_answers(split, tokenizer) for name, split in built.items()})
        args = lifecycle.trainer_args(GRPOConfig, session, has_eval="eval" in splits,
                                      num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                                      beta=g.beta, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        model = load_model(session)
        model.generation_config.eos_token_id = lifecycle.stop_ids(session, tokenizer)  # answers end at our stops
        samples = lifecycle.before_samples(session, model, tokenizer, built)
        trainer = PretokenizedGRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=splits["train"],
                                          eval_dataset=splits.get("eval"), processing_class=tokenizer,
                                          peft_config=lora_config(recipe, session.spec))
    return lifecycle.finish(session, trainer, samples)
