"""What a chat format's `render` speaks: messages in, `Part`s out.

A conversation arrives as messages ({"role": "system" | "user" | "assistant" | "tool", "content": str,
"tool_calls"?: [...]}); finetune.models.chat.format validates it into `Turns` (user first, the system message taken
out, an assistant message with tool calls carrying them as `calls`: [(name, arguments)]). A format's render lays
the turns out as its ORIGINAL chat code does, as `Part`s: a special token, or a text that code encodes in ONE
tokenizer call (ChatGLM3, Baichuan2 and Qwen-1 encode role, newline and content separately; Llama-2 one string per
exchange; Qwen2.5 the whole rendered text). finetune.models.chat.encode turns parts into ids and labels.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

Message = dict  # {"role": ..., "content": str, "tool_calls"?: [...]}; validated: "calls" instead of "tool_calls"
Tools = Optional[list]  # function schemas, as the data gives them
Turns = list[Message]  # after validation: user first; an assistant with tool calls carries them as `calls`


class Part(NamedTuple):
    """A special token (by its string), or a text encoded in ONE tokenizer call. (A tuple: a batch of 100k
    conversations makes millions of them.)"""

    text: str = ""
    special: Optional[str] = None
    train: tuple[tuple[int, int], ...] = ()  # character spans of `text` whose tokens are trained
    trained: bool = False  # a special token whose own id is its label
    label: Optional[str] = None  # a special token labelled with ANOTHER token (Baichuan2: eos under a user token)


def token(special: str, trained: bool = False, label: Optional[str] = None) -> Part:
    return Part(special=special, trained=trained, label=label)


def text(content: str, trained: bool = False) -> Part:
    return Part(text=content, train=((0, len(content)),) if trained else ())


def uses_tools(turns: Turns, tools: Tools) -> bool:
    """Whether a validated conversation offers tools, makes a call or carries a result."""
    return bool(tools) or any(m["role"] == "tool" or m.get("calls") for m in turns)


def function_schema(tool: dict) -> dict:
    """A tool schema without OpenAI's {"type": "function", "function": ...} wrapper."""
    inner = tool.get("function")
    return inner if tool.get("type") == "function" and isinstance(inner, dict) else tool
