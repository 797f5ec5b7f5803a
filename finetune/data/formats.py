"""Every supported record layout → one internal schema, so rendering and packing see a single shape.

Internal SFT row: `messages` = [{role, content}], roles `system` (optional, first) / `user` / `assistant`,
alternating and ending with an assistant answer. Plain text for continued pretraining is one message with role
`text` (render.py tokenizes it without a chat template). Internal preference row: `prompt` (messages ending with a
user turn), `chosen` and `rejected` (answer strings).

Conversion never raises on a bad record: it returns a reason code and a sentence naming the field. That keeps the
verdict inside the (cached, multi-process) `datasets.map` output, so `on_bad_record=skip` counts come from the data
itself and `on_bad_record=error` can name the first bad record's file and line afterwards (load.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from datasets import Features, List, Value

from finetune.errors import UserError, did_you_mean

FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # format: (required fields, optional fields); a field is read from the column data.columns.<field> names
    "preference": (("prompt", "chosen", "rejected"), ("system",)),
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "text": (("text",), ()),
}
"""Detection tries the formats in this order: the first whose required columns are all present wins."""

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
"""Role names seen in the wild (OpenAI, ShareGPT, Gemini) → ours. Tool/observation turns are not supported."""

TURN_KEYS = {"role": ("role", "from"), "content": ("content", "value")}
"""Keys of one turn: OpenAI {role, content} or ShareGPT {from, value}; data.columns.role/content override them."""

MESSAGES = List({"role": Value("string"), "content": Value("string")})
META = {"_src": Value("string"), "_row": Value("int64"), "_drop": Value("string"), "_why": Value("string")}
SFT_FEATURES = Features({"messages": MESSAGES, **META})
PREFERENCE_FEATURES = Features({"prompt": MESSAGES, "chosen": Value("string"), "rejected": Value("string"), **META})


def kind(value: Any) -> str:
    """A JSON value's type in the words of an error message."""
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", int: "a number",
            float: "a number"}.get(type(value), "null")


class BadRecord(Exception):
    """One record that cannot be used; `reason` is the key counted in `dropped`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_format(fmt: str, where: str) -> str:
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"{where}: unknown data format '{fmt}'{did_you_mean(fmt, FORMATS)}; "
                        f"use one of auto, {', '.join(FORMATS)}")
    return fmt


def detect(column_names: Iterable[str], columns: Mapping[str, str], where: str) -> str:
    """The format whose required columns the file has (after the data.columns mapping)."""
    present = set(column_names)
    for fmt, (required, _) in FORMATS.items():
        if all(columns.get(f, f) in present for f in required):
            return fmt
    raise UserError(f"{where}: cannot tell the data format from its columns {sorted(present)}; expected one of: "
                    + "; ".join(f"{fmt} ({', '.join(req)})" for fmt, (req, _) in FORMATS.items())
                    + ". Set data.format=... and map columns with data.columns.<field>=<column>")


def _text(record: Mapping[str, Any], field: str, columns: Mapping[str, str], required: bool = True) -> str | None:
    column = columns.get(field, field)
    value = record.get(column)
    if value is None:
        if required:
            raise BadRecord("missing_field", f"'{column}' is missing")
        return None
    if not isinstance(value, str):
        raise BadRecord("bad_type", f"'{column}' must be text, got {kind(value)}")
    return value


def _turns(value: Any, field: str, columns: Mapping[str, str]) -> list[dict[str, str]]:
    """A list of turns in either key style → [{role, content}] with our role names."""
    if value is None:
        raise BadRecord("missing_field", f"'{field}' is missing")
    if not isinstance(value, list):
        raise BadRecord("bad_type", f"'{field}' must be a list of turns, got {kind(value)}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise BadRecord("bad_type", f"{field}[{i}] must be an object with a role and a content")
        keys = {}
        for part, candidates in TURN_KEYS.items():
            names = (columns[part],) if part in columns else candidates
            keys[part] = next((k for k in names if turn.get(k) is not None), None)
            if keys[part] is None:
                raise BadRecord("missing_field", f"{field}[{i}]: '{'/'.join(names)}' is missing")
        role, content = turn[keys["role"]], turn[keys["content"]]
        if role not in ROLES:
            raise BadRecord("unknown_role", f"{field}[{i}]: role '{role}' is not one of "
                            f"{', '.join(sorted(ROLES))}{did_you_mean(str(role), ROLES)}")
        if not isinstance(content, str):
            raise BadRecord("bad_type", f"{field}[{i}].{keys['content']} must be text, got {kind(content)}")
        turns.append({"role": ROLES[role], "content": content})
    return turns


def check_conversation(messages: list[dict[str, str]], field: str, ends_with: str = "assistant") -> None:
    """Optional system first, then user/assistant alternating, ending with `ends_with`; no empty message."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise BadRecord("missing_field", f"'{field}' has no user/assistant turns")
    offset = len(messages) - len(body)
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            after = f"after '{body[i - 1]['role']}'" if i else "first"
            raise BadRecord("bad_role_order", f"{field}[{i + offset}]: role '{message['role']}' {after}; "
                            "turns must be (system,) user, assistant, user, assistant, ...")
        if not message["content"].strip():
            reason = "empty_answer" if expected == "assistant" else "empty_message"
            raise BadRecord(reason, f"{field}[{i + offset}]: the {expected} content is empty")
    if body[-1]["role"] != ends_with:
        raise BadRecord("bad_role_order", f"'{field}' ends with a {body[-1]['role']} turn; "
                        f"it must end with {'an' if ends_with == 'assistant' else 'a'} {ends_with} turn")


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _alpaca(record: Mapping[str, Any], columns: Mapping[str, str]) -> list[dict[str, str]]:
    instruction = _text(record, "instruction", columns)
    extra = _text(record, "input", columns, required=False)
    output = _text(record, "output", columns)
    history = record.get(columns.get("history", "history")) or []
    messages: list[dict[str, str]] = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise BadRecord("bad_type", f"'history'[{i}] must be a [question, answer] pair of texts")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = "\n".join(part for part in (instruction, extra) if part and part.strip())
    if not prompt:
        raise BadRecord("empty_message", f"'{columns.get('instruction', 'instruction')}' is empty")
    if not output.strip():  # type: ignore[union-attr]
        raise BadRecord("empty_answer", f"'{columns.get('output', 'output')}' is empty")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return _with_system(messages, _text(record, "system", columns, required=False))


