"""The five chat formats, token for token: training encodings with labels, inference prompts, and the same
format as a Hugging Face chat template and as an Ollama TEMPLATE (reference/chat_formats.md, DECISIONS.md).

Each format is one `ChatFormat` row. Its `render` turns a validated conversation into `Part`s: a special token,
or a text that the ORIGINAL code encodes in one call (ChatGLM3, Baichuan2 and Qwen-1 encode role, newline and
content separately; Llama-2 one string per exchange; Qwen2.5 the whole rendered text). One generic encoder turns
parts into ids, and labels from the trained character spans (DECISIONS.md "Training labels"): a token is trained
when it starts inside a trained span. Labels are aligned with input_ids (the model shifts).
Speed: a conversation's texts are tokenized in one batched call, or a whole batch of conversations' texts at once
(`tokenize`, then `encode_conversation(..., tokens=)`), and labels are set per part and trained span by slicing,
never by a Python loop over tokens.
The HF and Ollama templates are text, tokenized jointly: for Qwen-1 that equals make_context's ids except when a
content starts with a newline ("\n\n" merges); special-token strings inside contents become tokens there, while
the official code (and so encode_*) keeps them as text for chatglm3, qwen1 and llama2.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

IGNORE = -100
Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


class Part(NamedTuple):
    """A special token (by its string), or a text encoded in ONE tokenizer call. (A tuple: a batch of 100k
    conversations makes millions of them.)"""

    text: str = ""
    special: Optional[str] = None
    train: tuple[tuple[int, int], ...] = ()  # character spans of `text` whose tokens are trained
    trained: bool = False  # a special token whose own id is its label
    label: Optional[str] = None  # a special token labelled with ANOTHER token (Baichuan2: eos under a user token)


def _tok(special: str, trained: bool = False, label: Optional[str] = None) -> Part:
    return Part(special=special, trained=trained, label=label)


def _text(text: str, trained: bool = False) -> Part:
    return Part(text=text, train=((0, len(text)),) if trained else ())


Turns = list[Message]  # alternating user/assistant, starting with user


def _chatglm3(system: Optional[str], turns: Turns) -> list[Part]:
    # build_chat_input / finetune_demo process_batch: <|role|> + sp("\n") + sp(content); the token after an
    # answer (<|user|> or the final eos) is trained, <|assistant|> is not.
    parts = [_tok("[gMASK]"), _tok("sop")]
    if system is not None:
        parts += [_tok("<|system|>"), _text("\n"), _text(system)]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            parts += [_tok("<|user|>", trained=i > 0), _text("\n"), _text(m["content"])]
        else:
            parts += [_tok("<|assistant|>"), _text("\n", trained=True), _text(m["content"], trained=True)]
    return parts + [_tok("<|assistant|>") if turns[-1]["role"] == "user" else _tok("</s>", trained=True)]


def _baichuan2(system: Optional[str], turns: Turns) -> list[Part]:
    # generation_utils.build_chat_input: raw system, 195 + user, 196 + answer; fine-tune.py: eos is the label at
    # the position after each answer (the next 195), eos appended at the end.
    parts = [_text(system)] if system is not None else []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            parts += [_tok("<reserved_106>", label="</s>" if i > 0 else None), _text(m["content"])]
        else:
            parts += [_tok("<reserved_107>"), _text(m["content"], trained=True)]
    return parts + [_tok("<reserved_107>") if turns[-1]["role"] == "user" else _tok("</s>", trained=True)]


def _qwen1(system: Optional[str], turns: Turns) -> list[Part]:
    # make_context: role, "\n" and content encoded separately; content + <|im_end|> trained, not the "\n" after.
    parts = []
    for m in [{"role": "system", "content": system}, *turns]:
        answer = m["role"] == "assistant"
        parts += [_tok("<|im_start|>"), _text(m["role"]), _text("\n"), _text(m["content"], trained=answer),
                  _tok("<|im_end|>", trained=answer), _text("\n")]
    if turns[-1]["role"] == "user":
        parts += [_tok("<|im_start|>"), _text("assistant"), _text("\n")]
    return parts


def _qwen2_5(system: Optional[str], turns: Turns) -> list[Part]:
    # The official chat_template's text, tokenized as ONE string.
    text, spans = "", []
    for m in [{"role": "system", "content": system}, *turns]:
        text += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"]) + len("<|im_end|>")))
        text += f"{m['content']}<|im_end|>\n"
    if turns[-1]["role"] == "user":
        text += "<|im_start|>assistant\n"
    return [Part(text=text, train=tuple(spans))]


def _llama2(system: Optional[str], turns: Turns) -> list[Part]:
    # Meta's chat_completion: [BOS] + sp(f"[INST] {user} [/INST] {answer} ") + [EOS] per exchange; the system
    # merged into the first user message. Trained: the answer (from its leading space), the space, </s>.
    users = [m["content"] for m in turns[0::2]]
    if system is not None:
        users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
    parts = []
    for i, user in enumerate(users):
        prompt = f"[INST] {user.strip()} [/INST]"
        if 2 * i + 1 < len(turns):
            answer = f" {turns[2 * i + 1]['content'].strip()} "
            parts += [_tok("<s>"), Part(text=prompt + answer, train=((len(prompt), len(prompt + answer)),)),
                      _tok("</s>", trained=True)]
        else:
            parts += [_tok("<s>"), _text(prompt)]
    return parts


def _chatml_jinja(default_system: str) -> str:
    return (
        "{%- if messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] -%}"
        "{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = '" + default_system + "' -%}"
        "{%- set msgs = messages -%}{%- endif -%}"
        "{{- '<|im_start|>system\\n' + sys + '<|im_end|>\\n' -}}"
        "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
        "{{- '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- else -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- generation -%}{{- m['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def _chatml_ollama(default_system: str) -> str:
    return (
        "<|im_start|>system\n{{ if .System }}{{ .System }}{{ else }}" + default_system + "{{ end }}<|im_end|>\n"
        '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
        "<|im_start|>assistant\n"
    )


# A system message first becomes `sys`; the other messages are `msgs`.
_SPLIT_SYSTEM = ("{%- if messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] -%}"
                 "{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = none -%}{%- set msgs = messages -%}"
                 "{%- endif -%}")


@dataclass(frozen=True)
class ChatFormat:
    name: str
    render: Callable[[Optional[str], Turns], list[Part]]
    default_system: Optional[str]
    plain_contents: bool  # special-token strings in texts stay plain text, as the official chat code encodes them
    stops: tuple[str, ...]  # "Stop tokens for an inference server" (chat_formats.md), ids in the same order
    hf: str  # jinja chat template; {% generation %} marks the trained spans
    ollama: str  # Go text/template for a Modelfile (reads .System and .Messages, ends with the generation prompt)
    reserved: tuple[str, ...] = ()  # strings the original refuses inside contents


QWEN1_SYSTEM = "You are a helpful assistant."
QWEN2_5_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

FORMATS: dict[str, ChatFormat] = {f.name: f for f in (
    ChatFormat(
        "chatglm3", _chatglm3, None, plain_contents=True, stops=("</s>", "<|user|>", "<|observation|>"),
        hf=_SPLIT_SYSTEM + "{{- '[gMASK]sop' -}}{%- if sys is not none -%}{{- '<|system|>\\n ' + sys -}}{%- endif -%}"
           "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
           "{%- if loop.first -%}{{- '<|user|>' -}}{%- endif -%}{{- '\\n ' + m['content'] -}}"
           "{%- else -%}{{- '<|assistant|>' -}}{%- generation -%}"
           "{{- '\\n ' + m['content'] + ('</s>' if loop.last else '<|user|>') -}}{%- endgeneration -%}"
           "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}",
        ollama="[gMASK]sop{{ if .System }}<|system|>\n {{ .System }}{{ end }}"
               '{{ range .Messages }}{{ if eq .Role "user" }}<|user|>\n {{ .Content }}'
               '{{ else if eq .Role "assistant" }}<|assistant|>\n {{ .Content }}{{ end }}{{ end }}<|assistant|>'),
    ChatFormat(
        "baichuan2", _baichuan2, None, plain_contents=False, stops=("</s>",),
        hf=_SPLIT_SYSTEM + "{%- if sys is not none -%}{{- sys -}}{%- endif -%}"
           "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}{{- '<reserved_106>' + m['content'] -}}"
           "{%- else -%}{{- '<reserved_107>' -}}{%- generation -%}"
           "{{- m['content'] + ('</s>' if loop.last else '') -}}{%- endgeneration -%}{%- endif -%}{%- endfor -%}"
           "{%- if add_generation_prompt -%}{{- '<reserved_107>' -}}{%- endif -%}",
        ollama='{{ if .System }}{{ .System }}{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}'
               '<reserved_106>{{ .Content }}{{ else if eq .Role "assistant" }}<reserved_107>{{ .Content }}'
               "{{ end }}{{ end }}<reserved_107>"),
    ChatFormat(
        "qwen1", _qwen1, QWEN1_SYSTEM, plain_contents=True,
        stops=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        hf=_chatml_jinja(QWEN1_SYSTEM), ollama=_chatml_ollama(QWEN1_SYSTEM)),
    ChatFormat(
        "qwen2_5", _qwen2_5, QWEN2_5_SYSTEM, plain_contents=False, stops=("<|im_end|>", "<|endoftext|>"),
        hf=_chatml_jinja(QWEN2_5_SYSTEM), ollama=_chatml_ollama(QWEN2_5_SYSTEM)),
    ChatFormat(
        "llama2", _llama2, None, plain_contents=True, stops=("</s>",),
        reserved=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
        hf="{%- if messages[0]['role'] == 'system' -%}"
           "{%- set msgs = [{'role': 'user', 'content': '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n'"
           " + messages[1]['content']}] + messages[2:] -%}{%- else -%}{%- set msgs = messages -%}{%- endif -%}"
           "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
           "{{- '<s>[INST] ' + m['content'] | trim + ' [/INST]' -}}"
           "{%- else -%}{%- generation -%}{{- ' ' + m['content'] | trim + ' </s>' -}}{%- endgeneration -%}"
           "{%- endif -%}{%- endfor -%}",
        ollama='{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}{{ if $first }}[INST] '
               "{{ if $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
               "{{ $first = false }}{{ else }}<s>[INST] {{ .Content }} [/INST]{{ end }}"
               '{{ else if eq .Role "assistant" }} {{ .Content }} </s>{{ end }}{{ end }}'),
)}


def chat_format(template: str) -> ChatFormat:
    if template not in FORMATS:
        raise ValueError(f"unknown chat template '{template}' (known: {', '.join(FORMATS)})")
    return FORMATS[template]


def default_system(template: str) -> Optional[str]:
    """The system prompt the official chat code uses when the conversation has none (None: no system turn)."""
    return chat_format(template).default_system


def _split(fmt: ChatFormat, messages: list[Message], last: str) -> tuple[Optional[str], Turns]:
    """Validate a conversation: optional system first, then user/assistant alternating, ending with `last`."""
    if not messages:
        raise ValueError("empty conversation")
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {n}: role must be system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {n} ({m['role']}): content must be text")
        if not m["content"].strip():
            raise ValueError(f"message {n} ({m['role']}): empty content")
        for tag in fmt.reserved:
            if tag in m["content"]:
                raise ValueError(f"message {n} ({m['role']}): contains {tag!r}, reserved by the {fmt.name} format")
    system = messages[0]["content"] if messages[0]["role"] == "system" else fmt.default_system
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    first = len(messages) - len(turns) + 1
    for n, m in enumerate(turns):
        expected = ("user", "assistant")[n % 2]
        if m["role"] != expected:
            raise ValueError(f"message {first + n}: expected role {expected!r}, got {m['role']!r} "
                             f"(after an optional system message, user and assistant alternate)")
    if not turns or turns[-1]["role"] != last:
        end = "an assistant answer" if last == "assistant" else "a user message"
        raise ValueError(f"the conversation must end with {end}")
    return system, list(turns)


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


def tokenize(template: str, tokenizer, conversations: list[list[Message]]) -> Tokens:
    """Every text of these training conversations tokenized in ONE batched call (the tokenizer's own batch path,
    with its threads), for `encode_conversation(..., tokens=)` on the same, unchanged conversation objects.
    Conversations the format refuses are skipped here; encode_conversation raises for them."""
    fmt = chat_format(template)
    tokens = Tokens(fmt.name, tokenizer)
    for messages in conversations:
        try:
            tokens.rendered[id(messages)] = (messages, fmt.render(*_split(fmt, messages, last="assistant")))
        except ValueError:
            continue
    tokens.add(fmt, [part for _, parts in tokens.rendered.values() for part in parts])
    return tokens


def encode_conversation(template: str, tokenizer, messages: list[Message], tokens: Optional[Tokens] = None
                        ) -> Encoded:
    """The training encoding of a conversation that ends with an assistant answer: the official ids, and labels
    on every answer and on the token that ends it (-100 elsewhere). Raises ValueError for a malformed one.
    `tokens` (from `tokenize`) holds it already rendered and tokenized, batched with other conversations."""
    fmt = chat_format(template)
    tokens = _tokens(fmt, tokenizer, tokens)
    held, parts = tokens.rendered.get(id(messages), (None, None))
    if held is not messages:
        parts = fmt.render(*_split(fmt, messages, last="assistant"))
    return _encode(fmt, tokens, parts)


def encode_prompt(template: str, tokenizer, messages: list[Message]) -> list[int]:
    """The inference prompt (history + last user turn + generation prompt) as the official chat code builds it."""
    fmt = chat_format(template)
    return _encode(fmt, Tokens(fmt.name, tokenizer), fmt.render(*_split(fmt, messages, last="user"))).input_ids


def hf_chat_template(template: str) -> str:
    """Jinja for `tokenizer.chat_template`: with add_generation_prompt it renders the Ollama template's text
    (Llama-2: plus the first <s>, which llama.cpp adds itself); a conversation ending with an answer renders its
    training text, {% generation %} around the trained spans."""
    return chat_format(template).hf


def ollama_template(template: str) -> str:
    """The TEMPLATE of an Ollama Modelfile (Go text/template over .System and .Messages)."""
    return chat_format(template).ollama


def ollama_stop_strings(template: str) -> list[str]:
    return list(chat_format(template).stops)


def stop_token_ids(template: str, tokenizer) -> list[int]:
    """Ids an inference server must stop on (chatglm3 [2, 64795, 64797], qwen2_5 [151645, 151643], ...)."""
    fmt = chat_format(template)
    return [_token_id(fmt, tokenizer, s) for s in fmt.stops]
