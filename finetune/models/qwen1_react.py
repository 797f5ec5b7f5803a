"""Qwen-1's tool use: ReAct text inside plain user/assistant messages, as Qwen's official code writes it.

Qwen-1 has no tool roles. Its openai_api.py (`parse_messages`, the code Qwen's examples/function_call_finetune_
examples.py points to for how structured calls become text) turns a conversation with functions into:
- the first user message: REACT_INSTRUCTION (every tool as TOOL_DESC, the names joined by ", ") + "\\n\\nQuestion: "
  + the user's text;
- a call: "Thought: {content}\\nAction: {name}\\nAction Input: {arguments}" in an assistant message;
- its result: "\\nObservation: {result}" appended to that same assistant message;
- the answer after results (or any answer when tools are offered): "Thought: I now know the final answer.\\nFinal
  Answer: {content}", appended with "\\n" while the assistant message is still open;
- every content stripped of leading newlines and trailing whitespace; a prompt that ends with a result ends with
  "\\nThought:" and no <|im_end|> (text completion), and generation stops at "Observation:".

Where the official sources differ we take openai_api.py (the inference side a trained model meets) and say so:
the fine-tuning example writes "I now know the final answer" without the final period; openai_api.py puts the
instruction on the latest history turn of a long conversation, while the fine-tuning example (and openai_api.py
for one or two rounds) keeps it on the first user message, which every later prompt extends — we keep it there.

Training: the call, the "\\nObservation:" that ends it (the model must write it for the stop word to fire) and the
answer are trained; the result text never is. One call per assistant turn, as ReAct has one Action per step.
"""

from __future__ import annotations

import json
from typing import Optional

from finetune.models import chat_parts
from finetune.models.chat_parts import Message, Part, Tools, Turns, function_schema

TOOL_DESC = ("{name_for_model}: Call this tool to interact with the {name_for_human} API."
             " What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}")
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
OBSERVATION = "\nObservation:"
FINAL_ANSWER = "Thought: I now know the final answer.\nFinal Answer: "
STOP = "Observation:"
"""The stop string generation needs with tools (openai_api.py adds it to the request's stop words)."""


def instruction(tools: Tools) -> str:
    """REACT_INSTRUCTION for these tool schemas (name/description, or Qwen's name_for_model, name_for_human and
    description_for_model; parameters as JSON, non-ASCII kept)."""
    descriptions, names = [], []
    for tool in map(function_schema, tools or ()):
        name = tool.get("name", "")
        name_for_model = tool.get("name_for_model", name)
        descriptions.append(TOOL_DESC.format(
            name_for_model=name_for_model, name_for_human=tool.get("name_for_human", name),
            description_for_model=tool.get("description_for_model", tool.get("description", "")),
            parameters=json.dumps(tool.get("parameters", {}), ensure_ascii=False)))
        names.append(name_for_model)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(descriptions), tools_name_text=", ".join(names))


def _strip(text: str) -> str:
    return text.lstrip("\n").rstrip()


def _step(m: Message, tools: Tools) -> str:
    """An assistant turn as ReAct text: its call (Thought/Action/Action Input) or its answer."""
    content = _strip(m["content"])
    if m.get("calls"):
        (name, arguments), = m["calls"]
        thought = content if content.startswith("Thought:") else f"Thought: {content}"
        return f"{thought}\nAction: {name}\nAction Input: {json.dumps(arguments, ensure_ascii=False)}"
    return f"{FINAL_ANSWER}{content}" if tools else content


def messages(system: Optional[str], turns: Turns, tools: Tools) -> tuple[Optional[str], Turns]:
    """The plain system/user/assistant messages openai_api.py makes of a tool conversation; an assistant message
    carries `train` (character spans of its content that are trained) and, when the conversation ends with a
    result, `open` (the prompt continues it after "\\nThought:" instead of closing it)."""
    out: list[Message] = []
    for m in turns:
        if m["role"] == "user":
            text = _strip(m["content"])
            if not any(o["role"] == "user" for o in out) and tools:
                text = f"{instruction(tools)}\n\nQuestion: {text}"
            out.append({"role": "user", "content": text})
        elif m["role"] == "tool":
            last = out[-1]
            last["train"].append((len(last["content"]), len(last["content"]) + len(OBSERVATION)))
            last["content"] += f"{OBSERVATION} {_strip(m['content'])}"
        else:
            if out[-1]["role"] == "user":
                out.append({"role": "assistant", "content": "", "train": []})
            else:
                out[-1]["content"] += "\n"
            last, step = out[-1], _step(m, tools)
            last["train"].append((len(last["content"]), len(last["content"]) + len(step)))
            last["content"] += step
    if turns[-1]["role"] == "tool":  # a prompt for text completion after the result
        out[-1].update(content=out[-1]["content"] + "\nThought:", open=True)
    for m in out:
        if m["role"] == "assistant":  # openai_api.py strips the joined message once more
            m["content"] = m["content"].rstrip()
            m["train"] = tuple((a, min(b, len(m["content"]))) for a, b in m["train"] if a < len(m["content"]))
    return (None if system is None else _strip(system)), out


def render(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    """Qwen-1's parts: make_context's layout, over the ReAct messages when the conversation has tools or calls."""
    if chat_parts.uses_tools(turns, tools):
        system, turns = messages(system, turns, tools)
    return chat_parts.qwen1(system, turns)
