"""Each chat format as text for other programs: a Hugging Face chat template (jinja, {% generation %} around the
trained spans) and an Ollama Modelfile TEMPLATE (Go text/template over .System and .Messages). Both are tokenized
jointly by their consumers, so finetune.models.templates' docstring lists where they cannot match the original
segment boundaries; tests render both and compare token ids with the training encodings.
"""

from __future__ import annotations

import json

from finetune.models.chat_parts import NO_TOOLS, QWEN1_SYSTEM, QWEN2_5_SYSTEM, QWEN2_5_TOOLS

CHATGLM3_HF_NO_TOOLS = ("this chat template renders ChatGLM3 without tools: its tool calls are Python repr text "
                        "that a chat template cannot reproduce exactly (finetune renders them)")
QWEN1_HF_NO_TOOLS = ("this chat template renders Qwen-1 without tools: its tool use is ReAct text that finetune "
                     "writes into plain messages (finetune.models.qwen1_react); pass the conversation to finetune")


def _no_tools_jinja(reason: str) -> str:
    """A guard for chat templates of formats without tools: tools given or tool turns present → an error."""
    return ("{%- if tools or messages | selectattr('role', 'equalto', 'tool') | list "
            "or messages | selectattr('tool_calls') | list -%}{{- raise_exception(" + json.dumps(reason) + ") -}}"
            "{%- endif -%}")


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


def _qwen2_5_jinja() -> str:
    """Qwen2.5's official chat_template (same text, tools included), rearranged so that {% generation %} marks
    what encode_conversation trains: each answer or call after "<|im_start|>assistant\\n", with its <|im_end|>."""
    before, after = (json.dumps(t)[1:-1] for t in QWEN2_5_TOOLS)
    return (
        "{%- if messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] -%}"
        "{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = '" + QWEN2_5_SYSTEM + "' -%}"
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


HF: dict[str, str] = {
    "chatglm3": _no_tools_jinja(CHATGLM3_HF_NO_TOOLS) + _SPLIT_SYSTEM
    + "{{- '[gMASK]sop' -}}{%- if sys is not none -%}{{- '<|system|>\\n ' + sys -}}{%- endif -%}"
      "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
      "{%- if loop.first -%}{{- '<|user|>' -}}{%- endif -%}{{- '\\n ' + m['content'] -}}"
      "{%- else -%}{{- '<|assistant|>' -}}{%- generation -%}"
      "{{- '\\n ' + m['content'] + ('</s>' if loop.last else '<|user|>') -}}{%- endgeneration -%}"
      "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}",
    "baichuan2": _no_tools_jinja(NO_TOOLS["baichuan2"]) + _SPLIT_SYSTEM
    + "{%- if sys is not none -%}{{- sys -}}{%- endif -%}"
      "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}{{- '<reserved_106>' + m['content'] -}}"
      "{%- else -%}{{- '<reserved_107>' -}}{%- generation -%}"
      "{{- m['content'] + ('</s>' if loop.last else '') -}}{%- endgeneration -%}{%- endif -%}{%- endfor -%}"
      "{%- if add_generation_prompt -%}{{- '<reserved_107>' -}}{%- endif -%}",
    "qwen1": _no_tools_jinja(QWEN1_HF_NO_TOOLS) + _chatml_jinja(QWEN1_SYSTEM),
    "qwen2_5": _qwen2_5_jinja(),
    "llama2": _no_tools_jinja(NO_TOOLS["llama2"]) + "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set msgs = [{'role': 'user', 'content': '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n'"
    " + messages[1]['content']}] + messages[2:] -%}{%- else -%}{%- set msgs = messages -%}{%- endif -%}"
    "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
    "{{- '<s>[INST] ' + m['content'] | trim + ' [/INST]' -}}"
    "{%- else -%}{%- generation -%}{{- ' ' + m['content'] | trim + ' </s>' -}}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}",
}
"""Jinja for `tokenizer.chat_template`: with add_generation_prompt it renders the Ollama template's text (Llama-2:
plus the first <s>, which llama.cpp adds itself); a conversation ending with an answer renders its training text."""

OLLAMA: dict[str, str] = {
    "chatglm3": "[gMASK]sop{{ if .System }}<|system|>\n {{ .System }}{{ end }}"
                '{{ range .Messages }}{{ if eq .Role "user" }}<|user|>\n {{ .Content }}'
                '{{ else if eq .Role "assistant" }}<|assistant|>\n {{ .Content }}{{ end }}{{ end }}<|assistant|>',
    "baichuan2": '{{ if .System }}{{ .System }}{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}'
                 '<reserved_106>{{ .Content }}{{ else if eq .Role "assistant" }}<reserved_107>{{ .Content }}'
                 "{{ end }}{{ end }}<reserved_107>",
    "qwen1": _chatml_ollama(QWEN1_SYSTEM),
    "qwen2_5": _chatml_ollama(QWEN2_5_SYSTEM),
    "llama2": '{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}{{ if $first }}[INST] '
              "{{ if $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
              "{{ $first = false }}{{ else }}<s>[INST] {{ .Content }} [/INST]{{ end }}"
              '{{ else if eq .Role "assistant" }} {{ .Content }} </s>{{ end }}{{ end }}',
}
"""The TEMPLATE of an Ollama Modelfile: reads .System and .Messages, ends with the generation prompt."""
