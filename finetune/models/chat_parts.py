"""How each family's ORIGINAL chat code lays out a conversation, as `Part`s: a special token, or a text that code
encodes in one tokenizer call (ChatGLM3, Baichuan2 and Qwen-1 encode role, newline and content separately;
Llama-2 one string per exchange; Qwen2.5 the whole rendered text). finetune.models.templates validates a
conversation, picks the layout and turns the parts into ids and labels.

Tools: Qwen2.5 renders them as its chat_template does (`# Tools` system block, `<tool_call>` JSON, results as
`<tool_response>` in a user turn); ChatGLM3 as its official code does (tools as indented JSON in the system message,
a call as `<|assistant|>{name}` + a ```python tool_call(...)``` block, results as `<|observation|>` turns). The call
and the token after it are trained like an answer; results never are. Qwen-1's tool use is ReAct text in plain
messages (finetune.models.qwen1_react makes those messages). Llama-2 and Baichuan2 have no tool format in their
chat code (NO_TOOLS says why).
"""

from __future__ import annotations

import ast
import json
from typing import NamedTuple, Optional

Message = dict  # {"role": "system" | "user" | "assistant" | "tool", "content": str, "tool_calls"?: [...]}
Tools = Optional[list]  # function schemas, as the data gives them


class Part(NamedTuple):
    """A special token (by its string), or a text encoded in ONE tokenizer call. (A tuple: a batch of 100k
    conversations makes millions of them.)"""

    text: str = ""
    special: Optional[str] = None
    train: tuple[tuple[int, int], ...] = ()  # character spans of `text` whose tokens are trained
    trained: bool = False  # a special token whose own id is its label
    label: Optional[str] = None  # a special token labelled with ANOTHER token (Baichuan2: eos under a user token)


def _tok(special: str, trained: bool = False, label: Optional[str] = None) -> Part:
    return Part(special=special, trained=trained, label=label)


def _text(text: str, trained: bool = False) -> Part:
    return Part(text=text, train=((0, len(text)),) if trained else ())


Turns = list[Message]  # after _split: user first; an assistant with tool calls carries them as `calls`

CHATGLM3_TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
"""ChatGLM3's system prompt for tools when the conversation has none (PROMPT.md, finetune_chatmodel_demo)."""
QWEN2_5_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>")
"""The text Qwen2.5's chat_template puts around the tool schemas in the system turn (before, after)."""


def uses_tools(turns: Turns, tools: Tools) -> bool:
    """Whether a validated conversation offers tools, makes a call or carries a result."""
    return bool(tools) or any(m["role"] == "tool" or m.get("calls") for m in turns)


def function_schema(tool: dict) -> dict:
    """A tool schema without OpenAI's {"type": "function", "function": ...} wrapper."""
    inner = tool.get("function")
    return inner if tool.get("type") == "function" and isinstance(inner, dict) else tool


def _chatglm3_call(name: str, arguments: dict) -> str:
    # finetune_chatmodel_demo format_function_call: the arguments as Python keywords of tool_call(...)
    call = ast.Call(func=ast.Name(id="tool_call"), args=[],
                    keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in arguments.items()])
    return f"```python\n{ast.unparse(call)}\n```"


