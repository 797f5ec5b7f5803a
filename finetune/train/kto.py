"""Kahneman-Tversky optimisation (stage=kto): learns from answers marked good or bad one at a time, no pairs needed.

Data: a preference file (each pair becomes one desirable and one undesirable example) — the rows are our
exact-template prompt_ids / chosen_ids / rejected_ids. TRL 1.16's KTOTrainer would re-tokenize text with the
tokenizer's chat template; its collator (DataCollatorForUnpairedPreference) needs only prompt_ids, completion_ids,
label and, for the KL term, KL_completion_ids, so `_prepare_dataset` builds exactly those from our ids.
The reference policy is the base (adapter disabled) for LoRA/QLoRA, a frozen copy for method=full.
"""

from __future__ import annotations

from typing import Any

from accelerate import PartialState
from datasets import Dataset
from transformers import AutoTokenizer
from trl import KTOConfig, KTOTrainer

from finetune import data
from finetune.config import Recipe
from finetune.errors import UserError
from finetune.rundir import RunDir
from finetune.train import session as lifecycle
from finetune.train.model import load_model, lora_config


def unpaired(split: Dataset, seed: int) -> Dataset:
    """Each pair → (prompt, chosen, True) and (prompt, rejected, False), shuffled once with the run's seed: KTO
    samples sequentially (its KL estimate pairs neighbours), so the order must already mix prompts and labels."""
    def unpair(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "label": []}
        for prompt, chosen, rejected in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]):
            for completion, label in ((chosen, True), (rejected, False)):
                out["prompt_ids"].append(prompt)
                out["completion_ids"].append(completion)
                out["label"].append(label)
        return out

    rows = split.map(unpair, batched=True, remove_columns=split.column_names, desc="Unpairing")
    return rows.shuffle(seed=seed).flatten_indices()


def with_kl_completions(rows: Dataset, batch_size: int) -> Dataset:
    """KL_completion_ids: each batch's completions rotated by one (x_i, y_{i-1}), as TRL builds them: mismatched
    prompt/answer pairs whose log-ratio estimates the KL term."""
    def rotate(batch: dict[str, list]) -> dict[str, list]:
        return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

    return rows.map(rotate, batched=True, batch_size=batch_size, desc="KL completions")


class PretokenizedKTOTrainer(KTOTrainer):
    """KTOTrainer on our exact-template ids (see the module docstring)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        rows = unpaired(dataset, args.seed) if "chosen_ids" in dataset.column_names else dataset
        return with_kl_completions(rows, args.per_device_train_batch_size) if self.calculate_KL else rows


def run(recipe: Recipe, *, force: bool = False, trust_remote_code: bool = False) -> RunDir:
    if recipe.train.micro_batch < 2:
        raise UserError("stage=kto needs train.micro_batch >= 2: its KL term pairs each answer with another "
                        "prompt of the same micro-batch")
    session = lifecycle.start(recipe, force=force, trust_remote_code=trust_remote_code)
    with lifecycle.discarded_on_failure(session):
        tokenizer = AutoTokenizer.from_pretrained(session.model.path, trust_remote_code=session.trust_remote_code)
        with PartialState().local_main_process_first():
            splits = data.build_preference(recipe, tokenizer, session.template)
        objective: dict[str, Any] = {"beta": recipe.pref.beta if recipe.pref.beta is not None else 0.1,
                                     "desirable_weight": recipe.pref.desirable_weight,
                                     "undesirable_weight": recipe.pref.undesirable_weight}
        args = lifecycle.trainer_args(KTOConfig, session, has_eval="eval" in splits, max_length=None, **objective)
        model = load_model(session)
        samples = lifecycle.before_samples(session, model, tokenizer, splits)
        trainer = PretokenizedKTOTrainer(model=model, args=args, train_dataset=splits["train"],
                                         eval_dataset=splits.get("eval"), processing_class=tokenizer,
                                         peft_config=lora_config(recipe, session.spec))
    return lifecycle.finish(session, trainer, samples)
