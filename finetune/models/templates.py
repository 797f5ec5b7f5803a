"""The five chat formats, token for token: training encodings with labels, inference prompts, and the same
format as a Hugging Face chat template and as an Ollama TEMPLATE (reference/chat_formats.md, DECISIONS.md).

Each format is one `ChatFormat` row. Its `render` (finetune.models.chat_parts) turns a validated conversation into
`Part`s as the ORIGINAL chat code lays it out; one generic encoder turns parts into ids, and labels from the trained
character spans (DECISIONS.md "Training labels"): a token is trained when it starts inside a trained span. Labels
are aligned with input_ids (the model shifts). The HF chat template and Ollama TEMPLATE of each format are in
finetune.models.text_templates; stop tokens are the registry's (`Family.stop_tokens`).
Speed: a conversation's texts are tokenized in one batched call, or a whole batch of conversations' texts at once
(`tokenize`, then `encode_conversation(..., tokens=)`), and labels are set per part and trained span by slicing,
never by a Python loop over tokens.

Tools: a conversation may carry `tools` (a list of function schemas, bare or OpenAI's {"type": "function",
"function": ...}), assistant messages `tool_calls` ([{"name", "arguments"}] or OpenAI's {"function": {...}} with
arguments as an object or its JSON text) and `tool` messages (results); chat_parts renders them where the family has
a tool format, and a conversation with tools is refused (ValueError naming why) where it has none.

Segments: encode_* reproduce each original's segment boundaries, so contents that start or end with whitespace or
newlines get the original ids. The HF and Ollama templates are text, tokenized jointly, and cannot express a
boundary without a token: for Qwen-1 joint tokenization differs from make_context when a content's leading
whitespace holds a line break ("\\n" + "\\nHi" merges into "\\n\\n"); Llama-2's Ollama TEMPLATE cannot strip
contents as Meta does (Go templates have no trim), so there a content with leading or trailing whitespace differs.
Special-token strings inside contents become tokens there, while the official code (and so encode_*) keeps them as
text for chatglm3, qwen1 and llama2. Tools render only through encode_* and the Qwen2.5 HF template (ChatGLM3's
call is Python repr text, which jinja and Go cannot reproduce exactly; Qwen-1's ReAct text is rebuilt from the
tool schemas by qwen1_react; the other HF templates refuse tools).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from finetune.models import chat_parts, qwen1_react, registry, text_templates
from finetune.models.chat_parts import NO_TOOLS, QWEN1_SYSTEM, QWEN2_5_SYSTEM, Message, Part, Tools, Turns

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class ChatFormat:
    name: str  # = the registry family's name
    render: Callable[[Optional[str], Turns, Tools], list[Part]]  # tools only where no_tools is None
    default_system: Optional[str]
    plain_contents: bool  # special-token strings in texts stay plain text, as the official chat code encodes them
    reserved: tuple[str, ...] = ()  # strings the original refuses inside contents
    no_tools: Optional[str] = None  # why this format cannot render tools (None: it can)


FORMATS: dict[str, ChatFormat] = {f.name: f for f in (
    ChatFormat("chatglm3", chat_parts.chatglm3, None, plain_contents=True),
    ChatFormat("baichuan2", chat_parts.baichuan2, None, plain_contents=False, no_tools=NO_TOOLS["baichuan2"]),
    ChatFormat("qwen1", qwen1_react.render, QWEN1_SYSTEM, plain_contents=True),
    ChatFormat("qwen2_5", chat_parts.qwen2_5, QWEN2_5_SYSTEM, plain_contents=False),
    ChatFormat("llama2", chat_parts.llama2, None, plain_contents=True, no_tools=NO_TOOLS["llama2"],
               reserved=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
)}


def chat_format(template: str) -> ChatFormat:
    if template not in FORMATS:
        raise ValueError(f"unknown chat template '{template}' (known: {', '.join(FORMATS)})")
    return FORMATS[template]


def default_system(template: str) -> Optional[str]:
    """The system prompt the official chat code uses when the conversation has none (None: no system turn)."""
    return chat_format(template).default_system


ONE_CALL_PER_TURN = {"chatglm3": "ChatGLM3", "qwen1": "Qwen-1's ReAct"}
FOLLOWS = {"user": ("assistant",), "assistant": ("user",), "call": ("tool",), "tool": ("tool", "assistant")}
"""Which roles may follow a turn: a user turn, an answer, an assistant turn with tool calls, a tool result."""


def _calls(n: int, m: Message) -> list[tuple[str, dict]]:
    """(name, arguments) of an assistant message's tool calls; arguments given as JSON text are parsed."""
    calls = []
    for i, call in enumerate(m.get("tool_calls") or ()):
        fn = call.get("function", call) if isinstance(call, dict) else {}
        name, arguments = fn.get("name"), fn.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
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
    if fmt.no_tools and chat_parts.uses_tools(turns, tools):
        raise ValueError(fmt.no_tools)
    for i, tool in enumerate(tools or ()):
        if not isinstance(chat_parts.function_schema(tool).get("name"), str):
            raise ValueError(f"tools[{i}] has no name")
    if fmt.name in ONE_CALL_PER_TURN and any(len(m.get("calls", ())) > 1 for m in turns):
        raise ValueError(f"{ONE_CALL_PER_TURN[fmt.name]} makes one tool call per assistant turn (its official "
                         "format); split parallel calls into consecutive call/result turns")


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


