"""Baichuan2-Chat's chat format, as its generation_utils.build_chat_input and fine-tune.py lay out a conversation.

The system text raw, each user turn as <reserved_106> + content, each answer as <reserved_107> + content. Training
(fine-tune.py): eos is the label at the position after each answer (the next <reserved_106>), and eos ends the
conversation. Its chat code has no tool format.
"""

from __future__ import annotations

from typing import Optional

from finetune.models.chat.format import ChatFormat
from finetune.models.chat.parts import Part, Tools, Turns, text, token
from finetune.models.chat.templating import SPLIT_SYSTEM, no_tools_jinja

NO_TOOLS = "Baichuan2-Chat has no official tool-call format; train Qwen2.5 or ChatGLM3 for tool use"


def render(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    parts = [text(system)] if system is not None else []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            parts += [token("<reserved_106>", label="</s>" if i > 0 else None), text(m["content"])]
        else:
            parts += [token("<reserved_107>"), text(m["content"], trained=True)]
    return parts + [token("<reserved_107>") if turns[-1]["role"] == "user" else token("</s>", trained=True)]


HF_TEMPLATE = (
    no_tools_jinja(NO_TOOLS) + SPLIT_SYSTEM
    + "{%- if sys is not none -%}{{- sys -}}{%- endif -%}"
      "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}{{- '<reserved_106>' + m['content'] -}}"
      "{%- else -%}{{- '<reserved_107>' -}}{%- generation -%}"
      "{{- m['content'] + ('</s>' if loop.last else '') -}}{%- endgeneration -%}{%- endif -%}{%- endfor -%}"
      "{%- if add_generation_prompt -%}{{- '<reserved_107>' -}}{%- endif -%}")

OLLAMA_TEMPLATE = ('{{ if .System }}{{ .System }}{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}'
                   '<reserved_106>{{ .Content }}{{ else if eq .Role "assistant" }}<reserved_107>{{ .Content }}'
                   "{{ end }}{{ end }}<reserved_107>")

FORMAT = ChatFormat(
    "baichuan2", render, stop_tokens=("</s>",), hf_template=HF_TEMPLATE, ollama_template=OLLAMA_TEMPLATE,
    plain_contents=False, no_tools=NO_TOOLS)
