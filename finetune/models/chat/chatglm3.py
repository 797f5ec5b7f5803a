"""ChatGLM3's chat format, as its official code (tokenization_chatglm.py build_chat_input, finetune_demo
process_batch) lays out a conversation.

Each turn is <|role|> + the metadata line + the content, the three encoded separately; the token after an answer
(<|user|>, <|observation|>, the next <|assistant|> or the final eos) is trained, an <|assistant|> that follows a
user turn or a result is not. Tools as the official code writes them: the schemas as indented JSON after the
system text, a call as an assistant turn whose metadata is the tool's name and whose content is a
```python tool_call(...)``` block (finetune_chatmodel_demo format_function_call), results as <|observation|> turns.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Optional

from finetune.models.chat.format import Calls, ChatFormat, ToolFormat
from finetune.models.chat.parts import Part, Tools, Turns, function_schema, text, token
from finetune.models.chat.templating import SPLIT_SYSTEM, no_tools_jinja

TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
"""ChatGLM3's system prompt for tools when the conversation has none (PROMPT.md, finetune_chatmodel_demo)."""
HF_NO_TOOLS = ("this chat template renders ChatGLM3 without tools: its tool calls are Python repr text that a chat "
               "template cannot reproduce exactly (finetune renders them)")


def _call(name: str, arguments: dict) -> str:
    # finetune_chatmodel_demo format_function_call: the arguments as Python keywords of tool_call(...)
    call = ast.Call(func=ast.Name(id="tool_call"), args=[],
                    keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in arguments.items()])
    return f"```python\n{ast.unparse(call)}\n```"


def render(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    # build_chat_input / finetune_demo process_batch: <|role|> + sp(metadata + "\n") + sp(content). Tools:
    # build_chat_input's system content + "\n" + json.dumps(tools, indent=4).
    parts = [token("[gMASK]"), token("sop")]
    if tools:
        schemas = json.dumps([function_schema(t) for t in tools], indent=4, ensure_ascii=False)
        system = f"{TOOL_SYSTEM if system is None else system}\n{schemas}"
    if system is not None:
        parts += [token("<|system|>"), text("\n"), text(system)]
    after_answer = False
    for m in turns:
        if m["role"] != "assistant":
            role = "<|observation|>" if m["role"] == "tool" else "<|user|>"
            parts += [token(role, trained=after_answer), text("\n"), text(m["content"])]
            after_answer = False
            continue
        if m["content"] or not m.get("calls"):
            parts += [token("<|assistant|>", trained=after_answer), text("\n", trained=True),
                      text(m["content"], trained=True)]
            after_answer = True
        for name, arguments in m.get("calls", ()):
            parts += [token("<|assistant|>", trained=after_answer), text(f"{name}\n", trained=True),
                      text(_call(name, arguments), trained=True)]
            after_answer = True
    return parts + [token("</s>", trained=True) if after_answer else token("<|assistant|>")]


_CALL = re.compile(r"(?P<name>[^\s`]+)\s*\n\s*```python\s*\n(?P<code>.*?)\n?\s*```\s*", re.S)


def parse(generated: str) -> tuple[Optional[str], Calls]:
    """The tool's name as the reply's metadata line, then a ```python tool_call(k=v, ...)``` block. Every way the
    parser can refuse generated text leaves it content: a Python literal `ast.literal_eval` rejects (ValueError),
    a dict literal with an unhashable key such as `{[1]: 2}` (TypeError), nesting deeper than the parser's stack
    (RecursionError)."""
    match = _CALL.fullmatch(generated)
    if not match:
        return generated, []
    try:
        call = ast.parse(match["code"].strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
                and not call.args and all(k.arg for k in call.keywords)):
            return generated, []
        arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return generated, []
    return None, [(match["name"], arguments)]


HF_TEMPLATE = (
    no_tools_jinja(HF_NO_TOOLS) + SPLIT_SYSTEM
    + "{{- '[gMASK]sop' -}}{%- if sys is not none -%}{{- '<|system|>\\n ' + sys -}}{%- endif -%}"
      "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
      "{%- if loop.first -%}{{- '<|user|>' -}}{%- endif -%}{{- '\\n ' + m['content'] -}}"
      "{%- else -%}{{- '<|assistant|>' -}}{%- generation -%}"
      "{{- '\\n ' + m['content'] + ('</s>' if loop.last else '<|user|>') -}}{%- endgeneration -%}"
      "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")

OLLAMA_TEMPLATE = ("[gMASK]sop{{ if .System }}<|system|>\n {{ .System }}{{ end }}"
                   '{{ range .Messages }}{{ if eq .Role "user" }}<|user|>\n {{ .Content }}'
                   '{{ else if eq .Role "assistant" }}<|assistant|>\n {{ .Content }}{{ end }}{{ end }}<|assistant|>')

FORMAT = ChatFormat(
    "chatglm3", render, stop_tokens=("</s>", "<|user|>", "<|observation|>"), hf_template=HF_TEMPLATE,
    ollama_template=OLLAMA_TEMPLATE, plain_contents=True,
    tools=ToolFormat(parse, one_call_per_turn="ChatGLM3"))
