"""Generation eval: greedy answers to held-out conversations, next to their references, scored by BLEU/ROUGE.

The data is the run's own held-out split, rebuilt from its saved recipe.yaml exactly as training split it
(finetune.data.load.load_splits: data.eval_path, or data.val_size with the run's seed), or any file given as
eval.file= in a format finetune data reads. Each conversation is asked up to its last answer; that answer is the
reference. The prompt and the answer come from finetune.infer's Engine (`prompt_ids` + `generate`): the run's chat
format, its system prompt and its stop tokens — the same answer `finetune chat` gives at temperature 0.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from finetune.errors import UserError
from finetune.evaluate import metrics
from finetune.evaluate.options import EvalOptions

log = logging.getLogger("finetune.eval")


@dataclass
class Example:
    messages: list[dict[str, Any]]  # the conversation before the scored answer (ends with a user turn)
    reference: str
    tools: Optional[list] = None


def examples_of(rows: Any, limit: Optional[int]) -> tuple[list[Example], int]:
    """Internal rows (finetune.data.formats) → examples; also how many rows had no answer text to score
    (plain text for pretraining, an answer that is only a tool call)."""
    found, skipped = [], 0
    for row in rows:
        if limit is not None and len(found) >= limit:
            break
        tools = json.loads(row["tools"]) if row.get("tools") else None
        if "prompt" in row:  # preference data: the chosen answer is the reference
            found.append(Example(list(row["prompt"]), row["chosen"], tools))
            continue
        messages = list(row["messages"])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"]), default=None)
        if last is None or not messages[last]["content"].strip():
            skipped += 1
            continue
        found.append(Example(messages[:last], messages[last]["content"], tools))
    return found, skipped


def load_examples(options: EvalOptions, recipe: Any) -> tuple[list[Example], str]:
    """(examples, where they came from in words) for eval.file or the run's held-out split."""
    from finetune.data import load

    settings = options.eval
    if settings.file:
        columns = dict(recipe.data.columns) if recipe is not None else {}
        rows, _, _ = load.load_source(settings.file, settings.format, columns, on_bad_record="error",
                                      max_samples=None, num_proc=None, where="eval.file")
        what = settings.file
    else:
        if recipe is None:
            raise UserError("model= has no held-out split: give eval.file=PATH (any format `finetune data` reads) "
                            "or a benchmark with eval.dir=DIR eval.task=ceval|cmmlu|mmlu")
        splits, _, _ = load.load_splits(recipe)
        if "eval" in splits:
            rows, what = splits["eval"], "the run's held-out split"
        else:
            log.warning("the run holds nothing out (data.val_size=0, no data.eval_path): scoring its TRAINING "
                        "examples, which says how well it learned them, not how it generalises; pass "
                        "eval.file=PATH for held-out data")
            rows, what = splits["train"], "the run's training data (no held-out split)"
    found, skipped = examples_of(rows, settings.limit)
    if skipped:
        log.warning(f"{skipped} conversation(s) have no answer text to score (plain text or tool calls only)")
    if not found:
        raise UserError(f"{what}: no conversation with an answer to score")
    return found, what


def evaluate(engine: Any, examples: list[Example], max_new_tokens: int, progress: Any) -> list[dict[str, Any]]:
    """One prediction row per example: prompt, reference, prediction, its scores."""
    from finetune.infer.generate import Sampling

    sampling = Sampling(temperature=0.0, max_tokens=max_new_tokens)
    rows = []
    for example in progress(examples, desc="generating", unit="answer"):
        try:
            prompt = engine.prompt_ids(example.messages, tools=example.tools)
            done = engine.generate(prompt, sampling)
            prediction, finish, tokens = done.text, done.finish_reason, done.completion_tokens
        except ValueError as exc:  # a conversation the format refuses, or longer than the context
            prediction, finish, tokens = "", f"error: {exc}", 0
        shown = [{k: v for k, v in m.items() if v is not None} for m in example.messages]
        rows.append({"messages": shown, "reference": example.reference, "prediction": prediction,
                     "finish_reason": finish, "completion_tokens": tokens,
                     **metrics.score(prediction, example.reference)})
    return rows


def summary(rows: list[dict[str, Any]], what: str, max_new_tokens: int) -> dict[str, Any]:
    return {"data": what, "count": len(rows), "max_new_tokens": max_new_tokens, "decoding": "greedy",
            **metrics.mean(rows), "stopped": sum(r["finish_reason"] == "stop" for r in rows),
            "predictions": "predictions.jsonl"}
