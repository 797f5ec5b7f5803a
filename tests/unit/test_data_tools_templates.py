"""Tool calls render in each family's own official tool format, token for token, with labels on the calls and
answers only (never on tool results); families without a tool format refuse tools with a reason.

References: Qwen2.5's chat_template exactly as published (tokenizer_config.json in finetune/models/tokenizer_files),
run by transformers' apply_chat_template; ChatGLM3's tool format re-implemented here from its official code
(tokenization_chatglm.py build_single_message / build_chat_input, finetune_chatmodel_demo's format_conversation)
with SentencePiece called directly; Qwen-1's ReAct text written out literally from Qwen's openai_api.py
(parse_messages) and examples/function_call_finetune_examples.py, tokenized with tiktoken as make_context does.
"""

from __future__ import annotations

import ast
import json

import pytest
from test_templates import q, qwen, sp

from finetune.models import chat
from finetune.models.tokenizers import BUNDLED, bundled_tokenizer

M = -100
WEATHER = {"name": "get_weather", "description": "天气 for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
NOW = {"type": "function", "function": {"name": "now", "description": "Current time",
                                        "parameters": {"type": "object", "properties": {}}}}
PARALLEL = [  # two calls in one turn (plain and OpenAI form, arguments as object and as JSON text), two results
    {"role": "user", "content": "北京和上海天气？"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "北京"}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"上海\"}"}}]},
    {"role": "tool", "content": "{\"temp\": 22}"},
    {"role": "tool", "content": "晴 25°C"},
    {"role": "assistant", "content": "Beijing 22, Shanghai 25."},
    {"role": "user", "content": "What time is it?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "now", "arguments": {}}]},
    {"role": "tool", "content": "10:00"},
    {"role": "assistant", "content": "It is 10:00."},
]
SINGLE = [  # ChatGLM3 calls one tool per turn
    {"role": "user", "content": "北京天气？"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather",
                                                          "arguments": {"city": "北京", "days": 2, "note": "it's"}}]},
    {"role": "tool", "content": "{\"temp\": 22}"},
    {"role": "assistant", "content": "22 度。"},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "Let me check the time.", "tool_calls": [{"name": "now", "arguments": {}}]},
    {"role": "tool", "content": "10:00"},
    {"role": "assistant", "content": "It is 10:00."},
]


def official_qwen2_5(conv: list[dict], tools: list[dict], **kwargs) -> list[int]:
    """Qwen2.5's published chat_template, given what it expects: OpenAI-wrapped tools, arguments as objects."""
    template = json.loads((BUNDLED / "qwen2_5" / "tokenizer_config.json").read_text())["chat_template"]
    wrapped = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    return bundled_tokenizer("qwen2_5").apply_chat_template(
        hf_messages(conv), tools=wrapped, chat_template=template, return_dict=False, **kwargs)


def hf_messages(conv: list[dict]) -> list[dict]:
    out = []
    for m in conv:
        calls = [c.get("function", c) for c in m.get("tool_calls") or ()]
        calls = [{"function": {"name": c["name"], "arguments": c["arguments"] if isinstance(c["arguments"], dict)
                               else json.loads(c["arguments"])}} for c in calls]
        out.append({**m, "tool_calls": calls} if calls else m)
    return out


def trained_text(tok, encoded) -> str:
    return tok.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != M])


@pytest.mark.parametrize("system", [[], [{"role": "system", "content": "Be brief."}]])
def test_qwen2_5_tool_conversation_is_its_chat_template_token_for_token(system):
    tok, conv = bundled_tokenizer("qwen2_5"), [*system, *PARALLEL]
    encoded = chat.get("qwen2_5").encode_conversation(tok, conv, tools=[WEATHER, NOW])
    assert encoded.input_ids == official_qwen2_5(conv, [WEATHER, NOW])
    assert trained_text(tok, encoded) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>'
        "Beijing 22, Shanghai 25.<|im_end|>"
        'Let me check.\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>It is 10:00.<|im_end|>')


@pytest.mark.parametrize("upto", [4, 8])  # after two results in one user turn; after the last result
def test_qwen2_5_prompt_after_tool_results_is_its_generation_prompt(upto):
    conv = PARALLEL[:upto]
    assert chat.get("qwen2_5").encode_prompt(bundled_tokenizer("qwen2_5"), conv, tools=[WEATHER, NOW]) == \
        official_qwen2_5(conv, [WEATHER, NOW], add_generation_prompt=True)


