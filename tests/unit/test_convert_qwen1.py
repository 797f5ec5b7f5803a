"""Qwen (1) original checkpoint -> Qwen2ForCausalLM: same logits as the original architecture, same generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.errors import UserError
from finetune.models import registry
from finetune.models.convert import qwen1
from finetune.models.tiny import build_tiny
from reference_models import greedy, qwen1_logits, republish

SPEC = registry.spec("tiny_qwen1")
CONFIG = SPEC.original_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny original Qwen-7B repo as published (bfloat16 safetensors shards + index, no dtype in config.json)."""
    root = tmp_path_factory.mktemp("qwen1")
    original = build_tiny("tiny_qwen1", root / "original", layout="original")
    state = republish(original, qwen1.sources(CONFIG), dtype=torch.bfloat16, fmt="safetensors", shards=2)
    summary = qwen1.convert(original, root / "native", progress=False)
    model = AutoModelForCausalLM.from_pretrained(root / "native", dtype=torch.float32).eval()
    return original, root / "native", {k: v.float() for k, v in state.items()}, model, summary


def test_logits_equal_the_original_architecture(checkpoint):
    _, _, state, model, _ = checkpoint
    ids = torch.randint(3, 150000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, qwen1_logits(state, CONFIG, ids)
    assert theirs.std() > 0.3  # a w1/w2 swap or a lost c_attn bias would show
    assert (ours - theirs).abs().max() < 1e-4


def test_cached_greedy_generation_equals_recomputation(checkpoint):
    _, _, state, model, _ = checkpoint
    prompt = torch.randint(3, 150000, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = greedy(lambda ids: qwen1_logits(state, CONFIG, ids), prompt, 4)
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected[:, : cached.shape[1]])


def test_config_dtype_comes_from_the_weights_and_stops_from_qwen1(checkpoint):
    _, out, _, model, summary = checkpoint
    assert "torch_dtype" not in CONFIG and summary["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.config.intermediate_size == CONFIG["intermediate_size"] // 2
    assert model.config.rope_parameters["rope_theta"] == CONFIG["rotary_emb_base"]
    assert sorted(model.generation_config.eos_token_id) == [151643, 151644, 151645]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sorted(tokenizer.convert_tokens_to_ids(list(SPEC.family.stop_tokens))) == [151643, 151644, 151645]
    assert (out / "qwen.tiktoken").is_file()


@pytest.mark.parametrize("defect, words", [
    ("missing", ["transformer.h.0.attn.c_attn.bias", "missing"]),
    ("unexpected", ["transformer.h.0.mlp.w3.weight", "unexpected"]),
    ("shape", ["transformer.h.1.mlp.w1.weight", "[256, 64]", "[128, 64]"]),
    ("family", ["baichuan2"]),
])
def test_defective_checkpoint_stops_naming_the_problem_and_writes_nothing(tmp_path, defect, words):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(build_tiny("tiny_qwen1", tmp_path / "o", layout="original"), tmp_path / "bad")
    state = load_file(bad / "model.safetensors")
    if defect == "missing":
        del state["transformer.h.0.attn.c_attn.bias"]
    elif defect == "unexpected":
        state["transformer.h.0.mlp.w3.weight"] = torch.zeros(4)
    elif defect == "shape":  # intermediate_size taken as the per-branch width: the classic Qwen-1 mistake
        state["transformer.h.1.mlp.w1.weight"] = torch.zeros(256, 64)
    else:
        (bad / "config.json").write_text(json.dumps(registry.spec("tiny_baichuan2_13b").original_config))
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(UserError) as err:
        qwen1.convert(bad, tmp_path / "out", progress=False)
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
