"""Independent fp32 forward passes of the ORIGINAL architectures, on ORIGINAL state dicts (test-only).

Written from the published modeling files (modeling_chatglm.py, Baichuan2's modeling_baichuan.py for 7B and 13B,
Qwen's modeling_qwen.py), in their own layouts and conventions, sharing nothing with the converters or with
transformers: the converted native models must reproduce these logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """q, k, v: [batch, heads, seq, dim]; plain softmax(q k^T / sqrt(d) + bias) v with a causal mask."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return scores.softmax(-1) @ v


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_rotate_half(x: Tensor, base: float) -> Tensor:
    """Llama / Baichuan2-7B / Qwen-1 rotary embedding over the full head dim; x: [batch, heads, seq, dim]."""
    dim, seq = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(seq).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


# ---------------------------------------------------------------- ChatGLM3 (modeling_chatglm.py)

def chatglm_rope(x: Tensor, kv_channels: int, base: float) -> Tensor:
    """ChatGLM's apply_rotary_pos_emb: x [seq, batch, heads, hn]; rotates the first kv_channels/2 dims in
    interleaved pairs (x[2i], x[2i+1]) with theta_i = base^(-2i / (kv_channels/2)); the rest passes through."""
    n_elem = kv_channels // 2
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    idx_theta = torch.outer(torch.arange(x.shape[0], dtype=torch.float), theta)
    cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)  # [seq, n_elem/2, 2]
    rot_dim = cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    xs = x.reshape(x.shape[0], x.shape[1], x.shape[2], rot_dim // 2, 2)
    cache = cache.view(x.shape[0], 1, 1, rot_dim // 2, 2)
    out = torch.stack([xs[..., 0] * cache[..., 0] - xs[..., 1] * cache[..., 1],
                       xs[..., 1] * cache[..., 0] + xs[..., 0] * cache[..., 1]], -1).flatten(3)
    return torch.cat((out, x_pass), dim=-1)


def chatglm3_logits(sd: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> Tensor:
    heads, kv = cfg["num_attention_heads"], cfg["kv_channels"]
    groups = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    eps, base = cfg["layernorm_epsilon"], 10000.0 * cfg.get("rope_ratio", 1)
    h = sd["transformer.embedding.word_embeddings.weight"][input_ids].transpose(0, 1)  # [seq, batch, hidden]
    seq, batch = h.shape[:2]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
        mixed = x @ sd[p + "self_attention.query_key_value.weight"].T + sd[p + "self_attention.query_key_value.bias"]
        q, k, v = mixed.split([heads * kv, groups * kv, groups * kv], dim=-1)
        q = chatglm_rope(q.view(seq, batch, heads, kv), kv, base)
        k = chatglm_rope(k.view(seq, batch, groups, kv), kv, base)
        v = v.view(seq, batch, groups, kv)
        # multi-query: each group's k/v serves heads/groups consecutive heads (unsqueeze + expand in the original)
        k = k.unsqueeze(-2).expand(-1, -1, -1, heads // groups, -1).reshape(seq, batch, heads, kv)
        v = v.unsqueeze(-2).expand(-1, -1, -1, heads // groups, -1).reshape(seq, batch, heads, kv)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        ctx = causal_attention(q, k, v).permute(2, 0, 1, 3).reshape(seq, batch, heads * kv)
        h = h + ctx @ sd[p + "self_attention.dense.weight"].T
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        up = x @ sd[p + "mlp.dense_h_to_4h.weight"].T
        a, b = torch.chunk(up, 2, dim=-1)
        h = h + (F.silu(a) * b) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    h = rms_norm(h, sd["transformer.encoder.final_layernorm.weight"], eps)
    return (h @ sd["transformer.output_layer.weight"].T).transpose(0, 1)


# ---------------------------------------------------------------- Baichuan2 (modeling_baichuan.py, 7B and 13B)

def baichuan_slopes(n: int) -> list[float]:
    """_get_interleave from Baichuan2-13B's modeling file."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + baichuan_slopes(2 * closest)[0::2][: n - closest]


def baichuan2_logits(sd: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> Tensor:
    """7B (RoPE) when the config has max_position_embeddings, else 13B (ALiBi, eval form: slope * key position)."""
    heads, hidden, eps = cfg["num_attention_heads"], cfg["hidden_size"], cfg["rms_norm_eps"]
    hd = hidden // heads
    alibi = "max_position_embeddings" not in cfg
    h = sd["model.embed_tokens.weight"][input_ids]
    batch, seq = input_ids.shape
    bias = None
    if alibi:
        bias = torch.tensor(baichuan_slopes(heads))[:, None, None] * torch.arange(seq).float()[None, None, :]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
        proj = x @ sd[p + "self_attn.W_pack.weight"].T
        q, k, v = (t.view(batch, seq, heads, hd).transpose(1, 2) for t in proj.split(hidden, dim=-1))
        if not alibi:
            q, k = rope_rotate_half(q, 10000.0), rope_rotate_half(k, 10000.0)
        ctx = causal_attention(q, k, v, bias).transpose(1, 2).reshape(batch, seq, hidden)
        h = h + ctx @ sd[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, sd["model.norm.weight"], eps)
    return h @ F.normalize(sd["lm_head.weight"]).T  # NormHead


# ---------------------------------------------------------------- Qwen-1 (modeling_qwen.py)

def qwen1_logits(sd: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> Tensor:
    heads, hidden, eps = cfg["num_attention_heads"], cfg["hidden_size"], cfg["layer_norm_epsilon"]
    hd = cfg["kv_channels"]
    base = float(cfg["rotary_emb_base"])
    h = sd["transformer.wte.weight"][input_ids]
    batch, seq = input_ids.shape
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        x = rms_norm(h, sd[p + "ln_1.weight"], eps)
        mixed = x @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.view(batch, seq, heads, hd).transpose(1, 2) for t in mixed.split(hidden, dim=-1))
        q, k = rope_rotate_half(q, base), rope_rotate_half(k, base)
        ctx = causal_attention(q, k, v).transpose(1, 2).reshape(batch, seq, hidden)
        h = h + ctx @ sd[p + "attn.c_proj.weight"].T
        x = rms_norm(h, sd[p + "ln_2.weight"], eps)
        a1, a2 = x @ sd[p + "mlp.w1.weight"].T, x @ sd[p + "mlp.w2.weight"].T
        h = h + (a1 * F.silu(a2)) @ sd[p + "mlp.c_proj.weight"].T
    h = rms_norm(h, sd["transformer.ln_f.weight"], eps)
    return h @ sd["lm_head.weight"].T


def greedy(logits_fn, input_ids: Tensor, steps: int) -> Tensor:
    """Greedy continuation by full recomputation (no cache): the reference a cached generation must match."""
    ids = input_ids
    for _ in range(steps):
        ids = torch.cat([ids, logits_fn(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# ---------------------------------------------------------------- original checkpoints in the published formats

def republish(directory, sources: dict, *, dtype: torch.dtype, fmt: str, shards: int = 1, scale: float = 10.0
              ) -> dict[str, Tensor]:
    """Rewrite a tiny ORIGINAL checkpoint as a hub repo ships it (`fmt` "safetensors" or "bin", `shards` files +
    index, `dtype`), its random weights scaled by `scale` so attention is far from uniform and a wrong RoPE, mask
    or split shows in the logits. Returns the state dict as written (what the reference forward must use)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    state = {k: (v * scale if sources[k].init == "normal" else v).to(dtype) for k, v in state.items()}
    keys = list(state)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i in range(shards):
        part = {k: state[k] for k in keys[i::shards]}
        name = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        if fmt == "safetensors":
            save_file(part, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / name)
        weight_map |= {k: name for k in part}
    if shards > 1:
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state
