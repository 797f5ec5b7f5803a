"""One turn of any common chat layout → one internal message, so formats.py sees a single shape.

Internal message: {role, content, tool_calls}. Roles: `system`, `user`, `assistant`, `tool` (a tool's result).
`tool_calls` is None, or on an assistant message a list of {name, arguments} with `arguments` the JSON text of an
object (typed Arrow columns cannot hold arbitrary JSON). What is read:
- key styles: OpenAI {role, content} and ShareGPT {from, value}, or the keys data.columns.role/content name;
- role names seen in the wild (ROLES), plus a source's own names (a registry's tags, registry.py);
- tool calls: OpenAI's `tool_calls` ([{function: {name, arguments}}], arguments as JSON text or an object) and
  legacy `function_call` on assistant messages; ShareGPT/LLaMA-Factory `function_call` turns, whose value is the
  call as JSON ({"name", "arguments"} or a list of them); results: `tool`, `function`, `observation` turns;
- content as text, or a list of parts: OpenAI's {"type": "text", "text": ...} and LLaMA-Factory's
  {"type": "text", "value": ...}, joined without a separator (as chat templates render them). Images, audio
  and video parts are refused: the supported models read text only.
A bad turn raises BadRecord (a reason code and a sentence naming the field), never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

from finetune.errors import did_you_mean

CALL = "function_call"
"""The role our ROLES maps ShareGPT's call turns to: an assistant turn whose value is the call itself."""

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "tool": "tool", "function": "tool",
         "observation": "tool", "function_call": CALL}
"""Role names seen in the wild (OpenAI, ShareGPT, LLaMA-Factory, Gemini) → ours."""

TURN_KEYS = {"role": ("role", "from"), "content": ("content", "value")}
"""Keys of one turn: OpenAI {role, content} or ShareGPT {from, value}; data.columns.role/content override them."""

TEXT_PARTS = ("text", "input_text", "output_text")
"""Part types holding text (OpenAI chat and Responses API); any other type is media or unknown."""

MAX_DEPTH = 100
"""Deepest JSON nesting a record, or JSON text held in one of its fields (`tools`, a call's `arguments`, a
function_call turn's value), may have; chat data nests a few levels. The record is checked before any parser sees
it (files.check_json_shape): past about a thousand levels `datasets` recurses out of Python's stack, and at ~100,000
(a 400 KB line) pyarrow's JSON reader overflows the C stack and the process dies without a message. The text inside
a field is parsed here, where Python's parser, or the templates dumping it again while training, would run out of
stack past about a thousand levels (RecursionError)."""


class BadRecord(Exception):
    """One record that cannot be used; `reason` is the key counted in `dropped`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def kind(value: Any) -> str:
    """A JSON value's type in the words of an error message."""
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", int: "a number",
            float: "a number"}.get(type(value), "null")


def message(role: str, content: str, tool_calls: Optional[list[dict]] = None) -> dict[str, Any]:
    """An internal message with every key present (the Arrow schema declares all three)."""
    return {"role": role, "content": content, "tool_calls": tool_calls}


def text_of(content: Any, where: str) -> str:
    """A turn's content as text: a string as is, a list of text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRecord("bad_type", f"{where} must be text or a list of content parts, got {kind(content)}")
    texts = []
    for i, part in enumerate(content):
        part_type = part.get("type") if isinstance(part, Mapping) else None
        text = part.get("text", part.get("value")) if isinstance(part, Mapping) else None
        if part_type in TEXT_PARTS and isinstance(text, str):
            texts.append(text)
        elif isinstance(part_type, str) and part_type not in TEXT_PARTS:
            raise BadRecord("not_text", f"{where}[{i}] is a '{part_type}' part: images/audio are not supported "
                                        "(the models trained here read text only); keep text parts only")
        else:
            raise BadRecord("bad_type", f"{where}[{i}] must be a content part {{\"type\": \"text\", \"text\": ...}}")
    return "".join(texts)


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than `limit`, walked level by level (never recursively: the values
    in question are those too deep to recurse over)."""
    level = [value]
    for _ in range(limit):
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
    return any(isinstance(item, (dict, list)) for item in level)


def _parse_json(text: str, reason: str, what: str) -> Any:
    """JSON text from a field → its value; BadRecord(`reason`) saying `what` is wrong where it is not JSON or nests
    deeper than MAX_DEPTH."""
    too_deep = BadRecord(reason, f"{what} nested more than {MAX_DEPTH} levels deep")
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's 4300 digits
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "a number with too many digits"
        raise BadRecord(reason, f"{what} not valid JSON ({why})") from None
    except RecursionError:  # deeper than the parser's stack, so deeper than MAX_DEPTH
        raise too_deep from None
    if nests_deeper(value, MAX_DEPTH):
        raise too_deep
    return value


