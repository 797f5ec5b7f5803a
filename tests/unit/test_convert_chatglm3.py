"""ChatGLM3 original checkpoint -> GlmForCausalLM: same logits as the original architecture, same generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.errors import UserError
from finetune.models import native, registry
from finetune.models.convert import chatglm3, common, convert_checkpoint
from finetune.models.tiny import build_tiny
from reference_models import chatglm3_logits, greedy, republish

SPEC = registry.spec("tiny_chatglm3")
CONFIG = SPEC.original_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny original ChatGLM3 repo as published (float16 .bin shards + index) and its conversion (3 shards)."""
    root = tmp_path_factory.mktemp("chatglm3")
    original = build_tiny("tiny_chatglm3", root / "original", layout="original")
    state = republish(original, chatglm3.sources(CONFIG), dtype=torch.float16, fmt="bin", shards=2)
    summary = common.convert(chatglm3, original, root / "native", progress=False, shard_bytes=4 * 2**20)
    model = AutoModelForCausalLM.from_pretrained(root / "native", dtype=torch.float32).eval()
    return original, root / "native", {k: v.float() for k, v in state.items()}, model, summary


def reference(state, ids):
    return chatglm3_logits(state, CONFIG, ids)


def test_logits_equal_the_original_architecture(checkpoint):
    _, _, state, model, _ = checkpoint
    ids = torch.randint(3, 60000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(state, ids)
    assert theirs.std() > 0.3  # attention far from uniform: a wrong RoPE or MQA split would show
    assert (ours - theirs).abs().max() < 1e-4


def test_cached_greedy_generation_equals_recomputation(checkpoint):
    _, _, state, model, _ = checkpoint
    prompt = torch.randint(3, 60000, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = greedy(lambda ids: reference(state, ids), prompt, 4)
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected[:, : cached.shape[1]])  # generate stops early on a stop id


def test_native_config_maps_groups_partial_rope_and_ids(checkpoint):
    _, out, _, model, _ = checkpoint
    cfg = model.config
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps) == (2, 16, 1e-5)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5 and cfg.rope_parameters["rope_theta"] == 10000.0
    assert model.generation_config.eos_token_id == [2, 64795, 64797]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(list(SPEC.family.stop_tokens)) == [2, 64795, 64797]
    assert native.native_config(registry.spec("chatglm3_6b", "32k")).rope_parameters["rope_theta"] == 500000.0


def test_output_is_sharded_float16_with_tokenizer_and_summary(checkpoint):
    _, out, _, _, summary = checkpoint
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert summary["shards"] == len(set(index["weight_map"].values())) > 1
    assert summary["tensors_in"] == 4 + 7 * 2 and summary["tensors_out"] == 3 + 11 * 2
    assert summary["bytes"] > 0 and summary["seconds"] >= 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with safe_open(str(out / index["weight_map"]["model.layers.0.self_attn.q_proj.bias"]), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").dtype == torch.float16
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()


def _broken(original, tmp_path, edit):
    """A copy of the original checkpoint with one defect, as a single safetensors file."""
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(original, bad, ignore=shutil.ignore_patterns("pytorch_model*"))
    state = {}
    for shard in sorted(original.glob("pytorch_model-*.bin")):
        state |= torch.load(shard, weights_only=True)
    save_file(edit(state), str(bad / "model.safetensors"))
    return bad


@pytest.mark.parametrize("edit, words", [
    (lambda s: {k: v for k, v in s.items() if k != "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"},
     ["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight", "missing"]),
    (lambda s: {**s, "transformer.encoder.layers.2.input_layernorm.weight": torch.ones(64)},
     ["transformer.encoder.layers.2.input_layernorm.weight", "unexpected"]),
    (lambda s: {**s, "transformer.output_layer.weight": torch.zeros(65024, 32)},
     ["transformer.output_layer.weight", "[65024, 32]", "[65024, 64]"]),
])
def test_defective_checkpoint_stops_naming_the_tensor_and_writes_nothing(checkpoint, tmp_path, edit, words):
    bad = _broken(checkpoint[0], tmp_path, edit)
    with pytest.raises(UserError) as err:
        chatglm3.convert(bad, tmp_path / "out", progress=False)
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_config_of_another_family_is_refused(checkpoint, tmp_path):
    bad = _broken(checkpoint[0], tmp_path, lambda s: s)
    (bad / "config.json").write_text(json.dumps(registry.spec("tiny_qwen1").original_config))
    with pytest.raises(UserError, match="qwen1"):
        chatglm3.convert(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_convert_checkpoint_caches_by_content(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    first = convert_checkpoint(checkpoint[0], progress=False)
    assert first.parent == tmp_path / "converted" and first.name.startswith("chatglm3-")
    stamp = (first / "config.json").stat().st_mtime_ns
    assert convert_checkpoint(checkpoint[0], progress=False) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="already loads natively"):
        convert_checkpoint(first)
