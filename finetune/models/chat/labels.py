"""The label value of a token that is not trained, and where a row's trained runs are.

-100 is the `ignore_index` default of PyTorch's cross-entropy (torch.nn.CrossEntropyLoss), and what transformers'
causal-LM losses and data collators skip; every module that writes or reads labels uses this one name for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

IGNORE = -100


def trained_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained positions, in order: a conversation's answers (with the token that ends
    each). Everything before the first is the prompt a sample or an export check asks; GRPO's prompt ends at the
    last."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, label in enumerate(labels):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def first_answer(labels: Sequence[int]) -> Optional[tuple[int, int]]:
    """[start, end) of the first trained run when a prompt comes before it: what a sample or an export check asks
    (ids[:start]) and the answer it expects. None when nothing is trained or training starts at the first token
    (plain text has no prompt to ask)."""
    spans = trained_spans(labels)
    return spans[0] if spans and spans[0][0] > 0 else None
