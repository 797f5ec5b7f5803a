"""Qwen (1) original checkpoint -> Qwen2ForCausalLM: dtype, MLP width and stop tokens (logits, generation and
defects: test_convert.py)."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from finetune.models import registry

SPEC = registry.spec("tiny_qwen1")
CONFIG = SPEC.original_config


def test_config_dtype_comes_from_the_weights_and_stops_from_qwen1(converted):
    c = converted("tiny_qwen1")
    out, model, summary = c.native, c.model, c.summary
    assert "torch_dtype" not in CONFIG and summary["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.config.intermediate_size == CONFIG["intermediate_size"] // 2
    assert model.config.rope_parameters["rope_theta"] == CONFIG["rotary_emb_base"]
    assert sorted(model.generation_config.eos_token_id) == [151643, 151644, 151645]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sorted(tokenizer.convert_tokens_to_ids(list(SPEC.family.chat.stop_tokens))) == [151643, 151644, 151645]
    assert (out / "qwen.tiktoken").is_file()