def test_qwen2_5_exported_chat_template_renders_tools_as_the_original_and_marks_what_is_trained():
    tok = bundled_tokenizer("qwen2_5")  # carries chat.get("qwen2_5").hf_template
    conv = hf_messages(PARALLEL)
    encoded = chat.get("qwen2_5").encode_conversation(tok, PARALLEL, tools=[WEATHER, NOW])
    out = tok.apply_chat_template(conv, tools=[WEATHER, NOW], return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == encoded.input_ids
    assert out["assistant_masks"] == [int(label != M) for label in encoded.labels]


def glm_message(role: str, metadata: str, content: str) -> list[int]:
    """tokenization_chatglm.py build_single_message: <|role|> + sp(metadata + "\\n") + sp(content)."""
    role_id = {"system": 64794, "user": 64795, "assistant": 64796, "observation": 64797}[role]
    return [role_id] + sp("chatglm3").encode(f"{metadata}\n") + sp("chatglm3").encode(content)


def glm_call(arguments: dict) -> str:
    """finetune_chatmodel_demo format_function_call, in its ```python block."""
    call = ast.Call(func=ast.Name(id="tool_call"), args=[],
                    keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in arguments.items()])
    return f"```python\n{ast.unparse(call)}\n```"


def ref_chatglm3_tools(conv: list[dict], tools: list[dict]) -> tuple[list[int], list[int]]:
    """finetune_chatmodel_demo format_conversation: the tool system prompt + json.dumps(tools, indent=4) first; a
    call is an assistant message with the tool's name as metadata (trained), its result an observation (not);
    eos appended; the loss mask shifted right by one."""
    system = ("Answer the following questions as best as you can. You have access to the following tools:\n"
              + json.dumps(tools, indent=4, ensure_ascii=False))
    ids, mask = [64790, 64792], [False, False]

    def add(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        mask.extend([trained] * len(tokens))

    add(glm_message("system", "", system), False)
    for m in conv:
        if m["role"] == "assistant":
            if m["content"]:
                add(glm_message("assistant", "", m["content"]), True)
            for call in m.get("tool_calls") or ():
                add(glm_message("assistant", call["name"], glm_call(call["arguments"])), True)
        else:
            add(glm_message("observation" if m["role"] == "tool" else "user", "", m["content"]), False)
    add([2], False)
    return ids, [t if keep else M for t, keep in zip(ids, [False, *mask[:-1]])]


def test_chatglm3_tool_conversation_is_its_official_fine_tuning_format():
    tok = bundled_tokenizer("chatglm3")
    tools = [WEATHER, NOW["function"]]
    encoded = chat.get("chatglm3").encode_conversation(tok, SINGLE, tools=[WEATHER, NOW])  # NOW unwrapped
    ids, labels = ref_chatglm3_tools(SINGLE, tools)
    assert encoded.input_ids == ids and encoded.labels == labels
    trained = trained_text(tok, encoded)
    assert "tool_call(city='北京', days=2, note=\"it's\")" in trained and "<|observation|>" in trained
    assert "temp" not in trained and "10:00<" not in trained  # results are never trained


def test_chatglm3_prompt_after_a_result_is_build_chat_input_with_role_observation():
    tok = bundled_tokenizer("chatglm3")
    system = "Be brief."
    conv = [{"role": "system", "content": system}, *SINGLE[:3]]
    history = [glm_message("system", "", system + "\n" + json.dumps([WEATHER], indent=4, ensure_ascii=False)),
               glm_message("user", "", SINGLE[0]["content"]),
               glm_message("assistant", "get_weather", glm_call(SINGLE[1]["tool_calls"][0]["arguments"])),
               glm_message("observation", "", SINGLE[2]["content"]), [64796]]
    assert chat.get("chatglm3").encode_prompt(tok, conv, tools=[WEATHER]) == [64790, 64792] + sum(history, [])


def test_chatglm3_refuses_parallel_calls_in_one_turn():
    with pytest.raises(ValueError, match="one tool call per assistant turn"):
        chat.get("chatglm3").encode_conversation(bundled_tokenizer("chatglm3"), PARALLEL, tools=[WEATHER, NOW])


QWEN1_INSTRUCTION = (  # openai_api.py REACT_INSTRUCTION with TOOL_DESC per tool, names joined by ", "
    "Answer the following questions as best you can. You have access to the following APIs:\n\n"
    "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? "
    '天气 for a city Parameters: {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}'
    "\n\nnow: Call this tool to interact with the now API. What is the now API useful for? Current time "
    'Parameters: {"type": "object", "properties": {}}\n\n'
    "Use the following format:\n\nQuestion: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [get_weather, now]\nAction Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\nFinal Answer: the final answer to the original input question\n\n"
    "Begin!")
QWEN1_ROUND_1 = ('Thought: \nAction: get_weather\nAction Input: {"city": "北京", "days": 2, "note": "it\'s"}'
                 '\nObservation: {"temp": 22}\nThought: I now know the final answer.\nFinal Answer: 22 度。')
QWEN1_ROUND_2 = ("Thought: Let me check the time.\nAction: now\nAction Input: {}\nObservation: 10:00"
                 "\nThought: I now know the final answer.\nFinal Answer: It is 10:00.")


def qwen1_message(role: str, content: str) -> list[int]:
    """make_context / finetune.py: <|im_start|> + role + "\\n" + content (each encoded alone) + <|im_end|> + "\\n"."""
    return [151644] + q(role) + q("\n") + q(content) + [151645] + q("\n")


def test_qwen1_tool_conversation_is_react_text_in_plain_messages_token_for_token():
    tok = bundled_tokenizer("qwen1")
    encoded = chat.get("qwen1").encode_conversation(tok, SINGLE, tools=[WEATHER, NOW])
    expected = sum([qwen1_message("system", "You are a helpful assistant."),
                    qwen1_message("user", f"{QWEN1_INSTRUCTION}\n\nQuestion: 北京天气？"),
                    qwen1_message("assistant", QWEN1_ROUND_1), qwen1_message("user", "Thanks."),
                    qwen1_message("assistant", QWEN1_ROUND_2)], [])
    assert encoded.input_ids == expected
    assert trained_text(tok, encoded) == (  # calls, the "Observation:" that stops them, answers; never a result
        'Thought: \nAction: get_weather\nAction Input: {"city": "北京", "days": 2, "note": "it\'s"}\nObservation:'
        "Thought: I now know the final answer.\nFinal Answer: 22 度。<|im_end|>"
        "Thought: Let me check the time.\nAction: now\nAction Input: {}\nObservation:"
        "Thought: I now know the final answer.\nFinal Answer: It is 10:00.<|im_end|>")


def test_qwen1_prompt_after_a_result_is_openai_api_text_completion():
    """openai_api.py: a conversation ending with a function result is continued as text after "\\nThought:" —
    the whole prompt encoded as one string without the last <|im_end|>."""
    conv = [{"role": "system", "content": "\nBe brief. "}, *SINGLE[:3]]
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
            f"{QWEN1_INSTRUCTION}\n\nQuestion: 北京天气？<|im_end|>\n<|im_start|>assistant\n"
            f"{QWEN1_ROUND_1.split(chr(10) + 'Thought: I now')[0]}\nThought:")
    assert chat.get("qwen1").encode_prompt(bundled_tokenizer("qwen1"), conv, tools=[WEATHER, NOW]) == \
        qwen().encode(text, allowed_special="all")


