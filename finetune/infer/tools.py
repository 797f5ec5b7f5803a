"""Tool calls read back from generated text: the inverse of how templates.py renders them for training.

Qwen2.5 writes each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` after optional text;
ChatGLM3 writes the tool's name as the reply's metadata line, then a ```python tool_call(k=v, ...)``` block (its
official finetune demo's format); Qwen-1 writes ReAct text — "Thought: ...\\nAction: name\\nAction Input: {json}",
read as Qwen's openai_api.py parse_response does, its "Observation:" being a stop string (STOPS) — and answers
after "Final Answer: ". Families without a tool format never get here (the prompt refuses tools).
Text that does not parse as a call stays the answer's content: a model that half-learned the format answers in
words rather than failing the request. That includes every way the parsers can refuse generated text: a Python
literal `ast.literal_eval` rejects (ValueError), a dict literal with an unhashable key such as `{[1]: 2}` (TypeError)
and nesting deeper than the parser's stack (RecursionError).
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any, Optional

from finetune.models import qwen1_react

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
        except (ValueError, RecursionError):
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
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return text, []
    return None, [openai_call(match["name"], arguments)]


def _qwen1(text: str) -> tuple[Optional[str], list[dict[str, Any]]]:
    action, action_input = text.find("\nAction:"), text.find("\nAction Input:")
    if 0 <= action < action_input:
        end = text.find(qwen1_react.OBSERVATION, action_input)
        arguments = text[action_input + len("\nAction Input:"): None if end < 0 else end].strip()
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            return text, []
        if not isinstance(parsed, dict):
            return text, []
        thought = text[:action]
        thought = thought[thought.find("Thought: ") + len("Thought: "):] if "Thought: " in thought else thought
        return thought.strip() or None, [openai_call(text[action + len("\nAction:"):action_input].strip(), parsed)]
    final = text.rfind("\nFinal Answer: ")
    return (text[final + len("\nFinal Answer: "):] if final >= 0 else text), []


PARSERS = {"qwen2_5": _qwen2_5, "chatglm3": _chatglm3, "qwen1": _qwen1}
STOPS = {"qwen1": (qwen1_react.STOP,)}
"""Stop strings a family's tool format needs while tools are offered."""


def parse(template: str, text: str) -> tuple[Optional[str], list[dict[str, Any]]]:
    """(content, tool calls) of an answer; no calls when the text is not the family's call format."""
    parser = PARSERS.get(template)
    return parser(text) if parser else (text, [])
