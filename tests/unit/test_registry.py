"""The registry is the single source of model facts: every family and model must carry all of them."""

import json

import pytest

from finetune import shipped
from finetune.errors import UserError
from finetune.models import registry

SEED_MODELS = {"chatglm3_6b", "baichuan2_7b", "baichuan2_13b", "qwen1_7b", "qwen2_5_7b", "llama2_7b", "llama2_13b"}


def test_every_seed_model_and_a_tiny_one_per_family():
    assert SEED_MODELS <= set(registry.models())
    for fam in registry.FAMILIES:
        assert any(m.tiny for m in fam.models), fam.name
        assert any(not m.tiny for m in fam.models), fam.name


@pytest.mark.parametrize("fam", registry.FAMILIES, ids=lambda f: f.name)
def test_family_has_every_fact(fam):
    for field in ("display", "native_class", "template", "license", "commercial_use", "strengths"):
        assert getattr(fam, field), field
    assert fam.lora_targets and fam.chat.stop_tokens and fam.languages


@pytest.mark.parametrize("name", sorted(registry.models()))
def test_model_has_config_ids_and_context(name):
    spec = registry.spec(name)
    assert spec.original_config  # shipped config.json parses
    assert spec.context_length >= 2048
    if not spec.model.tiny:
        for variant in spec.model.variants:
            assert "/" in variant.hf_id and variant.modelscope_id and "/" in variant.modelscope_id


def test_shipped_configs_are_valid_json():
    for path in shipped.MODEL_CONFIGS.glob("*.json"):
        json.loads(path.read_text())


def test_hub_ids_resolve_back_to_their_entry():
    spec = registry.spec_for_hub_id("zhipuai/chatglm3-6b")
    assert spec is not None and spec.name == "chatglm3_6b"
    assert registry.spec_for_hub_id("meta-llama/Llama-2-13b-chat-hf").name == "llama2_13b"


def test_chinese_llama_variant_has_enlarged_vocab():
    assert registry.spec("llama2_7b", "zh").original_config["vocab_size"] == 55296


def test_unknown_names_suggest_the_closest():
    with pytest.raises(UserError, match="did you mean: chatglm3_6b"):
        registry.spec("chatglm3-6b")
