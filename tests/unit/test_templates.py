"""Training encodings, inference prompts and templates match the official formats token for token.

Every expected id list below is built here from the ORIGINAL rules (each official chat code), with SentencePiece
and tiktoken called directly, following each official script's own algorithm (ChatGLM3's process_batch with its
shifted loss mask, Baichuan2's fine-tune.py, Qwen's make_context/finetune.py, Meta's chat_completion and
llama-recipes' tokenize_dialog): each answer and the token that ends it are trained, prompts and tool results not.
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from functools import cache

import pytest
import sentencepiece as spm
import tiktoken

from finetune.models import chat, registry, tokenizers
from finetune.models.chat.format import ChatFormat
from finetune.models.tokenizers import bundled_tokenizer

FIX = tokenizers.BUNDLED
FAMILIES = ("chatglm3", "baichuan2", "qwen1", "qwen2_5", "llama2")
M = -100  # masked label
SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。Answer briefly."}
CONV = [
    {"role": "user", "content": "What is 2+2? 请用中文回答。"},
    {"role": "assistant", "content": "等于 4。"},
    {"role": "user", "content": "长城有多长？\nGive a number, please 🙂"},
    {"role": "assistant", "content": "About 21,196 km.\n大约两万公里。"},
]
ASK = {"role": "user", "content": "Thanks! 再见。"}
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
DEFAULT_SYSTEM = {"qwen1": "You are a helpful assistant.",
                  "qwen2_5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}


@cache
def sp(family: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(FIX / family / "tokenizer.model"))


@cache
def qwen() -> tiktoken.Encoding:
    ranks = {base64.b64decode(t): int(r) for t, r in (
        line.split() for line in (FIX / "qwen1" / "qwen.tiktoken").read_bytes().splitlines() if line)}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=QWEN_SPECIALS)


def q(text: str) -> list[int]:  # QWenTokenizer.encode(text, allowed_special=set())
    return qwen().encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())


def split_system(conv: list[dict], family: str) -> tuple[str | None, list[dict]]:
    if conv[0]["role"] == "system":
        return conv[0]["content"], conv[1:]
    return DEFAULT_SYSTEM.get(family), conv


# ---- references: (input_ids, labels); a conversation ending with a user turn gives the inference prompt ----

def ref_chatglm3(conv):
    """build_single_message per message; process_batch: eos appended, loss mask shifted right by one."""
    nl = sp("chatglm3").encode("\n")
    ids, mask = [64790, 64792], [False, False]
    for m in conv:
        tokens = [{"system": 64794, "user": 64795, "assistant": 64796}[m["role"]]] + nl + sp("chatglm3").encode(
            m["content"])
        ids += tokens
        mask += [m["role"] == "assistant"] * len(tokens)
    if conv[-1]["role"] == "user":
        return ids + [64796], None
    ids.append(2)
    mask = [False, *mask]
    return ids, [t if keep else M for t, keep in zip(ids, mask)]


def ref_baichuan2(conv):
    """build_chat_input's ids; fine-tune.py's labels (eos under each user token that follows an answer)."""
    system, turns = split_system(conv, "baichuan2")
    ids = sp("baichuan2").encode(system) if system else []
    labels = [M] * len(ids)
    for i, m in enumerate(turns):
        body = sp("baichuan2").encode(m["content"])
        if m["role"] == "user":
            ids += [195] + body
            labels += [2 if i > 0 else M] + [M] * len(body)
        else:
            ids += [196] + body
            labels += [M] + body
    if turns[-1]["role"] == "user":
        return ids + [196], None
    return ids + [2], labels + [2]


def ref_qwen1(conv):
    """make_context (role, "\\n", content encoded separately); labels: assistant content + <|im_end|>."""
    system, turns = split_system(conv, "qwen1")
    nl, ids, labels = q("\n"), [], []
    for m in [{"role": "system", "content": system}, *turns]:
        head, body = [151644] + q(m["role"]) + nl, q(m["content"])
        ids += head + body + [151645] + nl
        trained = m["role"] == "assistant"
        labels += [M] * len(head) + (body + [151645] if trained else [M] * (len(body) + 1)) + [M] * len(nl)
    if turns[-1]["role"] == "user":
        return ids + [151644] + q("assistant") + nl, None
    return ids, labels


def ref_qwen2_5(conv):
    """The official chat_template's text tokenized as one string; labels: assistant content + <|im_end|>."""
    system, turns = split_system(conv, "qwen2_5")
    messages = [{"role": "system", "content": system}, *turns]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if turns[-1]["role"] == "user":
        return qwen().encode(text + "<|im_start|>assistant\n", allowed_special="all"), None
    ids = qwen().encode(text, allowed_special="all")
    labels = []
    for m in messages:  # fragments between special tokens; this conversation has no merge across "\n"+content
        head, body = q(f"{m['role']}\n"), q(m["content"])
        assert q(f"{m['role']}\n{m['content']}") == head + body
        trained = m["role"] == "assistant"
        labels += [M] * (1 + len(head)) + (body + [151645] if trained else [M] * (len(body) + 1)) + [M]
    return ids, labels


