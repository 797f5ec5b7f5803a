"""Qwen2.5's chat format: its official chat_template (tokenizer_config.json), ChatML with its tool format.

The whole conversation is rendered as the template's text and tokenized as ONE string, as the template's users do.
Tools: the schemas as JSON lines in a `# Tools` block of the system turn (a bare schema wrapped as {"type":
"function", "function": ...}, the form Qwen's docs pass), each call as `<tool_call>` JSON after the answer's text,
results as `<tool_response>` blocks in a user turn (consecutive results share one). Each answer or call is trained
with its <|im_end|>.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from finetune.models.chat.format import Calls, ChatFormat, ToolFormat
from finetune.models.chat.parts import Message, Part, Tools, Turns, function_schema
from finetune.models.chat.templating import chatml_ollama

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_TEXT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>")
"""The text the chat_template puts around the tool schemas in the system turn (before, after)."""


def _system(system: str, tools: Tools) -> str:
    if not tools:
        return f"<|im_start|>system\n{system}<|im_end|>\n"
    schemas = "".join("\n" + json.dumps({"type": "function", "function": function_schema(t)}, ensure_ascii=False)
                      for t in tools)
    return f"<|im_start|>system\n{system}{TOOLS_TEXT[0]}{schemas}{TOOLS_TEXT[1]}<|im_end|>\n"


def _answer(m: Message) -> str:
    calls = [f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}'
             "\n</tool_call>" for name, arguments in m.get("calls", ())]
    if not calls:
        return m["content"]
    return (f"{m['content']}\n" if m["content"] else "") + "\n".join(calls)


def render(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    text, spans = _system(system, tools), []  # type: ignore[arg-type]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            text += f"<|im_start|>user\n{m['content']}<|im_end|>\n"
        elif m["role"] == "assistant":
            answer = f"{_answer(m)}<|im_end|>"
            text += "<|im_start|>assistant\n"
            spans.append((len(text), len(text) + len(answer)))
            text += answer + "\n"
        else:
            text += "<|im_start|>user" if turns[i - 1]["role"] != "tool" else ""
            text += f"\n<tool_response>\n{m['content']}\n</tool_response>"
            text += "<|im_end|>\n" if i + 1 == len(turns) or turns[i + 1]["role"] != "tool" else ""
    if turns[-1]["role"] != "assistant":
        text += "<|im_start|>assistant\n"
    return [Part(text=text, train=tuple(spans))]


_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse(generated: str) -> tuple[Optional[str], Calls]:
    """Each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` after optional text; any block
    that is not such JSON (or nests deeper than the parser's stack) leaves the whole text content."""
    calls = []
    for block in _CALL.findall(generated):
        try:
            call = json.loads(block)
        except (ValueError, RecursionError):
            return generated, []
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments", {}), dict)):
            return generated, []
        calls.append((call["name"], call.get("arguments", {})))
    content = generated.split("<tool_call>", 1)[0].strip() if calls else generated
    return content or None, calls


def _hf_template() -> str:
    """The official chat_template (same text, tools included), rearranged so that {% generation %} marks what
    encode_conversation trains: each answer or call after "<|im_start|>assistant\\n", with its <|im_end|>."""
    before, after = (json.dumps(t)[1:-1] for t in TOOLS_TEXT)
    return (
        "{%- if messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] -%}"
        "{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = '" + DEFAULT_SYSTEM + "' -%}"
        "{%- set msgs = messages -%}{%- endif -%}"
        "{{- '<|im_start|>system\\n' + sys -}}"
        '{%- if tools -%}{{- "' + before + '" -}}{%- for tool in tools -%}'
        "{{- '\\n' + (tool if tool.function is defined else {'type': 'function', 'function': tool}) | tojson -}}"
        '{%- endfor -%}{{- "' + after + '" -}}{%- endif -%}'
        "{{- '<|im_end|>\\n' -}}"
        "{%- for m in msgs -%}{%- if m.role == 'user' -%}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' -}}"
        "{%- elif m.role == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}{%- generation -%}"
        "{%- if m.tool_calls -%}{%- if m.content -%}{{- m.content + '\\n' -}}{%- endif -%}"
        "{%- for call in m.tool_calls -%}{%- set f = call.function if call.function is defined else call -%}"
        "{{- ('' if loop.first else '\\n') + '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' -}}"
        "{{- f.arguments | tojson + '}\\n</tool_call>' -}}{%- endfor -%}"
        "{%- else -%}{{- m.content -}}{%- endif -%}{{- '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
        "{%- elif m.role == 'tool' -%}"
        "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
        "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}"
        "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


FORMAT = ChatFormat(
    "qwen2_5", render, stop_tokens=("<|im_end|>", "<|endoftext|>"), hf_template=_hf_template(),
    ollama_template=chatml_ollama(DEFAULT_SYSTEM), plain_contents=False, default_system=DEFAULT_SYSTEM,
    tools=ToolFormat(parse))
