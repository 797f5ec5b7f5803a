"""Data pipeline: any common instruction format in, the model's exact chat format out, loss on answers only.

    load.py     files / directories / globs / hub ids → raw rows (via `datasets`), mixing, held-out split
    registry.py data.name + data.dir: entries of a LLaMA-Factory-style dataset_info.json as sources
    formats.py  alpaca / sharegpt / messages / text / preference layouts / KTO → one internal schema, bad records
                marked
    kinds.py    the kind of data a layout holds (conversations, paired, unpaired, prompts): one per run
    turns.py    one turn in any key style (roles, tool calls and results, content parts) → an internal message
    render.py   internal rows → the family's exact token ids and labels (finetune.models.chat), truncation
    pack.py     short examples → full rows with per-example position ids
    inspect.py  counts, length histogram, one example with its trained tokens highlighted

Every step is a `datasets.map` with a fingerprint built from its inputs and code, so a second run with the same
data, tokenizer and settings reads the processed result from the cache ($FINETUNE_CACHE/datasets) and tokenizes
nothing.

Which processor gives which kind (kinds.py): `build` → conversations (input_ids, labels; stage=grpo cuts these
into prompts); `build_preference` → paired (prompt_ids, chosen_ids, rejected_ids) or, for KTO's own records,
unpaired (prompt_ids, completion_ids, label); `kinds.of(split.column_names)` tells which a split holds.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from finetune.data import kinds
from finetune.data.inspect import inspect, render_inspect, save_length_histogram_png, tokenizer_for
from finetune.data.pack import pack
from finetune.data.render import prepare
from finetune.errors import UserError

__all__ = ["build", "build_preference", "inspect", "render_inspect", "save_length_histogram_png", "tokenizer_for"]


def build(recipe: Any, tokenizer: Any, template: str) -> DatasetDict:
    """SFT splits ("train", and "eval" when data.eval_path or data.val_size asks for one) for TRL's SFTTrainer with
    `dataset_kwargs={"skip_prepare_dataset": True}` and `remove_unused_columns=False`: TRL's collator keeps our
    labels as they are. Columns: input_ids, labels, attention_mask; with data.packing: input_ids, labels,
    position_ids, seq_lengths (train those padding-free, see pack.py)."""
    splits, _, kind = prepare(recipe, tokenizer, template)
    if kind != "conversations":
        raise UserError(f"the data is {kinds.NAMES[kind]}: it trains with stage=dpo, kto, orpo, simpo or rm")
    if not len(splits["train"]):
        raise UserError("no training example is left after dropping bad and too long records; "
                        "`finetune data` shows why")
    columns = ["input_ids", "labels", "attention_mask"]
    if not recipe.data.packing:
        return DatasetDict({name: split.select_columns(columns) for name, split in splits.items()})
    return DatasetDict({name: pack(split, recipe.train.max_length, recipe.data.num_proc)
                        for name, split in splits.items()})


def build_preference(recipe: Any, tokenizer: Any, template: str) -> DatasetDict:
    """Preference splits as pre-tokenized prompt_ids / chosen_ids / rejected_ids in the family's exact format
    (KTO records: prompt_ids / completion_ids / label).

    TRL 1.16's DataCollatorForPreference consumes exactly these columns, but DPOTrainer always re-tokenizes its
    dataset from text with the tokenizer's chat template (it has no skip_prepare_dataset), which would give other
    ids for ChatGLM3, Baichuan2, Qwen-1 and Llama-2. The trainer therefore passes these rows through unchanged by
    overriding `DPOTrainer._prepare_dataset` to return the dataset as is. A completion ends with its trained stop
    token (eos / <|im_end|>); prompt + completion never exceed train.max_length."""
    splits, _, kind = prepare(recipe, tokenizer, template)
    if kind not in ("paired", "unpaired"):
        raise UserError(f"stage={recipe.stage} needs preference data with prompt, chosen and rejected columns "
                        f"(data/README.md); the data given is {kinds.NAMES[kind]}")
    if not len(splits["train"]):
        raise UserError("no preference example is left after dropping bad and too long records")
    columns = list(kinds.RENDERED[kind])  # unpaired: KTO's judged answers (stage=kto only, formats.check_stage)
    return DatasetDict({name: split.select_columns(columns) for name, split in splits.items()})
