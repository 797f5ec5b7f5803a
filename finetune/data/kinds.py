"""The kind of a dataset: what one example is, so which stages train on it and which processor renders it.

Every record layout (formats.FORMATS) belongs to one kind, and one run trains one kind:

    conversations  SFT: a conversation or plain text, trained on its answers   (stage=sft; grpo cuts its prompts)
    paired         a prompt with a chosen and a rejected answer                 (stage=dpo, orpo, simpo, rm, kto)
    unpaired       a prompt with one answer judged good or bad (KTO's layout)   (stage=kto)
    prompts        a prompt to sample answers to, with its reference answer    (stage=grpo, from conversations)

A loaded split (formats.py's internal rows) and a rendered one (render.py's token ids) show their kind by the columns
only that kind has; `of` reads it there, so code that holds a split never guesses from column names itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Kind = Literal["conversations", "paired", "unpaired", "prompts"]

LOADED: dict[Kind, tuple[str, ...]] = {
    "conversations": ("messages",),
    "paired": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
"""The columns of each kind's internal rows (formats.py), besides `tools` and the bookkeeping `_*` columns. Prompts
have none: GRPO's prompts are cut from rendered conversations."""

RENDERED: dict[Kind, tuple[str, ...]] = {
    "conversations": ("input_ids", "labels"),
    "paired": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "unpaired": ("prompt_ids", "completion_ids", "label"),
    "prompts": ("prompt", "answer"),
}
"""The columns a trainer receives for each kind (render.py; GRPO's prompt cut in train/grpo.py)."""

MARKS: dict[Kind, frozenset[str]] = {
    "paired": frozenset({"chosen", "chosen_ids", "rejected", "rejected_ids"}),
    "unpaired": frozenset({"completion", "completion_ids"}),
    "conversations": frozenset({"messages", "input_ids"}),
    "prompts": frozenset({"answer"}),
}
"""Columns only that kind has, in either layer (a reward model's whole sequences keep chosen_ids/rejected_ids)."""

NAMES: dict[Kind, str] = {
    "conversations": "SFT data (conversations)",
    "paired": "preference data (prompt/chosen/rejected)",
    "unpaired": "KTO data (answers judged with a true/false label)",
    "prompts": "prompts (GRPO)",
}
"""A kind in the words of an error message."""


def of(columns: Iterable[str]) -> Kind:
    """The kind of a loaded or rendered split, given its column names."""
    present = set(columns)
    for kind, marks in MARKS.items():
        if present & marks:
            return kind
    raise ValueError(f"columns {sorted(present)} are no kind of dataset this package builds")
