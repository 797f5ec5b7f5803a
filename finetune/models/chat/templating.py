"""Pieces of the text templates (HF jinja, Ollama Go) that several formats share."""

from __future__ import annotations

import json

SPLIT_SYSTEM = ("{%- if messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] -%}"
                "{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = none -%}{%- set msgs = messages -%}"
                "{%- endif -%}")
"""Jinja: a system message first becomes `sys` (else none); the other messages are `msgs`."""


def no_tools_jinja(reason: str) -> str:
    """A guard for chat templates that do not render tools: tools given or tool turns present → an error."""
    return ("{%- if tools or messages | selectattr('role', 'equalto', 'tool') | list "
            "or messages | selectattr('tool_calls') | list -%}{{- raise_exception(" + json.dumps(reason) + ") -}}"
            "{%- endif -%}")


def chatml_ollama(default_system: str) -> str:
    """The Ollama TEMPLATE of Qwen's ChatML (Qwen-1 and Qwen2.5 alike, each with its own default system)."""
    return (
        "<|im_start|>system\n{{ if .System }}{{ .System }}{{ else }}" + default_system + "{{ end }}<|im_end|>\n"
        '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
        "<|im_start|>assistant\n"
    )
