"""Qwen (1) (remote code "qwen", QWenLMHeadModel) -> transformers `Qwen2ForCausalLM`.

`c_attn` has a bias even though the config says `no_bias: true` (that removes only the c_proj and w1/w2 biases);
its rows are [q; k; v], hidden_size each. The MLP computes c_proj(w1(x) * silu(w2(x))), so w2 is the gate and w1 the
up projection, and the config's intermediate_size is twice the per-branch width. RoPE is rotate_half over the full
head with base `rotary_emb_base`. Qwen-1's dynamic NTK and logn attention only act beyond `seq_length` tokens, which
Qwen2 does not model: parity holds up to `seq_length`. config.json has no dtype: the weights' dtype is used.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import Qwen2Config

from finetune.errors import UserError
from finetune.models.convert import common
from finetune.models.convert.common import Source, drop, rename, split_rows

FAMILY = "qwen1"
DISPLAY = "Qwen (1)"
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645


def native_config(original: dict) -> Qwen2Config:
    n = lambda key: common.need(original, key, DISPLAY)  # noqa: E731
    common.expect(original, "rotary_pct", 1.0, DISPLAY)
    common.expect(original, "no_bias", True, DISPLAY)
    hidden, heads = n("hidden_size"), n("num_attention_heads")
    if hidden // heads != original.get("kv_channels", hidden // heads):
        raise UserError(f"kv_channels={original['kv_channels']} differs from hidden_size/num_attention_heads="
                        f"{hidden // heads}; Qwen2 cannot represent that")
    return Qwen2Config(
        vocab_size=n("vocab_size"), hidden_size=hidden, intermediate_size=n("intermediate_size") // 2,
        num_hidden_layers=n("num_hidden_layers"), num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=n("seq_length"), rms_norm_eps=n("layer_norm_epsilon"),
        rope_parameters={"rope_type": "default", "rope_theta": float(original.get("rotary_emb_base", 10000))},
        initializer_range=original.get("initializer_range", 0.02), tie_word_embeddings=False,
        use_sliding_window=False, bos_token_id=None, eos_token_id=ENDOFTEXT, pad_token_id=None,
    )


def sources(original: dict) -> dict[str, Source]:
    cfg = native_config(original)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    out = {
        "transformer.wte.weight": Source((cfg.vocab_size, h), rename("model.embed_tokens.weight")),
        "transformer.ln_f.weight": Source((h,), rename("model.norm.weight"), init="ones"),
        "lm_head.weight": Source((cfg.vocab_size, h), rename("lm_head.weight")),
        "transformer.rotary_emb.inv_freq": Source((h // cfg.num_attention_heads // 2,), drop, init=None,
                                                  optional=True),
    }
    for i in range(cfg.num_hidden_layers):
        old, new = f"transformer.h.{i}.", f"model.layers.{i}."
        qkv = {f"{new}self_attn.{x}_proj": h for x in "qkv"}
        out |= {
            old + "ln_1.weight": Source((h,), rename(new + "input_layernorm.weight"), init="ones"),
            old + "attn.c_attn.weight": Source((3 * h, h), split_rows({k + ".weight": r for k, r in qkv.items()})),
            old + "attn.c_attn.bias": Source((3 * h,), split_rows({k + ".bias": r for k, r in qkv.items()})),
            old + "attn.c_proj.weight": Source((h, h), rename(new + "self_attn.o_proj.weight")),
            old + "ln_2.weight": Source((h,), rename(new + "post_attention_layernorm.weight"), init="ones"),
            old + "mlp.w1.weight": Source((inter, h), rename(new + "mlp.up_proj.weight")),
            old + "mlp.w2.weight": Source((inter, h), rename(new + "mlp.gate_proj.weight")),
            old + "mlp.c_proj.weight": Source((h, inter), rename(new + "mlp.down_proj.weight")),
        }
    return out


def generation(original: dict) -> dict:
    return {"eos_token_id": [ENDOFTEXT, IM_START, IM_END], "pad_token_id": ENDOFTEXT}


def convert(src_dir: Path, dst_dir: Path, *, progress: bool = True) -> dict:
    """Convert a Qwen (1) checkpoint directory; see common.convert."""
    return common.convert(sys.modules[__name__], src_dir, dst_dir, progress=progress)
