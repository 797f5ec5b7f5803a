"""Baichuan2 (remote code "baichuan") -> `LlamaForCausalLM` (7B, RoPE) or our `BaichuanAlibiForCausalLM` (13B, ALiBi).

Both share the layout: `W_pack` rows are [q; k; v] (hidden_size each, no permutation: the original uses rotate_half
like HF Llama) and `lm_head` is a NormHead whose rows the original L2-normalises on its first forward; we normalise
once here, in fp32, and store it fp32. The two sizes share model_type, architectures and auto_map: only the 7B config
has `max_position_embeddings` (the 13B has `model_max_length` only), so that key, never the size, tells them apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import LlamaConfig, PreTrainedConfig

from finetune.errors import UserError
from finetune.models.baichuan_alibi import BaichuanAlibiConfig
from finetune.models.convert import common
from finetune.models.convert.common import Source, drop, norm_head, rename, split_rows

FAMILY = "baichuan2"
DISPLAY = "Baichuan2"
BAICHUAN1_VOCAB = 64000


def uses_rope(original: dict) -> bool:
    """Baichuan2-7B (RoPE) has max_position_embeddings; Baichuan2-13B (ALiBi) has model_max_length only."""
    return "max_position_embeddings" in original


def native_config(original: dict) -> PreTrainedConfig:
    n = lambda key: common.need(original, key, DISPLAY)  # noqa: E731
    if n("vocab_size") == BAICHUAN1_VOCAB:
        raise UserError("vocab_size 64000 is Baichuan (1), not Baichuan2 (125696): Baichuan 1 has no NormHead and "
                        "is not supported")
    common.expect(original, "hidden_act", "silu", DISPLAY)
    shared = dict(
        vocab_size=n("vocab_size"), hidden_size=n("hidden_size"), intermediate_size=n("intermediate_size"),
        num_hidden_layers=n("num_hidden_layers"), num_attention_heads=n("num_attention_heads"),
        num_key_value_heads=n("num_attention_heads"), rms_norm_eps=n("rms_norm_eps"),
        initializer_range=original.get("initializer_range", 0.02), bos_token_id=original.get("bos_token_id", 1),
        eos_token_id=original.get("eos_token_id", 2), pad_token_id=original.get("pad_token_id", 0),
        tie_word_embeddings=False, dtype=original.get("torch_dtype"),
    )
    if uses_rope(original):
        return LlamaConfig(**shared, max_position_embeddings=original["max_position_embeddings"],
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return BaichuanAlibiConfig(**shared, max_position_embeddings=n("model_max_length"))


def sources(original: dict) -> dict[str, Source]:
    cfg = native_config(original)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    out = {
        "model.embed_tokens.weight": Source((cfg.vocab_size, h), rename("model.embed_tokens.weight")),
        "model.norm.weight": Source((h,), rename("model.norm.weight"), init="ones"),
        "lm_head.weight": Source((cfg.vocab_size, h), norm_head("lm_head.weight")),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        same = lambda name, shape, init="normal": {p + name: Source(shape, rename(p + name), init=init)}  # noqa: E731
        out |= {
            p + "self_attn.W_pack.weight": Source(
                (3 * h, h), split_rows({f"{p}self_attn.{x}_proj.weight": h for x in "qkv"})),
            **same("self_attn.o_proj.weight", (h, h)),
            **same("mlp.gate_proj.weight", (inter, h)),
            **same("mlp.up_proj.weight", (inter, h)),
            **same("mlp.down_proj.weight", (h, inter)),
            **same("input_layernorm.weight", (h,), "ones"),
            **same("post_attention_layernorm.weight", (h,), "ones"),
        }
        if uses_rope(original):  # a buffer some savers keep; recomputed by both sides
            out[p + "self_attn.rotary_emb.inv_freq"] = Source((h // cfg.num_attention_heads // 2,), drop,
                                                               init=None, optional=True)
    return out


def generation(original: dict) -> dict:
    return {key: original.get(key, default) for key, default in
            (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0))}


def convert(src_dir: Path, dst_dir: Path, *, progress: bool = True) -> dict:
    """Convert a Baichuan2-7B or -13B checkpoint directory; see common.convert."""
    return common.convert(sys.modules[__name__], src_dir, dst_dir, progress=progress)
