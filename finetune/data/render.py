"""Internal rows → token ids and labels in the base model's exact chat format (finetune.models.chat).

The chat format owns the ids and the label values; this module adds what a dataset needs around them: the recipe's
default system prompt, plain text for continued pretraining, and a length policy that never cuts inside a prompt
without saying so:

- fits in train.max_length → kept as is;
- too long, but at least one whole answer fits → cut right after the last answer that fits (later turns are
  dropped), counted as `truncated`;
- too long, the prompt before the first answer fits but not that answer → the first answer is cut at
  max_length (its stop token is lost), counted as `truncated`;
- the prompt before the first answer alone reaches max_length → dropped, counted as `too_long_prompt`.
Plain text longer than max_length is split into max_length chunks (nothing is lost, nothing counted).

Speed: a batch's conversations are tokenized together (ChatFormat.tokenize: one batched tokenizer call), and labels,
the length policy and plain-text labels work on arrays, not token by token, and a batch is returned as one Arrow
table whose columns are built whole, instead of `datasets` inspecting and converting every row.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
from datasets import DatasetDict, Features, List, Value
from datasets.fingerprint import Hasher

from finetune.data import load
from finetune.data.kinds import Kind
from finetune.models import chat
from finetune.models.chat.format import ChatFormat
from finetune.models.chat.labels import IGNORE, trained_spans


def fit(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], str]:
    """(ids, labels, status) under the length policy above; status is "", "truncated" or "too_long_prompt"."""
    if len(input_ids) <= max_length:
        return input_ids, labels, ""
    trained = np.asarray(labels) != IGNORE
    if not trained[:max_length].any():
        return [], [], "too_long_prompt"
    answer_ends = np.flatnonzero(trained & ~np.append(trained[1:], False)) + 1  # after each run of trained tokens
    fitting = answer_ends[answer_ends <= max_length]
    cut = int(fitting[-1]) if len(fitting) else max_length
    return input_ids[:cut], labels[:cut], "truncated"


def with_system(messages: list[dict[str, Any]], system_prompt: Optional[str]) -> list[dict[str, Any]]:
    """The recipe's data.system_prompt for conversations that bring none (else the template's own default)."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


@functools.lru_cache(maxsize=256)
def tools_of(text: Optional[str]) -> Optional[list]:
    """A row's `tools` column (JSON text, formats.py) as the list the templates take; rows of one dataset often
    share one tool set, so it is parsed once."""
    return json.loads(text) if text else None


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
        labels = np.where(np.asarray(special, dtype=bool), IGNORE, np.asarray(ids, dtype=np.int64)).tolist()
        if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
            ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
        rows.append([(ids[s:s + max_length], labels[s:s + max_length]) for s in range(0, len(ids), max_length)])
    return rows  # type: ignore[return-value]


RENDERED_FEATURES = Features({
    "input_ids": List(Value("int32")), "labels": List(Value("int64")), "attention_mask": List(Value("int8")),
    "_src": Value("string"), "_row": Value("int64"), "_drop": Value("string"), "_why": Value("string"),
    "_truncated": Value("bool"), "_length": Value("int64")})
SFT_COLUMNS = tuple(name for name in RENDERED_FEATURES if name != "attention_mask")  # the mask follows input_ids


def _as_table(columns: dict[str, list]) -> pa.Table:
    """Rendered rows as one Arrow table: a list column is built from all its rows' values at once (and the
    attention mask from input_ids' offsets), instead of `datasets` converting row by row."""
    ends = np.cumsum([0, *map(len, columns["input_ids"])])
    offsets, total = pa.array(ends.astype(np.int32)), int(ends[-1])
    arrays = []
    for field in RENDERED_FEATURES.arrow_schema:
        if field.name == "attention_mask":
            values = np.ones(total, np.int8)
        elif pa.types.is_list(field.type):
            dtype = field.type.value_type.to_pandas_dtype()
            values = np.fromiter(itertools.chain.from_iterable(columns[field.name]), dtype, total)
        else:
            arrays.append(pa.array(columns[field.name], field.type))
            continue
        arrays.append(pa.ListArray.from_arrays(offsets, pa.array(values)))
    return pa.Table.from_arrays(arrays, schema=RENDERED_FEATURES.arrow_schema)


def render_batch(batch: dict[str, list], *, template: str, tokenizer: Any, max_length: int,
                 system_prompt: Optional[str]) -> pa.Table:
    """Batched `datasets.map` function for SFT rows; a row the template refuses is marked, never raised."""
    out: dict[str, list] = {k: [] for k in SFT_COLUMNS}

    def emit(ids: list[int], labels: list[int], i: int, drop: str = "", why: str = "", truncated: bool = False,
             length: int = 0) -> None:
        for key, value in zip(SFT_COLUMNS, (ids, labels, batch["_src"][i], batch["_row"][i], drop, why, truncated,
                                            length or len(ids))):
            out[key].append(value)

    texts = [i for i, m in enumerate(batch["messages"]) if m[0]["role"] == "text"]
    chunks = dict(zip(texts, _text_rows([batch["messages"][i][0]["content"] for i in texts], tokenizer,
                                        max_length))) if texts else {}
    conversations = {i: with_system(m, system_prompt) for i, m in enumerate(batch["messages"]) if i not in chunks}
    tools = {i: tools_of(batch["tools"][i]) for i in conversations}
    fmt = chat.get(template)
    tokens = fmt.tokenize(tokenizer, list(conversations.values()), list(tools.values()))
    for i in range(len(batch["messages"])):
        if i in chunks:
            for ids, labels in chunks[i]:
                emit(ids, labels, i)
            continue
        try:
            encoded = fmt.encode_conversation(tokenizer, conversations[i], tokens, tools[i])
        except ValueError as exc:
            emit([], [], i, "template", f"the {template} template refuses this conversation: {exc}")
            continue
        ids, labels, status = fit(encoded.input_ids, encoded.labels, max_length)
        if status == "too_long_prompt":
            trained = np.flatnonzero(np.asarray(encoded.labels) != IGNORE)
            prompt = int(trained[0]) if len(trained) else len(encoded.labels)
            emit(ids, labels, i, status, f"the prompt before the first answer has {prompt} tokens, "
                                         f"train.max_length={max_length}", length=len(encoded.input_ids))
        else:
            emit(ids, labels, i, truncated=status == "truncated", length=len(encoded.input_ids))
    return _as_table(out)