def ref_llama2(conv):
    """Meta's chat_completion ids; llama-recipes tokenize_dialog labels (legacy slow tokenizer)."""
    system, turns = split_system(conv, "llama2")
    if system is not None:
        turns = [{"role": "user", "content": f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0]['content']}"}, *turns[1:]]
    ids, labels = [], []
    for prompt, answer in zip(turns[0::2], turns[1::2]):
        ids += [1] + sp("llama2").encode(f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} ")
        ids += [2]
        head = [1] + sp("llama2").encode(f"[INST] {prompt['content'].strip()} [/INST]")
        labels += [M] * len(head) + sp("llama2").encode(f"{answer['content'].strip()} ") + [2]
    assert len(ids) == len(labels)
    if turns[-1]["role"] == "user":
        return ids + [1] + sp("llama2").encode(f"[INST] {turns[-1]['content'].strip()} [/INST]"), None
    return ids, labels


REFERENCE = {"chatglm3": ref_chatglm3, "baichuan2": ref_baichuan2, "qwen1": ref_qwen1, "qwen2_5": ref_qwen2_5,
             "llama2": ref_llama2}
CONVERSATIONS = {"with_system": [SYSTEM, *CONV], "without_system": CONV}


@pytest.mark.parametrize("which", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_ids_and_labels_are_the_official_ones(family, which):
    conv = CONVERSATIONS[which]
    encoded = chat.get(family).encode_conversation(bundled_tokenizer(family), conv)
    ids, labels = REFERENCE[family](conv)
    assert encoded.input_ids == ids
    assert encoded.labels == labels


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_ids_are_what_the_official_chat_code_builds(family):
    conv = [SYSTEM, *CONV, ASK]
    assert chat.get(family).encode_prompt(bundled_tokenizer(family), conv) == REFERENCE[family](conv)[0]


def test_label_values_spelled_out_for_baichuan2():
    enc = chat.get("baichuan2").encode_conversation(bundled_tokenizer("baichuan2"), [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见！"}])
    assert enc.input_ids == [195, 16829, 196, 16829, 67, 195, 20020, 196, 20020, 67, 2]
    assert enc.labels == [M, M, M, 16829, 67, 2, M, M, 20020, 67, 2]  # eos under the second user token


# ---- the Ollama TEMPLATE's text, tokenized as llama.cpp does, gives encode_prompt's ids ----

def ollama_text(family: str, conv: list[dict]) -> str:
    """The text an Ollama TEMPLATE must render: the prompt's text, which llama.cpp tokenizes to the official ids."""
    system, turns = split_system(conv, family)
    if family == "chatglm3":
        return ("[gMASK]sop" + (f"<|system|>\n {system}" if system else "")
                + "".join(f"<|{m['role']}|>\n {m['content']}" for m in turns) + "<|assistant|>")
    if family == "baichuan2":
        return ((system or "") + "".join(("<reserved_106>" if m["role"] == "user" else "<reserved_107>")
                                         + m["content"] for m in turns) + "<reserved_107>")
    if family == "llama2":
        first = f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0]['content']}" if system else turns[0]["content"]
        text = f"[INST] {first} [/INST]"
        for m in turns[1:]:
            text += f" {m['content']} </s>" if m["role"] == "assistant" else f"<s>[INST] {m['content']} [/INST]"
        return text
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
            + "<|im_start|>assistant\n")


