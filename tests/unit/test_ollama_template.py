"""The Modelfile says everything Ollama needs, and its TEMPLATE, rendered by Go's own text/template (the engine
Ollama runs), gives the same text as the tokenizer's chat template used for training and vLLM, and — tokenized by
llama.cpp's rules (test_templates.llamacpp_tokenize) — the prompt ids of training, also where contents start or
end with whitespace, except the two differences finetune.models.chat.format documents.

The token-level check through a real exported GGUF in llama.cpp is in tests/e2e/test_export.py; this file needs
no model.
"""

from __future__ import annotations


import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from test_templates import EDGES, llamacpp_tokenize

from finetune.export import ollama
from finetune.models import chat
from finetune.models.tokenizers import bundled_tokenizer

FAMILIES = ("chatglm3", "baichuan2", "qwen1", "qwen2_5", "llama2")
DIFFERS = {  # where a text template cannot give the original's ids (finetune.models.chat.format's docstring, README)
    "qwen1": lambda c: "\n" in c[:len(c) - len(c.lstrip())],  # leading whitespace holding a line break merges
    "llama2": lambda c: c != c.strip(),  # Meta strips each content; a Go template cannot
}


def _jinja(template: str, messages: list[dict]) -> str:
    env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    source = chat.get(template).hf_template.replace("{%- generation -%}", "").replace(
        "{%- endgeneration -%}", "")
    return env.from_string(source).render(messages=messages, add_generation_prompt=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_go_rendered_template_equals_the_training_chat_template(go_render, multi_turn_chat, family):
    rendered = go_render(chat.get(family).ollama_template, multi_turn_chat)
    expected = _jinja(family, multi_turn_chat)
    if family == "llama2":  # llama.cpp adds the first <s> itself (add_bos_token); the HF text carries it
        expected = expected.removeprefix("<s>")
    assert rendered == expected


@pytest.mark.parametrize("family", ("qwen1", "qwen2_5"))
def test_family_default_system_is_rendered_when_the_conversation_has_none(go_render, multi_turn_chat, family):
    rendered = go_render(chat.get(family).ollama_template, multi_turn_chat[1:])
    assert rendered.startswith(f"<|im_start|>system\n{chat.get(family).default_system}<|im_end|>\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_modelfile_states_template_every_stop_context_and_system(family):
    text = ollama.modelfile(family, "./model-q4_k_m.gguf", num_ctx=3072, system="Be brief.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./model-q4_k_m.gguf"
    assert f'TEMPLATE """{chat.get(family).ollama_template}"""' in text
    assert 'SYSTEM """Be brief."""' in text
    stops = [line.split(" ", 2)[2] for line in lines if line.startswith("PARAMETER stop ")]
    assert stops == [f'"{s}"' for s in chat.get(family).stop_tokens]
    assert "PARAMETER num_ctx 3072" in lines


def test_modelfile_uses_the_family_default_system_and_omits_none():
    assert f'SYSTEM """{chat.get("qwen2_5").default_system}"""' in ollama.modelfile("qwen2_5", "./m.gguf",
                                                                                   num_ctx=512)
    assert "SYSTEM" not in ollama.modelfile("llama2", "./m.gguf", num_ctx=512)


def test_adapter_modelfile_names_base_and_adapter():
    text = ollama.modelfile("llama2", "./base-q4_k_m.gguf", num_ctx=512, adapter="./adapter-f16.gguf")
    assert text.splitlines()[:2] == ["FROM ./base-q4_k_m.gguf", "ADAPTER ./adapter-f16.gguf"]


def test_model_name_is_a_valid_ollama_name():
    assert ollama.model_name("Qwen7B_QLoRA-20261123-101500") == "qwen7b_qlora-20261123-101500"
    assert ollama.model_name("运行 1") == "1"


@pytest.mark.parametrize("family", FAMILIES)
def test_go_rendered_template_gives_the_prompt_ids_at_segment_edges_except_where_documented(go_render, family):
    tok = bundled_tokenizer(family)
    for content in [c for c in EDGES if "\r" not in c]:  # go_render reads text with universal newlines
        conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content},
                {"role": "assistant", "content": content}, {"role": "user", "content": content}]
        ids = llamacpp_tokenize(family, go_render(chat.get(family).ollama_template, conv))
        differs = DIFFERS.get(family, lambda c: False)(content)
        assert (ids != chat.get(family).encode_prompt(tok, conv)) == differs, (family, content)
