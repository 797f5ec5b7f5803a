"""Baichuan2 original checkpoints -> LlamaForCausalLM (7B, RoPE) and BaichuanAlibiForCausalLM (13B, ALiBi)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from finetune.errors import UserError
from finetune.models import registry
from finetune.models.baichuan_alibi import BaichuanAlibiConfig
from finetune.models.convert import baichuan2
from finetune.models.tiny import build_tiny
from reference_models import baichuan2_logits, greedy, republish

SHIPPED = {"tiny_baichuan2_7b": 1, "tiny_baichuan2_13b": 3}  # .bin files: 7B ships one, 13B three + index


@pytest.fixture(scope="module", params=list(SHIPPED))
def checkpoint(request, tmp_path_factory):
    """A tiny original Baichuan2 repo as published (bfloat16 .bin) and its conversion."""
    name = request.param
    config = registry.spec(name).original_config
    root = tmp_path_factory.mktemp(name)
    original = build_tiny(name, root / "original", layout="original")
    state = republish(original, baichuan2.sources(config), dtype=torch.bfloat16, fmt="bin", shards=SHIPPED[name])
    baichuan2.convert(original, root / "native", progress=False)
    model = AutoModelForCausalLM.from_pretrained(root / "native", dtype=torch.float32).eval()
    return config, original, root / "native", {k: v.float() for k, v in state.items()}, model


def test_logits_equal_the_original_architecture(checkpoint):
    config, _, _, state, model = checkpoint
    ids = torch.randint(3, 120000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, baichuan2_logits(state, config, ids)
    assert theirs.std() > 0.3
    assert (ours - theirs).abs().max() < 1e-4


def test_cached_greedy_generation_equals_recomputation(checkpoint):
    config, _, _, state, model = checkpoint
    prompt = torch.randint(3, 120000, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = greedy(lambda ids: baichuan2_logits(state, config, ids), prompt, 4)
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected[:, : cached.shape[1]])


def test_norm_head_is_normalised_in_float32_and_the_rest_keeps_bfloat16(checkpoint):
    config, _, out, state, _ = checkpoint
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


@pytest.mark.parametrize("defect, words", [
    ("missing", ["model.layers.1.self_attn.W_pack.weight", "missing"]),
    ("unexpected", ["model.layers.0.self_attn.rotary_emb.cos_cached", "unexpected"]),
    ("shape", ["model.layers.0.mlp.up_proj.weight", "[7, 64]"]),
    ("family", ["chatglm3"]),
])
def test_defective_checkpoint_stops_naming_the_problem_and_writes_nothing(tmp_path, defect, words):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(build_tiny("tiny_baichuan2_7b", tmp_path / "o", layout="original"), tmp_path / "bad")
    state = load_file(bad / "model.safetensors")
    if defect == "missing":
        del state["model.layers.1.self_attn.W_pack.weight"]
    elif defect == "unexpected":
        state["model.layers.0.self_attn.rotary_emb.cos_cached"] = torch.zeros(4)
    elif defect == "shape":
        state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    else:
        (bad / "config.json").write_text(json.dumps(registry.spec("tiny_chatglm3").original_config))
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(UserError) as err:
        baichuan2.convert(bad, tmp_path / "out", progress=False)
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
