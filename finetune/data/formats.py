"""Every supported record layout → one internal schema, so rendering and packing see a single shape.

Internal SFT row: `messages` = [{role, content, tool_calls}] (turns.py), `system` (optional, first), then `user`
first; an answer is followed by a user turn, an assistant turn with tool calls by `tool` results, results by
more results or an answer; it ends with an assistant turn. `tools`: the JSON text of the function schemas the
conversation may call, or null. Plain text for continued pretraining is one message with role `text` (render.py
tokenizes it without a chat template). Internal preference row: `prompt` (messages ending with a user turn or
tool results), `chosen` and `rejected` (answer strings), `tools`.

Preference layouts: TRL's prompt/chosen/rejected, LLaMA-Factory's sharegpt one (`conversations` + `chosen` +
`rejected`, answers as turn objects), the same with `messages`, and LLaMA-Factory's alpaca one (instruction/input
+ chosen/rejected). KTO records (a conversation with a true/false `label`, or TRL's prompt/completion/label) train
with stage=kto only, never as SFT by mistake; internal KTO row: `prompt`, `completion` (the answer judged),
`label`, `tools`.

Conversion never raises on a bad record: it returns a reason code and a sentence naming the field. That keeps the
verdict inside the (cached, multi-process) `datasets.map` output, so `on_bad_record=skip` counts come from the data
itself and `on_bad_record=error` can count every bad record and name the first few by file and line (load.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Optional, Union

from datasets import Features, List, Value

from finetune.data.files import original_row
from finetune.data.kinds import Kind
from finetune.data.turns import BadRecord, kind, message, parse_turn, parse_turns, tools_of
from finetune.errors import UserError, did_you_mean

Field = Union[str, tuple[str, ...]]  # a field, or alternatives of which one must be present
FORMATS: dict[str, tuple[tuple[Field, ...], tuple[str, ...]]] = {
    # format: (required fields, optional fields); a field is read from the column data.columns.<field> names
    "kto": (("label", ("messages", "conversations", "completion")), ("tools",)),
    "preference": (("prompt", "chosen", "rejected"), ("system", "tools")),
    "sharegpt_preference": (("conversations", "chosen", "rejected"), ("system", "tools")),
    "messages_preference": (("messages", "chosen", "rejected"), ("tools",)),
    "alpaca_preference": (("instruction", "chosen", "rejected"), ("input", "system", "history")),
    "messages": (("messages",), ("tools",)),
    "sharegpt": (("conversations",), ("system", "tools")),
    "alpaca": (("instruction", "output"), ("input", "system", "history", "tools")),
    "text": (("text",), ()),
}
"""Detection tries the formats in this order: the first whose required columns are all present wins."""

PREFERENCE = ("preference", "sharegpt_preference", "messages_preference", "alpaca_preference")
CONVERSATION = {"messages": "messages", "messages_preference": "messages", "sharegpt": "conversations",
                "sharegpt_preference": "conversations"}
"""The field holding the turns, for the formats that have one."""

MESSAGES = List({"role": Value("string"), "content": Value("string"),
                 "tool_calls": List({"name": Value("string"), "arguments": Value("string")})})
META = {"_src": Value("string"), "_row": Value("int64"), "_drop": Value("string"), "_why": Value("string")}
SFT_FEATURES = Features({"messages": MESSAGES, "tools": Value("string"), **META})
PREFERENCE_FEATURES = Features({"prompt": MESSAGES, "chosen": Value("string"), "rejected": Value("string"),
                                "tools": Value("string"), **META})
KTO_FEATURES = Features({"prompt": MESSAGES, "completion": Value("string"), "label": Value("bool"),
                         "tools": Value("string"), **META})
NO_ROLES: Mapping[str, str] = MappingProxyType({})  # a source without role names of its own
FOLLOWS = {"user": ("assistant",), "assistant": ("user",), "call": ("tool",), "tool": ("tool", "assistant")}
"""Which roles may follow a turn: a user turn, an answer, an assistant turn with tool calls, a tool result."""

__all__ = ["BadRecord", "FORMATS", "PREFERENCE", "check_format", "check_stage", "convert_batch", "detect", "features",
           "kind", "kind_of", "to_kto", "to_messages", "to_preference"]


def check_format(fmt: str, where: str) -> str:
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"{where}: unknown data format '{fmt}'{did_you_mean(fmt, FORMATS)}; "
                        f"use one of auto, {', '.join(FORMATS)}")
    return fmt


def check_stage(fmt: str, where: str, stage: str) -> None:
    """KTO data is never trained as something else by accident."""
    if fmt == "kto" and stage != "kto":
        raise UserError(f"{where}: these are KTO records (an answer with a true/false 'label'); they train with "
                        f"stage=kto, not stage={stage}. To train the conversations as SFT regardless of their label, "
                        "set data.format=messages (or sharegpt)")


def kind_of(fmt: str) -> Kind:
    """The kind of data (kinds.py) a format holds: one kind per run."""
    return "unpaired" if fmt == "kto" else "paired" if fmt in PREFERENCE else "conversations"


def features(fmt: str) -> Features:
    """The internal row schema a format converts to."""
    return {"unpaired": KTO_FEATURES, "paired": PREFERENCE_FEATURES, "conversations": SFT_FEATURES}[kind_of(fmt)]


def _present(field: Field, present: set[str], columns: Mapping[str, str]) -> bool:
    return any(columns.get(f, f) in present for f in ((field,) if isinstance(field, str) else field))


def detect(column_names: Iterable[str], columns: Mapping[str, str], where: str) -> str:
    """The format whose required columns the file has (after the data.columns mapping)."""
    present = set(column_names)
    for fmt, (required, _) in FORMATS.items():
        if all(_present(f, present, columns) for f in required):
            return fmt
    described = "; ".join(f"{fmt} ({', '.join(f if isinstance(f, str) else '|'.join(f) for f in required)})"
                          for fmt, (required, _) in FORMATS.items())
    raise UserError(f"{where}: cannot tell the data format from its columns {sorted(present)}; expected one of: "
                    f"{described}. Set data.format=... and map columns with data.columns.<field>=<column>")


def _text(record: Mapping[str, Any], field: str, columns: Mapping[str, str], required: bool = True
          ) -> Optional[str]:
    column = columns.get(field, field)
    value = record.get(column)
    if value is None:
        if required:
            raise BadRecord("missing_field", f"'{column}' is missing")
        return None
    if not isinstance(value, str):
        raise BadRecord("bad_type", f"'{column}' must be text, got {kind(value)}")
    return value


def check_conversation(messages: list[dict[str, Any]], field: str, ends_with: tuple[str, ...] = ("assistant",)
                       ) -> None:
    """Optional system first, then user first and each turn followed by a role FOLLOWS allows, ending with a role
    in `ends_with`; no empty message (a tool call may have no text, a tool result may be empty)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise BadRecord("missing_field", f"'{field}' has no user/assistant turns")
    offset, expected = len(messages) - len(body), ("user",)
    for i, m in enumerate(body):
        if m["role"] not in expected:
            previous = body[i - 1] if i else None
            after = "first" if previous is None else \
                "after a tool call" if previous["tool_calls"] else f"after '{previous['role']}'"
            raise BadRecord("bad_role_order", f"{field}[{i + offset}]: role '{m['role']}' {after}; turns must be "
                            "(system,) user, assistant, user, assistant, ...; tool results follow a tool call")
        if not m["content"].strip() and not m["tool_calls"] and m["role"] != "tool":
            reason = "empty_answer" if m["role"] == "assistant" else "empty_message"
            raise BadRecord(reason, f"{field}[{i + offset}]: the {m['role']} content is empty")
        expected = FOLLOWS["call" if m["tool_calls"] else m["role"]]
    if body[-1]["role"] not in ends_with:
        raise BadRecord("bad_role_order", f"'{field}' ends with {_a(body[-1]['role'])} turn; it must end with "
                        + " or ".join(f"{_a(role)} turn" for role in ends_with))


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def _with_system(messages: list[dict[str, Any]], system: Optional[str]) -> list[dict[str, Any]]:
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        return [message("system", system), *messages]
    return messages


