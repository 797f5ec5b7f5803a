"""Internal rows → token ids and labels in the base model's exact chat format (finetune.models.templates).

The template module owns the ids and the label values (DECISIONS.md "Training labels"); this module adds what a
dataset needs around them: the recipe's default system prompt, plain text for continued pretraining, and a
length policy that never cuts inside a prompt without saying so:

- fits in train.max_length → kept as is;
- too long, but at least one whole answer fits → cut right after the last answer that fits (later turns are
  dropped), counted as `truncated`;
- too long, the prompt before the first answer fits but not that answer → the first answer is cut at
  max_length (its stop token is lost), counted as `truncated`;
- the prompt before the first answer alone reaches max_length → dropped, counted as `too_long_prompt`.
Plain text longer than max_length is split into max_length chunks (nothing is lost, nothing counted).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from datasets import DatasetDict
from datasets.fingerprint import Hasher

from finetune.data import load
from finetune.models import templates
from finetune.models.templates import encode_conversation, encode_prompt

IGNORE = -100


def fit(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], str]:
    """(ids, labels, status) under the length policy above; status is "", "truncated" or "too_long_prompt"."""
    if len(input_ids) <= max_length:
        return input_ids, labels, ""
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    if not trained or trained[0] >= max_length:
        return [], [], "too_long_prompt"
    answer_ends = [i + 1 for i in trained if i + 1 == len(labels) or labels[i + 1] == IGNORE]
    cut = max((end for end in answer_ends if end <= max_length), default=max_length)
    return input_ids[:cut], labels[:cut], "truncated"


def with_system(messages: list[dict[str, str]], system_prompt: Optional[str]) -> list[dict[str, str]]:
    """The recipe's data.system_prompt for conversations that bring none (else the template's own default)."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def tokenizer_hash(tokenizer: Any) -> str:
    """Identity of a tokenizer for cache fingerprints: its full serialized pipeline (fast tokenizers), else its
    vocabulary; plus its special tokens. Never its directory, which may also hold the model's weights."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(Hasher.hash(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return digest.hexdigest()[:16]


def _text_rows(texts: list[str], tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """One text → chunks of ≤ max_length tokens, ending with eos; every token trained but those the tokenizer adds
    itself (BOS, [gMASK]sop). Special-token strings inside the text stay plain text."""
    encoded = tokenizer(texts, add_special_tokens=True, return_special_tokens_mask=True, split_special_tokens=True)
    rows = []
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
        labels = [IGNORE if s else i for i, s in zip(ids, special)]
        if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
            ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
        rows.append([(ids[s:s + max_length], labels[s:s + max_length]) for s in range(0, len(ids), max_length)])
    return rows  # type: ignore[return-value]


SFT_COLUMNS = ("input_ids", "labels", "attention_mask", "_src", "_row", "_drop", "_why", "_truncated", "_length")


def render_batch(batch: dict[str, list], *, template: str, tokenizer: Any, max_length: int,
                 system_prompt: Optional[str]) -> dict[str, list]:
    """Batched `datasets.map` function for SFT rows; a row the template refuses is marked, never raised."""
    out: dict[str, list] = {k: [] for k in SFT_COLUMNS}

    def emit(ids: list[int], labels: list[int], i: int, drop: str = "", why: str = "", truncated: bool = False,
             length: int = 0) -> None:
        for key, value in zip(SFT_COLUMNS, (ids, labels, [1] * len(ids), batch["_src"][i], batch["_row"][i], drop,
                                            why, truncated, length or len(ids))):
            out[key].append(value)

    texts = [i for i, m in enumerate(batch["messages"]) if m[0]["role"] == "text"]
    chunks = dict(zip(texts, _text_rows([batch["messages"][i][0]["content"] for i in texts], tokenizer,
                                        max_length))) if texts else {}
    for i, messages in enumerate(batch["messages"]):
        if i in chunks:
            for ids, labels in chunks[i]:
                emit(ids, labels, i)
            continue
        try:
            encoded = encode_conversation(template, tokenizer, with_system(messages, system_prompt))
        except ValueError as exc:
            emit([], [], i, "template", f"the {template} template refuses this conversation: {exc}")
            continue
        ids, labels, status = fit(list(encoded.input_ids), list(encoded.labels), max_length)
        if status == "too_long_prompt":
            prompt = next((k for k, label in enumerate(encoded.labels) if label != IGNORE), len(encoded.labels))
            emit(ids, labels, i, status, f"the prompt before the first answer has {prompt} tokens, "
                                         f"train.max_length={max_length}", length=len(encoded.input_ids))
        else:
            emit(ids, labels, i, truncated=status == "truncated", length=len(encoded.input_ids))
    return out


PREFERENCE_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "_src", "_row", "_drop", "_why", "_truncated",
                      "_length")


def _completion(template: str, tokenizer: Any, prompt: list[dict[str, str]], prompt_ids: list[int],
                answer: str) -> list[int]:
    """The answer's ids as the template renders them after `prompt_ids`, up to its last trained token."""
    encoded = encode_conversation(template, tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    ids, labels = list(encoded.input_ids), list(encoded.labels)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the prompt is tokenized differently when the answer follows it")
    last = max(i for i, label in enumerate(labels) if label != IGNORE)
    return ids[len(prompt_ids):last + 1]


def render_preference_batch(batch: dict[str, list], *, template: str, tokenizer: Any, max_length: int,
                            system_prompt: Optional[str]) -> dict[str, list]:
    """Batched map function for preference rows → prompt_ids / chosen_ids / rejected_ids (exact template ids)."""
    out: dict[str, list] = {k: [] for k in PREFERENCE_COLUMNS}
    for i, prompt in enumerate(batch["prompt"]):
        prompt = with_system(prompt, system_prompt)
        drop, why, truncated = "", "", False
        try:
            prompt_ids = list(encode_prompt(template, tokenizer, prompt))
            chosen = _completion(template, tokenizer, prompt, prompt_ids, batch["chosen"][i])
            rejected = _completion(template, tokenizer, prompt, prompt_ids, batch["rejected"][i])
        except ValueError as exc:
            prompt_ids, chosen, rejected = [], [], []
            drop, why = "template", f"the {template} template refuses this record: {exc}"
        length = len(prompt_ids) + max(len(chosen), len(rejected))
        if not drop and len(prompt_ids) >= max_length:
            drop = "too_long_prompt"
            why = f"the prompt has {len(prompt_ids)} tokens, over train.max_length={max_length}"
            prompt_ids, chosen, rejected = [], [], []
        elif not drop and length > max_length:
            room = max_length - len(prompt_ids)
            chosen, rejected, truncated = chosen[:room], rejected[:room], True
        for key, value in zip(PREFERENCE_COLUMNS, (prompt_ids, chosen, rejected, batch["_src"][i],
                                                   batch["_row"][i], drop, why, truncated, length)):
            out[key].append(value)
    return out


def prepare(recipe: Any, tokenizer: Any, template: str) -> tuple[DatasetDict, Counter, bool]:
    """Load and render every split (cached by fingerprint: a second run tokenizes nothing). Returns the rendered
    splits with their bookkeeping columns, the dropped counts by reason, and whether it is preference data."""
    splits, dropped, preference = load.load_splits(recipe)
    function = render_preference_batch if preference else render_batch
    code = load.code_hash(Path(__file__), Path(templates.__file__))
    kwargs = {"template": template, "tokenizer": tokenizer, "max_length": recipe.train.max_length,
              "system_prompt": recipe.data.system_prompt}
    tok = tokenizer_hash(tokenizer)
    rendered = {}
    for name, split in splits.items():
        ds = split.map(function, batched=True, remove_columns=split.column_names, fn_kwargs=kwargs,
                       num_proc=load.procs(recipe.data.num_proc, len(split)), desc=f"Tokenizing {name}",
                       new_fingerprint=load.fingerprint(split._fingerprint, function.__name__, template, tok,
                                                        recipe.train.max_length, recipe.data.system_prompt, code))
        rendered[name], bad = load.settle(ds, recipe.data.on_bad_record, policy=("too_long_prompt",))
        dropped += bad
    return DatasetDict(rendered), dropped, preference
