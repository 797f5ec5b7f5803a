"""`ChatFormat`: everything about one chat format in one object, and what every format shares around it.

A format module (finetune.models.chat.chatglm3, ...) defines one `ChatFormat`: how its original chat code lays out
a conversation (`render`, which also marks the trained spans and, for a conversation that ends with a user turn or
tool results, appends the generation prompt), its stop tokens, the same format as a Hugging Face chat template and
as an Ollama TEMPLATE, and its tool-call format (`ToolFormat`) or why it has none. Here, once for all formats:
validating a conversation (roles, order, tools), and `encode_conversation` / `encode_prompt` / `tokenize` /
`stop_token_ids`, which render and hand the parts to finetune.models.chat.encode.

Tools: a conversation may carry `tools` (a list of function schemas, bare or OpenAI's {"type": "function",
"function": ...}), assistant messages `tool_calls` ([{"name", "arguments"}] or OpenAI's {"function": {...}} with
arguments as an object or its JSON text) and `tool` messages (results); a format renders them where it has a tool
format, and a conversation with tools is refused (ValueError naming why) where it has none. A call and the token
after it are trained like an answer; results never are.

Segments: the encodings reproduce each original's segment boundaries, so contents that start or end with
whitespace or newlines get the original ids. The HF and Ollama templates are text, tokenized jointly by their
consumers, and cannot express a boundary without a token: for Qwen-1 joint tokenization differs from make_context
when a content's leading whitespace holds a line break ("\\n" + "\\nHi" merges into "\\n\\n"); Llama-2's Ollama
TEMPLATE cannot strip contents as Meta does (Go templates have no trim), so there a content with leading or trailing
whitespace differs. Special-token strings inside contents become tokens there, while the official code (and so the
encodings) keeps them as text for chatglm3, qwen1 and llama2. Tools render only through the encodings and the
Qwen2.5 HF template (ChatGLM3's call is Python repr text, which jinja and Go cannot reproduce exactly; Qwen-1's
ReAct text is rebuilt from the tool schemas; the other HF templates refuse tools).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from finetune.models.chat.encode import Encoded, Tokens, encode, token_id
from finetune.models.chat.parts import Message, Part, Tools, Turns, function_schema, uses_tools

Calls = list[tuple[str, dict]]  # (name, arguments) of each tool call


@dataclass(frozen=True)
class ToolFormat:
    """How a format's answers call tools, read back from generated text."""

    parse: Callable[[str], tuple[Optional[str], Calls]]  # generated text -> (content, calls); text that is not a
    #                                                       call in this format stays the content, with no calls
    stops: tuple[str, ...] = ()  # stop strings generation needs while tools are offered
    one_call_per_turn: Optional[str] = None  # the format's name in an error, where its official format makes one
    #                                          call per assistant turn


@dataclass(frozen=True)
class ChatFormat:
    name: str  # = the registry family's name; what base.json and the run files record
    render: Callable[[Optional[str], Turns, Tools], list[Part]]  # (system, validated turns, tools) -> parts
    stop_tokens: tuple[str, ...]  # what an inference server stops on (Modelfile `PARAMETER stop` lines, this order)
    hf_template: str  # jinja for `tokenizer.chat_template`, {% generation %} around the trained spans
    ollama_template: str  # an Ollama Modelfile TEMPLATE (Go text/template over .System and .Messages)
    plain_contents: bool  # special-token strings in texts stay plain text, as the official chat code encodes them
    default_system: Optional[str] = None  # the official code's system prompt for a conversation without one
    reserved: tuple[str, ...] = ()  # strings the original refuses inside contents
    tools: Optional[ToolFormat] = None
    no_tools: Optional[str] = None  # why this format cannot render tools (exactly when `tools` is None)

    def __post_init__(self) -> None:
        if (self.tools is None) == (self.no_tools is None):
            raise TypeError(f"chat format {self.name}: give either a tool format or the reason it has none")

    def tokenize(self, tokenizer: Any, conversations: list[list[Message]], tools: Optional[list[Tools]] = None
                 ) -> Tokens:
        """Every text of these training conversations tokenized in ONE batched call (the tokenizer's own batch
        path, with its threads), for `encode_conversation(..., tokens=)` on the same, unchanged conversation
        objects (and the same tools: `tools[i]` belongs to `conversations[i]`). Conversations the format refuses
        are skipped here; encode_conversation raises for them."""
        tokens = Tokens(self, tokenizer)
        for messages, conversation_tools in zip(conversations, tools or [None] * len(conversations)):
            try:
                parts = self.render(*_split(self, messages, conversation_tools, last=("assistant",)))
            except ValueError:
                continue
            tokens.rendered[id(messages)] = (messages, parts)
        tokens.add([part for _, parts in tokens.rendered.values() for part in parts])
        return tokens

    def encode_conversation(self, tokenizer: Any, messages: list[Message], tokens: Optional[Tokens] = None,
                            tools: Tools = None) -> Encoded:
        """The training encoding of a conversation that ends with an assistant answer (or tool call): the
        official ids, and labels on every answer and call and on the token that ends it (IGNORE elsewhere, tool
        results included). Raises ValueError for a malformed one. `tokens` (from `tokenize`) holds it already
        rendered and tokenized, batched with other conversations."""
        if tokens is None:
            tokens = Tokens(self, tokenizer)
        elif tokens.fmt is not self or tokens.tokenizer is not tokenizer:
            raise TypeError(f"tokens= holds ids from the {tokens.fmt.name} format and its tokenizer; pass the same")
        held, parts = tokens.rendered.get(id(messages), (None, None))
        if held is not messages:
            parts = self.render(*_split(self, messages, tools, last=("assistant",)))
        return encode(tokens, parts)

    def encode_prompt(self, tokenizer: Any, messages: list[Message], tools: Tools = None) -> list[int]:
        """The inference prompt (history + last user turn or tool results + generation prompt) as the official
        chat code builds it."""
        parts = self.render(*_split(self, messages, tools, last=("user", "tool")))
        return encode(Tokens(self, tokenizer), parts).input_ids

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids an inference server must stop on (chatglm3 [2, 64795, 64797], qwen2_5 [151645, 151643], ...)."""
        return [token_id(self, tokenizer, s) for s in self.stop_tokens]

    @property
    def tool_stops(self) -> tuple[str, ...]:
        """Stop strings generation adds while tools are offered."""
        return self.tools.stops if self.tools else ()


FOLLOWS = {"user": ("assistant",), "assistant": ("user",), "call": ("tool",), "tool": ("tool", "assistant")}
"""Which roles may follow a turn: a user turn, an answer, an assistant turn with tool calls, a tool result."""


def _calls(n: int, m: Message) -> Calls:
    """(name, arguments) of an assistant message's tool calls; arguments given as JSON text are parsed."""
    calls = []
    for i, call in enumerate(m.get("tool_calls") or ()):
        fn = call.get("function", call) if isinstance(call, dict) else {}
        name, arguments = fn.get("name"), fn.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except RecursionError:
                raise ValueError(f"message {n}: tool_calls[{i}]: the arguments nest too deep to read") from None
            except ValueError:  # not JSON: refused below
                pass
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            raise ValueError(f"message {n}: tool_calls[{i}] needs a name and arguments as a JSON object")
        calls.append((name, arguments))
    return calls