def _alpaca_prompt(record: Mapping[str, Any], columns: Mapping[str, str]) -> list[dict[str, Any]]:
    """History pairs, then instruction + "\\n" + input as the user turn (system not yet added)."""
    instruction = _text(record, "instruction", columns)
    extra = _text(record, "input", columns, required=False)
    history = record.get(columns.get("history", "history")) or []
    messages: list[dict[str, Any]] = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise BadRecord("bad_type", f"'history'[{i}] must be a [question, answer] pair of texts")
        messages += [message("user", pair[0]), message("assistant", pair[1])]
    prompt = "\n".join(part for part in (instruction, extra) if part and part.strip())
    if not prompt:
        raise BadRecord("empty_message", f"'{columns.get('instruction', 'instruction')}' is empty")
    return [*messages, message("user", prompt)]


def _conversation(record: Mapping[str, Any], fmt: str, columns: Mapping[str, str], roles: Mapping[str, str]
                  ) -> tuple[list[dict[str, Any]], str]:
    """The turns of a conversation format (with its system column), and the column they came from."""
    field = columns.get(CONVERSATION[fmt], CONVERSATION[fmt])
    messages = _with_system(parse_turns(record.get(field), field, columns, roles),
                            _text(record, "system", columns, required=False))
    if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages = messages[1:]  # exports often carry an empty system turn: it means "no system prompt"
    return messages, field


def _tools(record: Mapping[str, Any], columns: Mapping[str, str]) -> Optional[str]:
    column = columns.get("tools", "tools")
    return tools_of(record.get(column), column)