def chatglm3(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    # build_chat_input / finetune_demo process_batch: <|role|> + sp(metadata + "\n") + sp(content); the token
    # after an assistant message (<|user|>, <|observation|>, the next <|assistant|> or the final eos) is trained,
    # an <|assistant|> that follows a user or a result is not. Tools: build_chat_input's system content + "\n" +
    # json.dumps(tools, indent=4); a call is an assistant message whose metadata is the tool's name.
    parts = [_tok("[gMASK]"), _tok("sop")]
    if tools:
        schemas = json.dumps([function_schema(t) for t in tools], indent=4, ensure_ascii=False)
        system = f"{CHATGLM3_TOOL_SYSTEM if system is None else system}\n{schemas}"
    if system is not None:
        parts += [_tok("<|system|>"), _text("\n"), _text(system)]
    after_answer = False
    for m in turns:
        if m["role"] != "assistant":
            role = "<|observation|>" if m["role"] == "tool" else "<|user|>"
            parts += [_tok(role, trained=after_answer), _text("\n"), _text(m["content"])]
            after_answer = False
            continue
        if m["content"] or not m.get("calls"):
            parts += [_tok("<|assistant|>", trained=after_answer), _text("\n", trained=True),
                      _text(m["content"], trained=True)]
            after_answer = True
        for name, arguments in m.get("calls", ()):
            parts += [_tok("<|assistant|>", trained=after_answer), _text(f"{name}\n", trained=True),
                      _text(_chatglm3_call(name, arguments), trained=True)]
            after_answer = True
    return parts + [_tok("</s>", trained=True) if after_answer else _tok("<|assistant|>")]


def baichuan2(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    # generation_utils.build_chat_input: raw system, 195 + user, 196 + answer; fine-tune.py: eos is the label at
    # the position after each answer (the next 195), eos appended at the end.
    parts = [_text(system)] if system is not None else []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            parts += [_tok("<reserved_106>", label="</s>" if i > 0 else None), _text(m["content"])]
        else:
            parts += [_tok("<reserved_107>"), _text(m["content"], trained=True)]
    return parts + [_tok("<reserved_107>") if turns[-1]["role"] == "user" else _tok("</s>", trained=True)]


def qwen1(system: Optional[str], turns: Turns) -> list[Part]:
    # make_context: role, "\n" and content encoded separately; content + <|im_end|> trained, not the "\n" after.
    # An assistant message from qwen1_react (tool conversations) says which spans of its content are trained
    # (`train`), and whether the prompt continues it (`open`: no <|im_end|>, generation goes on from its text).
    parts = []
    for m in [{"role": "system", "content": system}, *turns]:
        answer = m["role"] == "assistant"
        train = m.get("train", ((0, len(m["content"])),) if answer else ())
        parts += [_tok("<|im_start|>"), _text(m["role"]), _text("\n"), Part(text=m["content"], train=train)]
        if not m.get("open"):
            parts += [_tok("<|im_end|>", trained=answer), _text("\n")]
    if turns[-1]["role"] == "user":
        parts += [_tok("<|im_start|>"), _text("assistant"), _text("\n")]
    return parts


def _qwen2_5_system(system: str, tools: Tools) -> str:
    if not tools:
        return f"<|im_start|>system\n{system}<|im_end|>\n"
    schemas = "".join("\n" + json.dumps({"type": "function", "function": function_schema(t)}, ensure_ascii=False)
                      for t in tools)
    return f"<|im_start|>system\n{system}{QWEN2_5_TOOLS[0]}{schemas}{QWEN2_5_TOOLS[1]}<|im_end|>\n"


def _qwen2_5_answer(m: Message) -> str:
    calls = [f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}'
             "\n</tool_call>" for name, arguments in m.get("calls", ())]
    if not calls:
        return m["content"]
    return (f"{m['content']}\n" if m["content"] else "") + "\n".join(calls)


def qwen2_5(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    # The official chat_template's text, tokenized as ONE string; consecutive tool results share one user turn.
    # Bare tool schemas are wrapped as {"type": "function", "function": ...}, the form Qwen's docs pass.
    text, spans = _qwen2_5_system(system, tools), []  # type: ignore[arg-type]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            text += f"<|im_start|>user\n{m['content']}<|im_end|>\n"
        elif m["role"] == "assistant":
            answer = f"{_qwen2_5_answer(m)}<|im_end|>"
            text += "<|im_start|>assistant\n"
            spans.append((len(text), len(text) + len(answer)))
            text += answer + "\n"
        else:
            text += "<|im_start|>user" if turns[i - 1]["role"] != "tool" else ""
            text += f"\n<tool_response>\n{m['content']}\n</tool_response>"
            text += "<|im_end|>\n" if i + 1 == len(turns) or turns[i + 1]["role"] != "tool" else ""
    if turns[-1]["role"] != "assistant":
        text += "<|im_start|>assistant\n"
    return [Part(text=text, train=tuple(spans))]


def llama2(system: Optional[str], turns: Turns, tools: Tools) -> list[Part]:
    # Meta's chat_completion: [BOS] + sp(f"[INST] {user} [/INST] {answer} ") + [EOS] per exchange; the system
    # merged into the first user message. Trained: the answer (from its leading space), the space, </s>.
    users = [m["content"] for m in turns[0::2]]
    if system is not None:
        users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
    parts = []
    for i, user in enumerate(users):
        prompt = f"[INST] {user.strip()} [/INST]"
        if 2 * i + 1 < len(turns):
            answer = f" {turns[2 * i + 1]['content'].strip()} "
            parts += [_tok("<s>"), Part(text=prompt + answer, train=((len(prompt), len(prompt + answer)),)),
                      _tok("</s>", trained=True)]
        else:
            parts += [_tok("<s>"), _text(prompt)]
    return parts


QWEN1_SYSTEM = "You are a helpful assistant."
QWEN2_5_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
NO_TOOLS = {
    "llama2": "Llama-2-chat has no official tool-call format; train Qwen2.5 or ChatGLM3 for tool use",
    "baichuan2": "Baichuan2-Chat has no official tool-call format; train Qwen2.5 or ChatGLM3 for tool use",
}
