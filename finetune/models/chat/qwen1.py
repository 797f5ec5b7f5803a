"""Qwen-1-Chat's chat format: ChatML as its make_context (qwen_generation_utils.py) lays it out, and its tool use
as the ReAct text of its openai_api.py.

make_context encodes role, "\\n" and content separately; the content and its <|im_end|> are trained, not the "\\n"
after it.

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

from finetune.models.chat.format import Calls, ChatFormat, ToolFormat
from finetune.models.chat.parts import Message, Part, Tools, Turns, function_schema, text, token, uses_tools
from finetune.models.chat.templating import chatml_ollama, no_tools_jinja

DEFAULT_SYSTEM = "You are a helpful assistant."
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
HF_NO_TOOLS = ("this chat template renders Qwen-1 without tools: its tool use is ReAct text that finetune writes "
               "into plain messages (finetune.models.chat.qwen1); pass the conversation to finetune")


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


def _strip(content: str) -> str:
    return content.lstrip("\n").rstrip()


def _step(m: Message, tools: Tools) -> str:
    """An assistant turn as ReAct text: its call (Thought/Action/Action Input) or its answer."""
    content = _strip(m["content"])
    if m.get("calls"):
        (name, arguments), = m["calls"]
        thought = content if content.startswith("Thought:") else f"Thought: {content}"
        return f"{thought}\nAction: {name}\nAction Input: {json.dumps(arguments, ensure_ascii=False)}"
    return f"{FINAL_ANSWER}{content}" if tools else content


def react_messages(system: Optional[str], turns: Turns, tools: Tools) -> tuple[Optional[str], Turns]:
    """The plain system/user/assistant messages openai_api.py makes of a tool conversation; an assistant message
    carries `train` (character spans of its content that are trained) and, when the conversation ends with a
    result, `open` (the prompt continues it after "\\nThought:" instead of closing it)."""
    out: list[Message] = []
    for m in turns:
        if m["role"] == "user":
            content = _strip(m["content"])
            if not any(o["role"] == "user" for o in out) and tools:
                content = f"{instruction(tools)}\n\nQuestion: {content}"
            out.append({"role": "user", "content": content})
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


def _make_context(system: Optional[str], turns: Turns) -> list[Part]:
    # An assistant message from react_messages says which spans of its content are trained (`train`), and whether
    # the prompt continues it (`open`: no <|im_end|>, generation goes on from its text).
    parts = []
    for m in [{"role": "system", "content": system}, *turns]:
        answer = m["role"] == "assistant"
        train = m.get("train", ((0, len(m["content"])),) if answer else ())
        parts += [token("<|im_start|>"), text(m["role"]), text("\n"), Part(text=m["content"], train=train)]
        if not m.get("open"):
            parts += [token("<|im_end|>", trained=answer), text("\n")]
    if turns[-1]["role"] == "user":
        parts += [token("<|im_start|>"), text("assistant"), text("\n")]
    return parts


def render(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    """make_context's layout, over the ReAct messages when the conversation has tools or calls."""
    if uses_tools(turns, tools):
        system, turns = react_messages(system, turns, tools)
    return _make_context(system, turns)


def parse(generated: str) -> tuple[Optional[str], Calls]:
    """ReAct text read as openai_api.py's parse_response does: "Thought: ...\\nAction: name\\nAction Input: {json}"
    is a call (its thought the content; generation stopped at "Observation:"), else the text after "Final Answer: "
    is the answer. Action Input that is not a JSON object leaves the text content."""
    action, action_input = generated.find("\nAction:"), generated.find("\nAction Input:")
    if 0 <= action < action_input:
        end = generated.find(OBSERVATION, action_input)
        arguments = generated[action_input + len("\nAction Input:"): None if end < 0 else end].strip()
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            return generated, []
        if not isinstance(parsed, dict):
            return generated, []
        thought = generated[:action]
        thought = thought[thought.find("Thought: ") + len("Thought: "):] if "Thought: " in thought else thought
        return thought.strip() or None, [(generated[action + len("\nAction:"):action_input].strip(), parsed)]
    final = generated.rfind("\nFinal Answer: ")
    return (generated[final + len("\nFinal Answer: "):] if final >= 0 else generated), []


HF_TEMPLATE = no_tools_jinja(HF_NO_TOOLS) + (
    "{%- if messages[0]['role'] == 'system' -%}{%- set sys = messages[0]['content'] -%}"
    "{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = '" + DEFAULT_SYSTEM + "' -%}"
    "{%- set msgs = messages -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + sys + '<|im_end|>\\n' -}}"
    "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
    "{{- '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- m['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

FORMAT = ChatFormat(
    "qwen1", render, stop_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), hf_template=HF_TEMPLATE,
    ollama_template=chatml_ollama(DEFAULT_SYSTEM), plain_contents=True, default_system=DEFAULT_SYSTEM,
    tools=ToolFormat(parse, stops=(STOP,), one_call_per_turn="Qwen-1's ReAct"))
