"""Tool calls read back from generated text: the inverse of how templates.py renders them for training.

Qwen2.5 writes each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` after optional text;
ChatGLM3 writes the tool's name as the reply's metadata line, then a ```python tool_call(k=v, ...)``` block (its
official finetune demo's format). Families without a tool format never get here (the prompt refuses tools).
Text that does not parse as a call stays the answer's content: a model that half-learned the format answers in
words rather than failing the request.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any, Optional

_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_GLM_CALL = re.compile(r"(?P<name>[^\s`]+)\s*\n\s*```python\s*\n(?P<code>.*?)\n?\s*```\s*", re.S)


def openai_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One call as OpenAI's API returns it (arguments as JSON text)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _qwen2_5(text: str) -> tuple[Optional[str], list[dict[str, Any]]]:
    calls = []
    for block in _QWEN_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments", {}), dict)):
            return text, []
        calls.append(openai_call(call["name"], call.get("arguments", {})))
    content = text.split("<tool_call>", 1)[0].strip() if calls else text
    return content or None, calls


def _chatglm3(text: str) -> tuple[Optional[str], list[dict[str, Any]]]:
    match = _GLM_CALL.fullmatch(text)
    if not match:
        return text, []
    try:
        call = ast.parse(match["code"].strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
                and not call.args and all(k.arg for k in call.keywords)):
            return text, []
        arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
        return text, []
    return None, [openai_call(match["name"], arguments)]


PARSERS = {"qwen2_5": _qwen2_5, "chatglm3": _chatglm3}


def parse(template: str, text: str) -> tuple[Optional[str], list[dict[str, Any]]]:
    """(content, tool calls) of an answer; no calls when the text is not the family's call format."""
    parser = PARSERS.get(template)
    return parser(text) if parser else (text, [])