PREFERENCE_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "_src", "_row", "_drop", "_why", "_truncated",
                      "_length")


def _completion(fmt: ChatFormat, tokenizer: Any, prompt: list[dict[str, Any]], prompt_ids: list[int],
                answer: str, tools: Optional[list]) -> list[int]:
    """The answer's ids as the format renders them after `prompt_ids`, up to its last trained token."""
    encoded = fmt.encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": answer}], tools=tools)
    ids, labels = list(encoded.input_ids), list(encoded.labels)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the prompt is tokenized differently when the answer follows it")
    return ids[len(prompt_ids):trained_spans(labels)[-1][1]]


def render_preference_batch(batch: dict[str, list], *, template: str, tokenizer: Any, max_length: int,
                            system_prompt: Optional[str]) -> dict[str, list]:
    """Batched map function for preference rows → prompt_ids / chosen_ids / rejected_ids (exact template ids)."""
    out: dict[str, list] = {k: [] for k in PREFERENCE_COLUMNS}
    fmt = chat.get(template)
    for i, prompt in enumerate(batch["prompt"]):
        prompt = with_system(prompt, system_prompt)
        drop, why, truncated = "", "", False
        tools = tools_of(batch["tools"][i])
        try:
            prompt_ids = list(fmt.encode_prompt(tokenizer, prompt, tools))
            chosen = _completion(fmt, tokenizer, prompt, prompt_ids, batch["chosen"][i], tools)
            rejected = _completion(fmt, tokenizer, prompt, prompt_ids, batch["rejected"][i], tools)
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


KTO_COLUMNS = ("prompt_ids", "completion_ids", "label", "_src", "_row", "_drop", "_why", "_truncated", "_length")


def render_kto_batch(batch: dict[str, list], *, template: str, tokenizer: Any, max_length: int,
                     system_prompt: Optional[str]) -> dict[str, list]:
    """Batched map function for KTO rows → prompt_ids / completion_ids / label (exact template ids), under the
    preference rows' length policy."""
    out: dict[str, list] = {k: [] for k in KTO_COLUMNS}
    fmt = chat.get(template)
    for i, prompt in enumerate(batch["prompt"]):
        prompt = with_system(prompt, system_prompt)
        drop, why, tools = "", "", tools_of(batch["tools"][i])
        try:
            prompt_ids = list(fmt.encode_prompt(tokenizer, prompt, tools))
            completion = _completion(fmt, tokenizer, prompt, prompt_ids, batch["completion"][i], tools)
        except ValueError as exc:
            prompt_ids, completion = [], []
            drop, why = "template", f"the {template} template refuses this record: {exc}"
        length = len(prompt_ids) + len(completion)
        if not drop and len(prompt_ids) >= max_length:
            drop, why = "too_long_prompt", f"the prompt has {len(prompt_ids)} tokens, over train.max_length={max_length}"
            prompt_ids, completion = [], []
        for key, value in zip(KTO_COLUMNS, (prompt_ids, completion[:max_length - len(prompt_ids)], batch["label"][i],
                                            batch["_src"][i], batch["_row"][i], drop, why, length > max_length,
                                            length)):
            out[key].append(value)
    return out


RENDER = {"conversations": render_batch, "paired": render_preference_batch, "unpaired": render_kto_batch}
"""The map function that renders each kind of loaded data (kinds.py)."""


def prepare(recipe: Any, tokenizer: Any, template: str) -> tuple[DatasetDict, Counter, Kind]:
    """Load and render every split (cached by fingerprint: a second run tokenizes nothing). Returns the rendered
    splits with their bookkeeping columns, the dropped counts by reason, and the kind of data."""
    splits, dropped, kind = load.load_splits(recipe)
    function = RENDER[kind]
    code = load.code_hash(Path(__file__), *chat.SOURCES)
    kwargs = {"template": template, "tokenizer": tokenizer, "max_length": recipe.train.max_length,
              "system_prompt": recipe.data.system_prompt}
    tok = tokenizer_hash(tokenizer)
    rendered = {}
    for name, split in splits.items():
        ds = split.map(function, batched=True, remove_columns=split.column_names, fn_kwargs=kwargs,
                       features=RENDERED_FEATURES if kind == "conversations" else None,
                       num_proc=load.procs(recipe.data.num_proc, len(split)), desc=f"Tokenizing {name}",
                       new_fingerprint=load.fingerprint(split._fingerprint, function.__name__, template, tok,
                                                        recipe.train.max_length, recipe.data.system_prompt, code))
        rendered[name], bad = load.settle(ds, recipe.data.on_bad_record, policy=("too_long_prompt",),
                                          verb="refused")
        dropped += bad
    return DatasetDict(rendered), dropped, kind