def to_messages(record: Mapping[str, Any], fmt: str, columns: Mapping[str, str]) -> list[dict[str, str]]:
    """One record of an SFT format → checked internal messages; raises BadRecord."""
    if fmt == "text":
        text = _text(record, "text", columns)
        if not text.strip():  # type: ignore[union-attr]
            raise BadRecord("empty_text", f"'{columns.get('text', 'text')}' is empty")
        return [{"role": "text", "content": text}]  # type: ignore[dict-item]
    if fmt == "alpaca":
        messages = _alpaca(record, columns)
        field = columns.get("history", "history")
    else:
        field = columns.get(FORMATS[fmt][0][0], FORMATS[fmt][0][0])
        messages = _with_system(_turns(record.get(field), field, columns),
                                _text(record, "system", columns, required=False))
        if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
            messages = messages[1:]  # exports often carry an empty system turn: it means "no system prompt"
    check_conversation(messages, field)
    return messages


def _answer(record: Mapping[str, Any], field: str, columns: Mapping[str, str]) -> str:
    column = columns.get(field, field)
    value = record.get(column)
    if isinstance(value, list):  # TRL's conversational style: [{"role": "assistant", "content": ...}]
        turns = _turns(value, column, columns)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise BadRecord("bad_role_order", f"'{column}' must hold exactly one assistant turn")
        value = turns[0]["content"]
    value = _text({column: value}, column, {})
    if not value.strip():  # type: ignore[union-attr]
        raise BadRecord("empty_answer", f"'{column}' is empty")
    return value  # type: ignore[return-value]


def to_preference(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """One preference record → {prompt: messages ending with user, chosen, rejected}; raises BadRecord."""
    column = columns.get("prompt", "prompt")
    value = record.get(column)
    if isinstance(value, list):
        prompt = _turns(value, column, columns)
    else:
        prompt = [{"role": "user", "content": _text(record, "prompt", columns)}]
    prompt = _with_system(prompt, _text(record, "system", columns, required=False))  # type: ignore[arg-type]
    check_conversation(prompt, column, ends_with="user")
    return {"prompt": prompt, "chosen": _answer(record, "chosen", columns),
            "rejected": _answer(record, "rejected", columns)}


def convert_batch(batch: dict[str, list], indices: list[int], *, fmt: str, columns: dict[str, str],
                  src: str) -> dict[str, list]:
    """Batched `datasets.map` function: rows of `fmt` → internal rows, bad ones marked in `_drop`/`_why`."""
    out: dict[str, list] = {k: [] for k in (PREFERENCE_FEATURES if fmt == "preference" else SFT_FEATURES)}
    names = list(batch)
    for i, row in enumerate(indices):
        record = {name: batch[name][i] for name in names}
        try:
            if fmt == "preference":
                converted = to_preference(record, columns)
            else:
                converted = {"messages": to_messages(record, fmt, columns)}
            drop, why = "", ""
        except BadRecord as bad:
            converted = {k: None for k in out if not k.startswith("_")}
            drop, why = bad.reason, str(bad)
        for key, value in converted.items():
            out[key].append(value)
        out["_src"].append(src)
        out["_row"].append(row)
        out["_drop"].append(drop)
        out["_why"].append(why)
    return out