def to_messages(record: Mapping[str, Any], fmt: str, columns: Mapping[str, str],
                roles: Mapping[str, str] = NO_ROLES) -> list[dict[str, Any]]:
    """One record of an SFT format → checked internal messages; raises BadRecord."""
    if fmt == "text":
        text = _text(record, "text", columns)
        if not text.strip():  # type: ignore[union-attr]
            raise BadRecord("empty_text", f"'{columns.get('text', 'text')}' is empty")
        return [message("text", text)]  # type: ignore[arg-type]
    if fmt == "alpaca":
        output = _text(record, "output", columns)
        if not output.strip():  # type: ignore[union-attr]
            raise BadRecord("empty_answer", f"'{columns.get('output', 'output')}' is empty")
        messages = _with_system([*_alpaca_prompt(record, columns), message("assistant", output)],  # type: ignore
                                _text(record, "system", columns, required=False))
        field = columns.get("history", "history")
    else:
        messages, field = _conversation(record, fmt, columns, roles)
    check_conversation(messages, field)
    return messages


def _answer(record: Mapping[str, Any], field: str, columns: Mapping[str, str], roles: Mapping[str, str]) -> str:
    """An answer given as text, as one turn object (LLaMA-Factory) or as a list of one turn (TRL)."""
    column = columns.get(field, field)
    value = record.get(column)
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list):
        turns = [parse_turn(turn, f"{column}[{i}]", columns, roles) for i, turn in enumerate(value)]
        if len(turns) != 1 or turns[0]["role"] != "assistant" or turns[0]["tool_calls"]:
            raise BadRecord("bad_role_order", f"'{column}' must hold exactly one assistant answer (text)")
        value = turns[0]["content"]
    value = _text({column: value}, column, {})
    if not value.strip():  # type: ignore[union-attr]
        raise BadRecord("empty_answer", f"'{column}' is empty")
    return value  # type: ignore[return-value]


def to_preference(record: Mapping[str, Any], columns: Mapping[str, str], fmt: str = "preference",
                  roles: Mapping[str, str] = NO_ROLES) -> dict[str, Any]:
    """One preference record → {prompt: messages ending with a user turn or tool results, chosen, rejected,
    tools}; raises BadRecord."""
    if fmt == "alpaca_preference":
        field = columns.get("instruction", "instruction")
        prompt = _with_system(_alpaca_prompt(record, columns), _text(record, "system", columns, required=False))
    elif fmt in CONVERSATION:
        prompt, field = _conversation(record, fmt, columns, roles)
    else:
        field = columns.get("prompt", "prompt")
        value = record.get(field)
        prompt = parse_turns(value, field, columns, roles) if isinstance(value, list) else \
            [message("user", _text(record, "prompt", columns))]  # type: ignore[arg-type]
        prompt = _with_system(prompt, _text(record, "system", columns, required=False))
    check_conversation(prompt, field, ends_with=("user", "tool"))
    return {"prompt": prompt, "chosen": _answer(record, "chosen", columns, roles),
            "rejected": _answer(record, "rejected", columns, roles), "tools": _tools(record, columns)}


def to_kto(record: Mapping[str, Any], columns: Mapping[str, str], roles: Mapping[str, str] = NO_ROLES
           ) -> dict[str, Any]:
    """One KTO record → {prompt, completion, label, tools}: a conversation whose last answer is judged, or TRL's
    prompt + completion; raises BadRecord."""
    column = columns.get("label", "label")
    label = record.get(column)
    if not isinstance(label, bool):
        raise BadRecord("bad_type", f"'{column}' must be true or false, got {kind(label)}")
    if record.get(columns.get("completion", "completion")) is not None:
        prompt = to_preference({**record, "chosen": "-", "rejected": "-"}, columns)["prompt"]
        completion = _answer(record, "completion", columns, roles)
    else:
        fmt = "messages" if record.get(columns.get("messages", "messages")) is not None else "sharegpt"
        messages, field = _conversation(record, fmt, columns, roles)
        check_conversation(messages, field)
        if messages[-1]["tool_calls"]:
            raise BadRecord("bad_role_order", f"'{field}': the judged (last) answer must be text, not a tool call")
        prompt, completion = messages[:-1], messages[-1]["content"]
    return {"prompt": prompt, "completion": completion, "label": label, "tools": _tools(record, columns)}


def convert_batch(batch: dict[str, list], indices: list[int], *, fmt: str, columns: dict[str, str],
                  roles: dict[str, str], src: str, skipped: tuple[int, ...] = ()) -> dict[str, list]:
    """Batched `datasets.map` function: rows of `fmt` → internal rows, bad ones marked in `_drop`/`_why`. `_row` is
    the record's number in `src`, past the records `skipped` (sorted) that files.read_file could not load."""
    out: dict[str, list] = {k: [] for k in features(fmt)}
    names, kind = list(batch), kind_of(fmt)
    for i, row in enumerate(indices):
        record = {name: batch[name][i] for name in names}
        try:
            if kind == "unpaired":
                converted = to_kto(record, columns, roles)
            elif kind == "paired":
                converted = to_preference(record, columns, fmt, roles)
            else:
                converted = {"messages": to_messages(record, fmt, columns, roles),
                             "tools": None if fmt == "text" else _tools(record, columns)}
            drop, why = "", ""
        except BadRecord as bad:
            converted = {k: None for k in out if not k.startswith("_")}
            drop, why = bad.reason, str(bad)
        for key, value in converted.items():
            out[key].append(value)
        out["_src"].append(src)
        out["_row"].append(original_row(row, skipped))
        out["_drop"].append(drop)
        out["_why"].append(why)
    return out
