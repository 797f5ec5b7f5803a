"""Llama-2-chat's format, as Meta's chat_completion (llama/generation.py) lays out a conversation.

[BOS] + sp(f"[INST] {user} [/INST] {answer} ") + [EOS] per exchange, contents stripped, the system merged into the
first user message between <<SYS>> tags. Trained: the answer (from its leading space), the space after it, </s>.
Meta's code refuses the tags inside contents; it has no tool format.
"""

from __future__ import annotations

from typing import Optional

from finetune.models.chat.format import ChatFormat
from finetune.models.chat.parts import Part, Tools, Turns, text, token
from finetune.models.chat.templating import no_tools_jinja

NO_TOOLS = "Llama-2-chat has no official tool-call format; train Qwen2.5 or ChatGLM3 for tool use"


def render(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    users = [m["content"] for m in turns[0::2]]
    if system is not None:
        users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
    parts = []
    for i, user in enumerate(users):
        prompt = f"[INST] {user.strip()} [/INST]"
        if 2 * i + 1 < len(turns):
            answer = f" {turns[2 * i + 1]['content'].strip()} "
            parts += [token("<s>"), Part(text=prompt + answer, train=((len(prompt), len(prompt + answer)),)),
                      token("</s>", trained=True)]
        else:
            parts += [token("<s>"), text(prompt)]
    return parts


HF_TEMPLATE = (
    no_tools_jinja(NO_TOOLS) + "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set msgs = [{'role': 'user', 'content': '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n'"
    " + messages[1]['content']}] + messages[2:] -%}{%- else -%}{%- set msgs = messages -%}{%- endif -%}"
    "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
    "{{- '<s>[INST] ' + m['content'] | trim + ' [/INST]' -}}"
    "{%- else -%}{%- generation -%}{{- ' ' + m['content'] | trim + ' </s>' -}}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}")
"""With add_generation_prompt it renders the Ollama TEMPLATE's text plus the first <s>, which llama.cpp adds
itself."""

OLLAMA_TEMPLATE = ('{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}{{ if $first }}[INST] '
                   "{{ if $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
                   "{{ $first = false }}{{ else }}<s>[INST] {{ .Content }} [/INST]{{ end }}"
                   '{{ else if eq .Role "assistant" }} {{ .Content }} </s>{{ end }}{{ end }}')

FORMAT = ChatFormat(
    "llama2", render, stop_tokens=("</s>",), hf_template=HF_TEMPLATE, ollama_template=OLLAMA_TEMPLATE,
    plain_contents=True, reserved=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"), no_tools=NO_TOOLS)