def _arguments(value: Any, where: str) -> str:
    """A call's arguments (an object, or its JSON text) → JSON text of the object."""
    if isinstance(value, str):
        value = _parse_json(value, "bad_tool_call", f"{where}: arguments are") if value.strip() else {}
    if not isinstance(value, Mapping):
        raise BadRecord("bad_tool_call", f"{where}: arguments must be a JSON object, got {kind(value)}")
    return json.dumps(value, ensure_ascii=False)


def _call(value: Any, where: str) -> dict[str, str]:
    """One call in OpenAI's {type, function: {name, arguments}} or the plain {name, arguments} form."""
    fn = value.get("function", value) if isinstance(value, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name.strip():
        raise BadRecord("bad_tool_call", f"{where} must be a call {{\"name\": ..., \"arguments\": {{...}}}}")
    return {"name": name, "arguments": _arguments(fn.get("arguments", fn.get("parameters")), where)}


def calls_of(value: Any, where: str) -> list[dict[str, str]]:
    """A call, a list of calls, or their JSON text (a ShareGPT function_call turn's value) → calls."""
    if isinstance(value, str):
        value = _parse_json(value, "bad_tool_call", f"{where}: the tool call is")
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise BadRecord("bad_tool_call", f"{where}: the list of tool calls is empty")
    return [_call(call, f"{where}[{i}]" if isinstance(value, list) else where) for i, call in enumerate(calls)]


def tools_of(value: Any, where: str) -> Optional[str]:
    """The tools a conversation may call (a list of function schemas, or its JSON text) → JSON text, or None when
    there are none ("", "[]", null)."""
    if isinstance(value, str):
        if not value.strip():
            return None
        value = _parse_json(value, "bad_tools", f"'{where}' is")
    if value is None or value == []:
        return None
    value = [value] if isinstance(value, Mapping) else value
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise BadRecord("bad_tools", f"'{where}' must be a list of function schemas (JSON objects)")
    for i, tool in enumerate(value):
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise BadRecord("bad_tools", f"'{where}'[{i}] has no function name")
    return json.dumps(value, ensure_ascii=False)


def _keys(turn: Mapping[str, Any], columns: Mapping[str, str], where: str) -> tuple[Any, Any]:
    """(role, content) of a turn; content None where the turn has no content key (a tool call may not)."""
    values = []
    for part, candidates in TURN_KEYS.items():
        names = (columns[part],) if part in columns else candidates
        key = next((k for k in names if turn.get(k) is not None), None)
        if key is None and (part == "role" or not (turn.get("tool_calls") or turn.get("function_call"))):
            raise BadRecord("missing_field", f"{where}: '{'/'.join(names)}' is missing")
        values.append(turn.get(key) if key else None)
    return values[0], values[1]


def parse_turn(turn: Any, where: str, columns: Mapping[str, str], roles: Mapping[str, str]) -> dict[str, Any]:
    """One turn → an internal message (see the module docstring)."""
    if not isinstance(turn, Mapping):
        raise BadRecord("bad_type", f"{where} must be an object with a role and a content")
    role, content = _keys(turn, columns, where)
    if not isinstance(role, str):
        raise BadRecord("bad_type", f"{where}: the role must be text, got {kind(role)}")
    ours = roles.get(role) or ROLES.get(role)
    if ours is None:
        known = sorted({*ROLES, *roles})
        raise BadRecord("unknown_role", f"{where}: role '{role}' is not one of {', '.join(known)}"
                                        f"{did_you_mean(str(role), known)}")
    if ours == CALL:
        return message("assistant", "", calls_of(content, where))
    calls = None
    if ours == "assistant" and (turn.get("tool_calls") or turn.get("function_call")):
        calls = calls_of(turn.get("tool_calls") or turn.get("function_call"), f"{where}.tool_calls")
    if ours == "tool" and isinstance(content, Mapping):  # a result given as an object: its JSON, as ChatGLM3's demo
        content = json.dumps(content, ensure_ascii=False)
    return message(ours, "" if content is None else text_of(content, f"{where}.content"), calls)


def parse_turns(value: Any, field: str, columns: Mapping[str, str], roles: Mapping[str, str]
                ) -> list[dict[str, Any]]:
    """A list of turns in any key style → internal messages."""
    if value is None:
        raise BadRecord("missing_field", f"'{field}' is missing")
    if not isinstance(value, list):
        raise BadRecord("bad_type", f"'{field}' must be a list of turns, got {kind(value)}")
    return [parse_turn(turn, f"{field}[{i}]", columns, roles) for i, turn in enumerate(value)]