def _turn(fmt: ChatFormat, n: int, m: Message) -> Message:
    """One checked message; an assistant message with tool calls becomes {role, content, calls}."""
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
        raise ValueError(f"message {n}: role must be system, user, assistant or tool")
    calls = _calls(n, m) if m["role"] == "assistant" else []
    if m.get("tool_calls") and m["role"] != "assistant":
        raise ValueError(f"message {n} ({m['role']}): only assistant messages make tool calls")
    content = m.get("content")
    if calls and content is None:
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"message {n} ({m['role']}): content must be text")
    if not content.strip() and not calls and m["role"] != "tool":
        raise ValueError(f"message {n} ({m['role']}): empty content")
    for tag in fmt.reserved:
        if tag in content:
            raise ValueError(f"message {n} ({m['role']}): contains {tag!r}, reserved by the {fmt.name} format")
    return {"role": "assistant", "content": content, "calls": calls} if calls else m


def _check_tools(fmt: ChatFormat, turns: Turns, tools: Tools) -> None:
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools must be a list of function schemas (JSON objects)")
    if fmt.no_tools and uses_tools(turns, tools):
        raise ValueError(fmt.no_tools)
    for i, tool in enumerate(tools or ()):
        if not isinstance(function_schema(tool).get("name"), str):
            raise ValueError(f"tools[{i}] has no name")
    one_call = fmt.tools and fmt.tools.one_call_per_turn
    if one_call and any(len(m.get("calls", ())) > 1 for m in turns):
        raise ValueError(f"{one_call} makes one tool call per assistant turn (its official format); split parallel "
                         "calls into consecutive call/result turns")


def _split(fmt: ChatFormat, messages: list[Message], tools: Tools, last: tuple[str, ...]
           ) -> tuple[Optional[str], Turns, Tools]:
    """Validate a conversation: optional system first, then user first, each turn followed by a role FOLLOWS
    allows, ending with a role in `last`; tools only where the format has a tool format."""
    if not messages:
        raise ValueError("empty conversation")
    turns = [_turn(fmt, n, m) for n, m in enumerate(messages, 1)]
    system = turns[0]["content"] if turns[0]["role"] == "system" else fmt.default_system
    turns = turns[1:] if turns[0]["role"] == "system" else turns
    first = len(messages) - len(turns) + 1
    expected: tuple[str, ...] = ("user",)
    for n, m in enumerate(turns):
        if m["role"] not in expected:
            raise ValueError(f"message {first + n}: expected role {' or '.join(map(repr, expected))}, got "
                             f"{m['role']!r} (after an optional system message, user and assistant alternate; "
                             "tool results follow an assistant's tool calls)")
        expected = FOLLOWS["call" if m.get("calls") else m["role"]]
    if not turns or turns[-1]["role"] not in last:
        end = "an assistant answer" if last == ("assistant",) else "a user message or tool results"
        raise ValueError(f"the conversation must end with {end}")
    _check_tools(fmt, turns, tools)
    return system, turns, tools
