"""Tiny random checkpoints: every registry architecture, in the original and the native layout, cached once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.errors import UserError
from finetune.models import native, registry
from finetune.models.tiny import build_tiny, cached_tiny

TINY = [name for name, (_, model) in registry.models().items() if model.tiny]
CONVERTED = [name for name in TINY if registry.spec(name).family.converter]


def test_every_architecture_has_a_tiny_model():
    assert {registry.spec(name).native_class for name in TINY} == {
        registry.spec(name).native_class for name in registry.models()}


@pytest.mark.parametrize("name", TINY)
def test_native_layout_loads_with_its_class_real_tokenizer_and_stop_ids(name):
    spec, path = registry.spec(name), cached_tiny(name)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == spec.native_class and not (path / "modeling_chatglm.py").exists()
    assert len(tokenizer) <= model.config.vocab_size
    stops = tokenizer.convert_tokens_to_ids(list(spec.family.chat.stop_tokens))
    eos = model.generation_config.eos_token_id
    assert sorted([eos] if isinstance(eos, int) else eos) == sorted(stops)
    ids = tokenizer("你好, hello", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.abs().max() < 10


@pytest.mark.parametrize("name", CONVERTED)
def test_original_layout_is_what_the_hub_ships(name):
    spec, path = registry.spec(name), cached_tiny(name, "original")
    assert json.loads((path / "config.json").read_text()) == spec.original_config
    state = load_file(path / "model.safetensors")
    sources = native.converter(spec.family.converter).sources(spec.original_config)
    assert set(state) == {k for k, s in sources.items() if s.init is not None}
    assert all(tuple(state[k].shape) == sources[k].shape for k in state)
    shipped = {"chatglm3": "tokenizer.model", "baichuan2": "tokenizer.model", "qwen1": "qwen.tiktoken"}
    assert (path / shipped[spec.family.name]).is_file() and not (path / "tokenizer.json").exists()


@pytest.mark.parametrize("name", ["tiny_chatglm3", "tiny_qwen1"])
def test_weights_are_numerically_sane(name):
    spec = registry.spec(name)
    state = load_file(cached_tiny(name, "original") / "model.safetensors")
    sources = native.converter(spec.family.converter).sources(spec.original_config)
    for key, tensor in state.items():
        if sources[key].init == "ones":
            assert torch.equal(tensor, torch.ones_like(tensor)), key
        elif sources[key].init == "normal" and tensor.numel() > 1000:
            assert abs(tensor.std().item() - 0.02) < 0.002, key


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = load_file(build_tiny("tiny_qwen1", tmp_path / "a", layout="original") / "model.safetensors")
    b = load_file(build_tiny("tiny_qwen1", tmp_path / "b", layout="original") / "model.safetensors")
    c = load_file(build_tiny("tiny_qwen1", tmp_path / "c", layout="original", seed=1) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_cached_tiny_builds_once_and_leaves_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    first = cached_tiny("tiny_baichuan2_13b", "original")
    assert first.parent == tmp_path / "tiny" and first.name.startswith("tiny_baichuan2_13b-original-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_tiny("tiny_baichuan2_13b", "original") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [first.name]


@pytest.mark.parametrize("name, layout, words", [
    ("tiny_qwen2_5", "original", "only the 'native' layout"),
    ("qwen2_5_7b", "native", "not a tiny model"),
    ("tiny_llama2", "orignal", "did you mean: original"),
])
def test_impossible_requests_are_user_errors(name, layout, words, tmp_path):
    with pytest.raises(UserError, match=words):
        build_tiny(name, tmp_path / "x", layout=layout)
    assert not (tmp_path / "x").exists()