def _token_id(fmt: ChatFormat, tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no token {token!r}: it is not a {fmt.name} tokenizer")
    return tid


@dataclass
class Tokens:
    """What one tokenizer made of a format's texts and special tokens: ids per text, with the tokenizer's Encoding
    (labels of texts trained only in part need token offsets), and the id of each special token. Texts are
    tokenized many at a time (`add`): one call of the tokenizer's batch path per conversation or per batch.
    `rendered` keeps the parts `tokenize` rendered, by conversation object (held, so its id stays its own)."""

    template: str
    tokenizer: Any
    texts: dict[str, tuple[list[int], Any]] = field(default_factory=dict)
    specials: dict[str, int] = field(default_factory=dict)
    rendered: dict[int, tuple[list[Message], list[Part]]] = field(default_factory=dict)

    def add(self, fmt: ChatFormat, parts: list[Part]) -> None:
        """Tokenize, in one call, the texts of `parts` that are not known yet."""
        texts = list(dict.fromkeys(p.text for p in parts if p.special is None and p.text not in self.texts))
        if texts:
            batch = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=fmt.plain_contents,
                                   return_attention_mask=False, return_token_type_ids=False)
            self.texts.update(zip(texts, zip(batch["input_ids"], batch.encodings or [None] * len(texts))))

    def special(self, fmt: ChatFormat, token: str) -> int:
        if token not in self.specials:
            self.specials[token] = _token_id(fmt, self.tokenizer, token)
        return self.specials[token]


def _starting_before(encoding: Any, position: int, text: str) -> int:
    """How many tokens start before character `position` of `text`. Token offsets never decrease along a text, so
    this is a binary search over a few offsets instead of a pass over every token; every token starts before the
    text's end."""
    if position >= len(text):
        return len(encoding)
    return bisect.bisect_left(range(len(encoding)), position, key=lambda i: encoding.token_to_chars(i)[0])


def _encode(fmt: ChatFormat, tokens: Tokens, parts: list[Part]) -> Encoded:
    tokens.add(fmt, parts)
    ids: list[int] = []
    labels: list[int] = []
    for part in parts:
        if part.special is not None:
            ids.append(tokens.special(fmt, part.special))
            labels.append(tokens.special(fmt, part.label) if part.label else ids[-1] if part.trained else IGNORE)
            continue
        text_ids, encoding = tokens.texts[part.text]
        ids += text_ids
        if part.train == ((0, len(part.text)),):  # every token of a text starts inside it
            labels += text_ids
            continue
        if part.train and encoding is None:
            raise TypeError(f"{type(tokens.tokenizer).__name__} is a slow tokenizer: labels need token offsets")
        part_labels = [IGNORE] * len(text_ids)
        for a, b in part.train:
            start, end = _starting_before(encoding, a, part.text), _starting_before(encoding, b, part.text)
            part_labels[start:end] = text_ids[start:end]
        labels += part_labels
    return Encoded(ids, labels)


