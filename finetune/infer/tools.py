"""Tool calls read back from generated text, as OpenAI's API returns them.

Each chat format reads its own call format back (ChatFormat.tools.parse, the inverse of how it renders calls for
training: Qwen2.5's `<tool_call>` JSON, ChatGLM3's ```python tool_call(...)``` block, Qwen-1's ReAct text); this
module gives the calls OpenAI's shape. Families without a tool format never get here with tools (the prompt
refuses them), and their text is always content. Text that does not parse as a call stays the answer's content: a
model that half-learned the format answers in words rather than failing the request.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from finetune.models.chat.format import ChatFormat


def openai_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One call as OpenAI's API returns it (arguments as JSON text)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse(fmt: ChatFormat, text: str) -> tuple[Optional[str], list[dict[str, Any]]]:
    """(content, tool calls) of an answer; no calls when the text is not the format's call format."""
    if fmt.tools is None:
        return text, []
    content, calls = fmt.tools.parse(text)
    return content, [openai_call(name, arguments) for name, arguments in calls]
