"""Baichuan2 original checkpoints -> LlamaForCausalLM (7B, RoPE) and BaichuanAlibiForCausalLM (13B, ALiBi): NormHead,
the RoPE/ALiBi choice, Baichuan-1 refused (logits, generation and defects: test_convert.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig

from finetune.errors import UserError
from finetune.models import registry
from finetune.models.baichuan_alibi import BaichuanAlibiConfig
from finetune.models.convert import baichuan2

@pytest.fixture(scope="module", params=["tiny_baichuan2_7b", "tiny_baichuan2_13b"])
def checkpoint(request, converted):
    return converted(request.param)


def test_norm_head_is_normalised_in_float32_and_the_rest_keeps_bfloat16(checkpoint):
    config, out, state = checkpoint.config, checkpoint.native, checkpoint.state
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        head = f.get_tensor("lm_head.weight")
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert head.dtype == torch.float32
    assert torch.allclose(head.norm(dim=1), torch.ones(config["vocab_size"]), atol=1e-5)
    assert torch.equal(head, torch.nn.functional.normalize(state["lm_head.weight"]))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_rope_or_alibi_is_told_by_max_position_embeddings_not_size():
    small = registry.spec("tiny_baichuan2_7b").original_config
    large = registry.spec("tiny_baichuan2_13b").original_config
    assert type(baichuan2.native_config(small)) is LlamaConfig
    assert type(baichuan2.native_config(large)) is BaichuanAlibiConfig
    as_13b = {k: v for k, v in small.items() if k != "max_position_embeddings"}
    assert type(baichuan2.native_config(as_13b)) is BaichuanAlibiConfig
    assert type(baichuan2.native_config({**large, "max_position_embeddings": 4096})) is LlamaConfig
    assert baichuan2.native_config(registry.spec("baichuan2_13b").original_config).max_position_embeddings == 4096


def test_baichuan_1_vocabulary_is_refused():
    with pytest.raises(UserError, match="Baichuan \\(1\\)"):
        baichuan2.native_config({**registry.spec("baichuan2_13b").original_config, "vocab_size": 64000})