def _tokens(fmt: ChatFormat, tokenizer, tokens: Optional[Tokens]) -> Tokens:
    if tokens is None:
        return Tokens(fmt.name, tokenizer)
    if tokens.template != fmt.name or tokens.tokenizer is not tokenizer:
        raise TypeError(f"tokens= holds ids from the {tokens.template} template and its tokenizer; pass the same")
    return tokens


def tokenize(template: str, tokenizer, conversations: list[list[Message]], tools: Optional[list[Tools]] = None
             ) -> Tokens:
    """Every text of these training conversations tokenized in ONE batched call (the tokenizer's own batch path,
    with its threads), for `encode_conversation(..., tokens=)` on the same, unchanged conversation objects (and
    the same tools: `tools[i]` belongs to `conversations[i]`). Conversations the format refuses are skipped here;
    encode_conversation raises for them."""
    fmt = chat_format(template)
    tokens = Tokens(fmt.name, tokenizer)
    for messages, conversation_tools in zip(conversations, tools or [None] * len(conversations)):
        try:
            parts = fmt.render(*_split(fmt, messages, conversation_tools, last=("assistant",)))
        except ValueError:
            continue
        tokens.rendered[id(messages)] = (messages, parts)
    tokens.add(fmt, [part for _, parts in tokens.rendered.values() for part in parts])
    return tokens


def encode_conversation(template: str, tokenizer, messages: list[Message], tokens: Optional[Tokens] = None,
                        tools: Tools = None) -> Encoded:
    """The training encoding of a conversation that ends with an assistant answer (or tool call): the official
    ids, and labels on every answer and call and on the token that ends it (-100 elsewhere, tool results
    included). Raises ValueError for a malformed one. `tokens` (from `tokenize`) holds it already rendered and
    tokenized, batched with other conversations."""
    fmt = chat_format(template)
    tokens = _tokens(fmt, tokenizer, tokens)
    held, parts = tokens.rendered.get(id(messages), (None, None))
    if held is not messages:
        parts = fmt.render(*_split(fmt, messages, tools, last=("assistant",)))
    return _encode(fmt, tokens, parts)


def encode_prompt(template: str, tokenizer, messages: list[Message], tools: Tools = None) -> list[int]:
    """The inference prompt (history + last user turn or tool results + generation prompt) as the official chat
    code builds it."""
    fmt = chat_format(template)
    parts = fmt.render(*_split(fmt, messages, tools, last=("user", "tool")))
    return _encode(fmt, Tokens(fmt.name, tokenizer), parts).input_ids


def hf_chat_template(template: str) -> str:
    """Jinja for `tokenizer.chat_template`: with add_generation_prompt it renders the Ollama template's text
    (Llama-2: plus the first <s>, which llama.cpp adds itself); a conversation ending with an answer renders its
    training text, {% generation %} around the trained spans."""
    return text_templates.HF[chat_format(template).name]


def ollama_template(template: str) -> str:
    """The TEMPLATE of an Ollama Modelfile (Go text/template over .System and .Messages)."""
    return text_templates.OLLAMA[chat_format(template).name]


def ollama_stop_strings(template: str) -> list[str]:
    """The family's stop tokens (registry), as Modelfile `PARAMETER stop` strings."""
    return list(registry.family(chat_format(template).name).stop_tokens)


def stop_token_ids(template: str, tokenizer) -> list[int]:
    """Ids an inference server must stop on (chatglm3 [2, 64795, 64797], qwen2_5 [151645, 151643], ...)."""
    fmt = chat_format(template)
    return [_token_id(fmt, tokenizer, s) for s in registry.family(fmt.name).stop_tokens]