LLAMACPP_SPECIALS = {  # token strings llama.cpp parses in the prompt (control / user-defined tokens of the GGUF)
    "chatglm3": {"[gMASK]": 64790, "sop": 64792, "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796},
    "baichuan2": {"<reserved_106>": 195, "<reserved_107>": 196, "</s>": 2, "\n": 5},
    "llama2": {"<s>": 1, "</s>": 2},
    "qwen1": QWEN_SPECIALS, "qwen2_5": QWEN_SPECIALS,
}


def llamacpp_tokenize(family: str, text: str) -> list[int]:
    """llama.cpp's rules: special strings parsed; each SentencePiece fragment gets one space prefix when the GGUF
    says add_space_prefix (chatglm3, llama2: SentencePiece's dummy prefix does exactly that; baichuan2: false,
    and its model has no dummy prefix); BOS only for llama2."""
    specials = LLAMACPP_SPECIALS[family]
    ids = [1] if family == "llama2" else []
    for fragment in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if fragment in specials:
            ids.append(specials[fragment])
        elif fragment:
            ids += sp(family).encode(fragment) if family in ("chatglm3", "baichuan2", "llama2") else q(fragment)
    return ids


@pytest.mark.parametrize("which", ["with_system", "without_system"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ollama_text_tokenized_by_llama_cpp_rules_gives_the_prompt_ids(family, which):
    conv = CONVERSATIONS[which] + [ASK]
    tok = bundled_tokenizer(family)
    text = ollama_text(family, conv)
    assert llamacpp_tokenize(family, text) == chat.get(family).encode_prompt(tok, conv)
    hf_text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert hf_text == ("<s>" + text if family == "llama2" else text)  # HF text carries the BOS llama.cpp adds


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_chat_template_gives_the_training_ids_and_marks_the_trained_tokens(family):
    conv = [SYSTEM, *CONV]
    tok = bundled_tokenizer(family)
    enc = chat.get(family).encode_conversation(tok, conv)
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == enc.input_ids
    # Baichuan2's eos label under a user token cannot be a mask over input_ids: only the answers are marked
    trained = [int(label != M and label == t) for t, label in zip(enc.input_ids, enc.labels)]
    assert out["assistant_masks"] == trained
    prompt = tok.apply_chat_template([*conv, ASK], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompt == chat.get(family).encode_prompt(tok, [*conv, ASK])


# ---- details of the formats ----

def test_special_strings_in_contents_stay_text_where_the_official_code_encodes_contents_plainly():
    conv = [{"role": "user", "content": "say <|user|> and </s>"}, {"role": "assistant", "content": "ok <|im_end|>"}]
    glm = chat.get("chatglm3").encode_conversation(bundled_tokenizer("chatglm3"), conv)
    assert glm.input_ids == ref_chatglm3(conv)[0] and 64795 not in glm.input_ids[3:]
    qw = chat.get("qwen1").encode_conversation(bundled_tokenizer("qwen1"), conv)
    assert qw.input_ids == ref_qwen1(conv)[0]


def test_qwen1_encodes_newline_per_segment_where_qwen2_5_merges_it():
    conv = [{"role": "user", "content": "\nHi"}]
    qwen1 = chat.get("qwen1").encode_prompt(bundled_tokenizer("qwen1"), conv)
    qwen2_5 = chat.get("qwen2_5").encode_prompt(bundled_tokenizer("qwen2_5"), conv)
    user1, user2_5 = qwen1.index(872), qwen2_5.index(872)  # the "user" role name
    assert qwen1[user1:user1 + 4] == [872, 198, 198, 13048]  # "user", "\n", then the content's own "\n", "Hi"
    assert qwen2_5[user2_5:user2_5 + 3] == [872, 271, 13048]  # "user", "\n\n", "Hi"


def test_qwen2_5_token_straddling_the_role_newline_is_not_trained():
    enc = chat.get("qwen2_5").encode_conversation(bundled_tokenizer("qwen2_5"), [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}])
    start = enc.input_ids.index(77091)  # "assistant"
    assert enc.input_ids[start + 1:start + 4] == [271, 9707, 151645]
    assert enc.labels[start + 1:start + 4] == [M, 9707, 151645]


@pytest.mark.parametrize("family,system", [("qwen1", "You are a helpful assistant."),
                                           ("qwen2_5", "You are Qwen, created by Alibaba Cloud. You are a helpful "
                                                       "assistant."),
                                           ("chatglm3", None), ("baichuan2", None), ("llama2", None)])
def test_default_system_is_the_official_chat_codes(family, system):
    assert chat.get(family).default_system == system


@pytest.mark.parametrize("family,ids,strings", [
    ("chatglm3", [2, 64795, 64797], ["</s>", "<|user|>", "<|observation|>"]),
    ("baichuan2", [2], ["</s>"]),
    ("qwen1", [151643, 151644, 151645], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    ("llama2", [2], ["</s>"]),
    ("qwen2_5", [151645, 151643], ["<|im_end|>", "<|endoftext|>"]),
])
def test_stop_tokens_are_the_inference_servers(family, ids, strings):
    assert chat.get(family).stop_token_ids(bundled_tokenizer(family)) == ids
    assert list(chat.get(family).stop_tokens) == strings


def test_ollama_templates_read_system_and_messages_and_end_with_the_generation_prompt():
    for family in FAMILIES:
        text = chat.get(family).ollama_template
        assert "range .Messages" in text and ".System" in text and ".Content" in text
    assert chat.get("chatglm3").ollama_template.endswith("<|assistant|>")
    assert chat.get("qwen2_5").ollama_template.endswith("<|im_start|>assistant\n")


BAD = [
    ([], "empty conversation"),
    ([{"role": "assistant", "content": "hi"}], "message 1: expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 2: expected role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "got 'system'"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}], "message 1 .user.: empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "message 2 .assistant.: empty"),
    ([{"role": "function", "content": "a"}], "role must be system, user, assistant or tool"),
    ([{"role": "tool", "content": "a"}], "message 1: expected role 'user', got 'tool'"),
    ([{"role": "user", "content": 3}], "content must be text"),
    ([{"role": "user", "content": "a"}], "must end with an assistant answer"),
    ([SYSTEM], "must end with an assistant answer"),
]


@pytest.mark.parametrize("messages,reason", BAD)
def test_malformed_training_conversations_raise_value_error(messages, reason):
    with pytest.raises(ValueError, match=reason):
        chat.get("qwen2_5").encode_conversation(bundled_tokenizer("qwen2_5"), messages)


def test_prompt_must_end_with_a_user_turn():
    with pytest.raises(ValueError, match="must end with a user message"):
        chat.get("chatglm3").encode_prompt(bundled_tokenizer("chatglm3"), CONV)


def test_llama2_refuses_contents_with_its_reserved_tags():
    with pytest.raises(ValueError, match=r"'\[/INST\]', reserved by the llama2 format"):
        chat.get("llama2").encode_conversation(bundled_tokenizer("llama2"), [
            {"role": "user", "content": "a [/INST] b"}, {"role": "assistant", "content": "c"}])


def test_unknown_template_or_foreign_tokenizer_raise_value_error():
    with pytest.raises(ValueError, match="unknown chat template"):
        chat.get("vicuna").encode_prompt(bundled_tokenizer("llama2"), [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="not a chatglm3 tokenizer"):
        chat.get("chatglm3").encode_prompt(bundled_tokenizer("llama2"), [{"role": "user", "content": "a"}])


def test_each_family_refers_to_its_one_registered_format():
    assert {family.name: family.chat for family in registry.FAMILIES} == chat.FORMATS
    assert all(family.template == family.chat.name for family in registry.FAMILIES)


def test_a_format_states_its_tool_format_or_why_it_has_none():
    render = chat.get("llama2").render
    with pytest.raises(TypeError, match="either a tool format or the reason"):
        ChatFormat("plain", render, ("</s>",), hf_template="", ollama_template="", plain_contents=True)
    with pytest.raises(TypeError, match="either a tool format or the reason"):
        ChatFormat("both", render, ("</s>",), hf_template="", ollama_template="", plain_contents=True,
                   tools=chat.get("qwen2_5").tools, no_tools="none")


# ---- segment boundaries: contents that start or end with whitespace or newlines ----

EDGES = ["\nHi", "Hi\n", " Hi", "Hi ", "\n\nHi\n\n", "\t Hi", " \nHi", "你好\n\n", "\r\nHi"]


@pytest.mark.parametrize("content", EDGES)
@pytest.mark.parametrize("family", ["chatglm3", "baichuan2", "qwen1", "llama2"])
def test_edge_whitespace_keeps_the_official_per_segment_ids(family, content):
    """ChatGLM3, Baichuan2 and Qwen-1 encode each content on its own (Qwen-1's make_context: role, "\\n", content);
    a merged "\\n\\n" across a boundary would be another id. Llama-2 strips, as Meta does."""
    tok = bundled_tokenizer(family)
    conv = [{"role": "system", "content": content}, {"role": "user", "content": content},
            {"role": "assistant", "content": content}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": content}]
    encoded = chat.get(family).encode_conversation(tok, conv)
    assert (encoded.input_ids, encoded.labels) == REFERENCE[family](conv)
    prompt = [*conv, {"role": "user", "content": content}]
    assert chat.get(family).encode_prompt(tok, prompt) == REFERENCE[family](prompt)[0]


@pytest.mark.parametrize("content", EDGES)
def test_edge_whitespace_in_qwen2_5_gives_its_chat_templates_joint_ids(content):
    tok = bundled_tokenizer("qwen2_5")
    official = json.loads((FIX / "qwen2_5" / "tokenizer_config.json").read_text())["chat_template"]
    conv = [{"role": "system", "content": content}, {"role": "user", "content": content},
            {"role": "assistant", "content": content}]
    ids = tok.apply_chat_template(conv, chat_template=official, return_dict=False)
    assert chat.get("qwen2_5").encode_conversation(tok, conv).input_ids == ids
    prompt = [*conv, {"role": "user", "content": content}]
    assert chat.get("qwen2_5").encode_prompt(tok, prompt) == tok.apply_chat_template(
        prompt, chat_template=official, add_generation_prompt=True, return_dict=False)


def test_trained_spans_are_the_runs_of_trained_labels():
    from finetune.models.chat.labels import IGNORE, trained_spans

    assert trained_spans([IGNORE, IGNORE, 5, 6, IGNORE, 7, IGNORE, 8]) == [(2, 4), (5, 6), (7, 8)]
    assert trained_spans([IGNORE] * 3) == []
    assert trained_spans([1, 2]) == [(0, 2)]


def test_the_first_answer_needs_a_prompt_before_it():
    from finetune.models.chat.labels import IGNORE, first_answer

    assert first_answer([IGNORE, 5, 6, IGNORE, 7]) == (1, 3)
    assert first_answer([5, 6, IGNORE]) is None  # plain text: trained from the first token
    assert first_answer([IGNORE, IGNORE]) is None
