"""Packing short examples into rows of up to train.max_length tokens, without cross-contamination.

Bins are filled by TRL's best-fit-decreasing packer (`trl.pack_dataset`, strategy "bfd"), which never splits an
example (ours already fit max_length, so it never truncates either). Each packed row carries `seq_lengths` (what
TRL's padding-free collator reads) and `position_ids` restarting at 0 for every example. Train such rows padding-free
(SFTConfig(padding_free=True) or packing=True with packing_strategy="bfd", plus skip_prepare_dataset): the collator
then sends position_ids and no attention_mask, and transformers 5 builds a block-diagonal causal mask from the
position ids (sdpa/eager) or uses cu_seq_lens (flash attention), so no token attends across examples.
The label at each example's first token is -100: in an unpacked row that label is never used (the model predicts
token t from tokens < t), while in a packed row it would be predicted from the previous example.
"""

from __future__ import annotations

from typing import Optional

from datasets import Dataset
from trl import pack_dataset

from finetune.models.chat.labels import IGNORE

PACK_BATCH = 10_000  # examples binned together; larger batches fill rows slightly better


def _positions(batch: dict[str, list]) -> dict[str, list]:
    positions, labels = [], []
    for lengths, row_labels in zip(batch["seq_lengths"], batch["labels"]):
        row_labels = list(row_labels)
        start = 0
        for length in lengths:
            row_labels[start] = IGNORE
            start += length
        positions.append([p for length in lengths for p in range(length)])
        labels.append(row_labels)
    return {"labels": labels, "position_ids": positions}


def pack(ds: Dataset, max_length: int, num_proc: Optional[int] = None) -> Dataset:
    """Rows of input_ids/labels → packed rows of input_ids, labels, position_ids, seq_lengths."""
    packed = pack_dataset(ds.select_columns(["input_ids", "labels"]), max_length, strategy="bfd",
                          map_kwargs={"batch_size": PACK_BATCH, "num_proc": num_proc, "desc": "Packing"})
    return packed.map(_positions, batched=True, num_proc=num_proc, desc="Position ids")


def padding_waste(lengths: list[int], micro_batch: int) -> float:
    """Share of pad tokens when consecutive rows are batched `micro_batch` at a time and padded to the longest."""
    padded = sum(max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch])
                 for i in range(0, len(lengths), micro_batch))
    return 1 - sum(lengths) / padded if padded else 0.0
