"""ChatGLM3 original checkpoint -> GlmForCausalLM: the config mapping, sharded float16 output, content cache
(logits, generation and defects: test_convert.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from finetune.errors import UserError
from finetune.models import native, registry
from finetune.models.convert import convert_checkpoint

SPEC = registry.spec("tiny_chatglm3")
CONFIG = SPEC.original_config


@pytest.fixture(scope="module")
def checkpoint(converted):
    return converted("tiny_chatglm3")


def test_native_config_maps_groups_partial_rope_and_ids(checkpoint):
    out, model = checkpoint.native, checkpoint.model
    cfg = model.config
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps) == (2, 16, 1e-5)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5 and cfg.rope_parameters["rope_theta"] == 10000.0
    assert model.generation_config.eos_token_id == [2, 64795, 64797]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(list(SPEC.family.chat.stop_tokens)) == [2, 64795, 64797]
    assert native.native_config(registry.spec("chatglm3_6b", "32k")).rope_parameters["rope_theta"] == 500000.0


def test_output_is_sharded_float16_with_tokenizer_and_summary(checkpoint):
    out, summary = checkpoint.native, checkpoint.summary
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert summary["shards"] == len(set(index["weight_map"].values())) > 1
    assert summary["tensors_in"] == 4 + 7 * 2 and summary["tensors_out"] == 3 + 11 * 2
    assert summary["bytes"] > 0 and summary["seconds"] >= 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with safe_open(str(out / index["weight_map"]["model.layers.0.self_attn.q_proj.bias"]), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").dtype == torch.float16
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()


def test_convert_checkpoint_caches_by_content(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    first = convert_checkpoint(checkpoint.original, progress=False)
    assert first.parent == tmp_path / "converted" and first.name.startswith("chatglm3-")
    stamp = (first / "config.json").stat().st_mtime_ns
    assert convert_checkpoint(checkpoint.original, progress=False) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="already loads natively"):
        convert_checkpoint(first)