def test_qwen1_prompt_for_the_next_question_is_make_context_with_the_react_history():
    prompt = chat.get("qwen1").encode_prompt(bundled_tokenizer("qwen1"), SINGLE[:5], tools=[WEATHER, NOW])
    assert prompt == sum([qwen1_message("system", "You are a helpful assistant."),
                          qwen1_message("user", f"{QWEN1_INSTRUCTION}\n\nQuestion: 北京天气？"),
                          qwen1_message("assistant", QWEN1_ROUND_1)], []) + [151644] + q("user") + q("\n") + \
        q("Thanks.") + [151645] + q("\n") + [151644] + q("assistant") + q("\n")


def test_qwen1_refuses_parallel_calls_in_one_turn():
    with pytest.raises(ValueError, match="Qwen-1's ReAct makes one tool call per assistant turn"):
        chat.get("qwen1").encode_conversation(bundled_tokenizer("qwen1"), PARALLEL, tools=[WEATHER, NOW])


def test_qwen1_exported_chat_template_refuses_tools_and_points_to_finetune():
    with pytest.raises(Exception, match="Qwen-1 without tools.*ReAct"):
        bundled_tokenizer("qwen1").apply_chat_template(SINGLE[:1], tools=[WEATHER], tokenize=False)


@pytest.mark.parametrize("family,reason", [("llama2", "Llama-2-chat has no official tool-call format"),
                                           ("baichuan2", "Baichuan2-Chat has no official tool-call format")])
def test_families_without_a_tool_format_refuse_tools_with_the_reason(family, reason):
    tok = bundled_tokenizer(family)
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match=reason):
        chat.get(family).encode_conversation(tok, plain, tools=[WEATHER])
    with pytest.raises(ValueError, match=reason):
        chat.get(family).encode_conversation(tok, SINGLE[:4])
    with pytest.raises(Exception, match=reason):  # the exported chat template says the same
        tok.apply_chat_template(plain, tools=[WEATHER], tokenize=False)


@pytest.mark.parametrize("messages,reason", [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}], "message 2: expected role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "r"}],
     "message 3: expected role 'user', got 'tool'"),
    (SINGLE[:2] + [{"role": "user", "content": "u"}], "message 3: expected role 'tool', got 'user'"),
    ([SINGLE[0], {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": "[1]"}]}],
     r"message 2: tool_calls\[0\] needs a name and arguments as a JSON object"),
    ([{"role": "user", "content": "a", "tool_calls": [{"name": "f", "arguments": {}}]}],
     "only assistant messages make tool calls"),
])
def test_malformed_tool_conversations_raise_value_error(messages, reason):
    with pytest.raises(ValueError, match=reason):
        chat.get("qwen2_5").encode_conversation(bundled_tokenizer("qwen2_5"), messages)


def test_an_empty_tool_result_is_allowed_and_renders_as_nothing():
    conv = [*SINGLE[:2], {"role": "tool", "content": ""}, SINGLE[3]]
    encoded = chat.get("chatglm3").encode_conversation(bundled_tokenizer("chatglm3"), conv, tools=[WEATHER])
    ids, labels = ref_chatglm3_tools(conv, [WEATHER])
    assert encoded.input_ids == ids and encoded.labels == labels
