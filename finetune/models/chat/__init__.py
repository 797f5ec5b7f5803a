"""The chat formats, one module and one `ChatFormat` object per format, registered here once.

A format module holds everything about its format (finetune.models.chat.format.ChatFormat): how its original chat
code lays out a conversation and which parts are trained, its stop tokens, its Hugging Face chat template and Ollama
TEMPLATE, its tool-call format. A registry family (finetune.models.registry) names its format; training, inference,
evaluation and export ask the object. A new format is a new module here and one line in FORMATS.

This package imports nothing else from finetune, so the registry and anything else may import it.
"""

from __future__ import annotations

from pathlib import Path

from finetune.models.chat import baichuan2, chatglm3, llama2, qwen1, qwen2_5
from finetune.models.chat.format import ChatFormat

FORMATS: dict[str, ChatFormat] = {}
for _format in (chatglm3.FORMAT, baichuan2.FORMAT, qwen1.FORMAT, qwen2_5.FORMAT, llama2.FORMAT):
    if _format.name in FORMATS:
        raise RuntimeError(f"chat format {_format.name} is registered twice")
    FORMATS[_format.name] = _format

SOURCES: tuple[Path, ...] = tuple(sorted(Path(__file__).parent.glob("*.py")))
"""Every file of this package: what rendered ids, a saved tokenizer (its chat_template) and a Modelfile depend on,
for cache fingerprints."""


def get(name: str) -> ChatFormat:
    """The format `name` (a family's, as base.json records it); ValueError naming the known ones otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown chat template '{name}' (known: {', '.join(FORMATS)})")
    return FORMATS[name]
