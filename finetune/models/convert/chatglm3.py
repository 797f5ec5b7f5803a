"""ChatGLM3-6B (remote code "chatglm") -> transformers `GlmForCausalLM`: same math, no remote code.

Facts checked numerically against THUDM's modeling_chatglm.py (tests/unit/reference_models.py re-implements its
forward pass; test_convert.py compares logits): `query_key_value` rows are
[q: heads*kv_channels | k: groups*kv_channels | v: groups*kv_channels], its bias splits the same way; `dense_h_to_4h`
is already [gate; up]; RoPE covers the first kv_channels/2 dims of each head in interleaved pairs, which is GLM's
partial_rotary_factor 0.5; the checkpoint's `rotary_pos_emb.inv_freq` is recomputed by both sides, so it is dropped.
Weights keep their dtype (float16): bfloat16 would change the model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import GlmConfig

from finetune.models.convert import common
from finetune.models.convert.common import Source, drop, rename, split_rows

FAMILY = "chatglm3"
DISPLAY = "ChatGLM3"
STOP_IDS = [2, 64795, 64797]  # </s>, <|user|>, <|observation|>
REQUIRED = {"add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
            "apply_residual_connection_post_layernorm": False}


def _groups(original: dict) -> int:
    if original.get("multi_query_attention", False):
        return common.need(original, "multi_query_group_num", DISPLAY)
    return common.need(original, "num_attention_heads", DISPLAY)


def native_config(original: dict) -> GlmConfig:
    for key, value in REQUIRED.items():
        common.expect(original, key, value, DISPLAY)
    n = lambda key: common.need(original, key, DISPLAY)  # noqa: E731
    return GlmConfig(
        vocab_size=n("padded_vocab_size"), hidden_size=n("hidden_size"), intermediate_size=n("ffn_hidden_size"),
        num_hidden_layers=n("num_layers"), num_attention_heads=n("num_attention_heads"),
        num_key_value_heads=_groups(original), head_dim=n("kv_channels"),
        max_position_embeddings=n("seq_length"), rms_norm_eps=n("layernorm_epsilon"),
        attention_bias=bool(original.get("add_qkv_bias", False)),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * original.get("rope_ratio", 1),
                         "partial_rotary_factor": 0.5},
        pad_token_id=original.get("pad_token_id", 0), eos_token_id=original.get("eos_token_id", 2),
        bos_token_id=None, tie_word_embeddings=False, dtype=original.get("torch_dtype"),
    )


def inv_freq(original: dict) -> torch.Tensor:
    """The buffer the original saves (never used numerically): base 10000 over kv_channels/2 rotary dims."""
    dim = original["kv_channels"] // 2
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def sources(original: dict) -> dict[str, Source]:
    cfg = native_config(original)
    h, kv, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_rows, kv_rows = cfg.num_attention_heads * kv, cfg.num_key_value_heads * kv
    out = {
        "transformer.embedding.word_embeddings.weight": Source(
            (cfg.vocab_size, h), rename("model.embed_tokens.weight")),
        "transformer.rotary_pos_emb.inv_freq": Source((kv // 4,), drop, init=inv_freq(original), optional=True),
        "transformer.encoder.final_layernorm.weight": Source((h,), rename("model.norm.weight"), init="ones"),
        "transformer.output_layer.weight": Source((cfg.vocab_size, h), rename("lm_head.weight")),
    }
    for i in range(cfg.num_hidden_layers):
        old, new = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        qkv = {f"{new}self_attn.{p}_proj": rows for p, rows in zip("qkv", (q_rows, kv_rows, kv_rows))}
        out |= {
            old + "input_layernorm.weight": Source((h,), rename(new + "input_layernorm.weight"), init="ones"),
            old + "self_attention.query_key_value.weight": Source(
                (q_rows + 2 * kv_rows, h), split_rows({k + ".weight": r for k, r in qkv.items()})),
            old + "self_attention.dense.weight": Source((h, q_rows), rename(new + "self_attn.o_proj.weight")),
            old + "post_attention_layernorm.weight": Source(
                (h,), rename(new + "post_attention_layernorm.weight"), init="ones"),
            old + "mlp.dense_h_to_4h.weight": Source((2 * ffn, h), rename(new + "mlp.gate_up_proj.weight")),
            old + "mlp.dense_4h_to_h.weight": Source((h, ffn), rename(new + "mlp.down_proj.weight")),
        }
        if cfg.attention_bias:
            out[old + "self_attention.query_key_value.bias"] = Source(
                (q_rows + 2 * kv_rows,), split_rows({k + ".bias": r for k, r in qkv.items()}))
    return out


def generation(original: dict) -> dict:
    return {"eos_token_id": STOP_IDS, "pad_token_id": original.get("pad_token_id", 0)}


def convert(src_dir: Path, dst_dir: Path, *, progress: bool = True) -> dict:
    """Convert a ChatGLM3 checkpoint directory; see common.convert."""
    return common.convert(sys.modules[__name__], src_dir, dst_dir, progress=progress)
