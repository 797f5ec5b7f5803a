"""Every converter, one harness: the native checkpoint computes the original architecture's logits, generates the
same tokens with and without a KV cache, and a defective original stops with the problem named, writing nothing.
Family-specific facts (config mapping, dtypes, sharding, NormHead, ALiBi) are in test_convert_<family>.py."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import UserError
from finetune.models import registry
from published import PUBLISHED, with_defect
from reference_models import greedy


@pytest.mark.parametrize("name", PUBLISHED)
def test_logits_equal_the_original_architecture(converted, name):
    c = converted(name)
    ids = torch.randint(3, 60000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = c.model(ids).logits, c.reference(ids)
    assert theirs.std() > 0.3  # attention far from uniform: a wrong RoPE, MQA split or w1/w2 swap would show
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("name", PUBLISHED)
def test_cached_greedy_generation_equals_recomputation(converted, name):
    c = converted(name)
    prompt = torch.randint(3, 60000, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = greedy(c.reference, prompt, 4)
        cached = c.model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = c.model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected[:, : cached.shape[1]])  # generate stops early on a stop id


def _drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _add(key, tensor):
    return lambda state: {**state, key: tensor}


DEFECTS = [  # (model, edit of the weights, another family's config or None, words the message must hold)
    ("tiny_chatglm3", _drop("transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"), None,
     ["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight", "missing"]),
    ("tiny_chatglm3", _add("transformer.encoder.layers.2.input_layernorm.weight", torch.ones(64)), None,
     ["transformer.encoder.layers.2.input_layernorm.weight", "unexpected"]),
    ("tiny_chatglm3", _add("transformer.output_layer.weight", torch.zeros(65024, 32)), None,
     ["transformer.output_layer.weight", "[65024, 32]", "[65024, 64]"]),
    ("tiny_chatglm3", lambda s: s, "tiny_qwen1", ["qwen1"]),
    ("tiny_baichuan2_7b", _drop("model.layers.1.self_attn.W_pack.weight"), None,
     ["model.layers.1.self_attn.W_pack.weight", "missing"]),
    ("tiny_baichuan2_7b", _add("model.layers.0.self_attn.rotary_emb.cos_cached", torch.zeros(4)), None,
     ["model.layers.0.self_attn.rotary_emb.cos_cached", "unexpected"]),
    ("tiny_baichuan2_7b", _add("model.layers.0.mlp.up_proj.weight", torch.zeros(7, 64)), None,
     ["model.layers.0.mlp.up_proj.weight", "[7, 64]"]),
    ("tiny_baichuan2_7b", lambda s: s, "tiny_chatglm3", ["chatglm3"]),
    ("tiny_qwen1", _drop("transformer.h.0.attn.c_attn.bias"), None, ["transformer.h.0.attn.c_attn.bias", "missing"]),
    ("tiny_qwen1", _add("transformer.h.0.mlp.w3.weight", torch.zeros(4)), None,
     ["transformer.h.0.mlp.w3.weight", "unexpected"]),
    # intermediate_size taken as the per-branch width: the classic Qwen-1 mistake
    ("tiny_qwen1", _add("transformer.h.1.mlp.w1.weight", torch.zeros(256, 64)), None,
     ["transformer.h.1.mlp.w1.weight", "[256, 64]", "[128, 64]"]),
    ("tiny_qwen1", lambda s: s, "tiny_baichuan2_13b", ["baichuan2"]),
]


@pytest.mark.parametrize("name, edit, other_family, words", DEFECTS)
def test_defective_checkpoint_stops_naming_the_problem_and_writes_nothing(converted, tmp_path, name, edit,
                                                                          other_family, words):
    config = registry.spec(other_family).original_config if other_family else None
    bad = with_defect(converted(name).original, tmp_path / "bad", edit, config)
    with pytest.raises(UserError) as err:
        PUBLISHED[name].converter.convert(bad, tmp_path / "out", progress=False)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
