"""What the estimator knows about one model as one recipe trains it: counted on the meta device
(finetune.estimate.meta), cached and shipped as JSON (finetune.estimate.params), read by the memory model. Plain data,
so both sides import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block: its widths and what training does to it."""

    name: str  # e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    lora: bool  # a LoRA adapter is injected here
    group: int  # linears with the same group read the very same input tensor (q/k/v; gate/up)
    reads: str  # what produces that input: "norm" (the residual stream, normalised), "attention" (the
    #             attention kernel's output), or "mlp" (the gated activation)


@dataclass(frozen=True)
class ModelFacts:
    """What the memory model needs to know about one model as one recipe trains it."""

    params_total: int  # parameters of the base model (tied weights once)
    params_trainable: int  # what the optimizer updates (all for full; the last layers for freeze; adapters
    # (+ DoRA magnitudes) otherwise)
    params_adapter: int  # LoRA A/B parameters
    params_magnitude: int  # DoRA magnitude vectors (kept in fp32 by TRL under QLoRA)
    params_quantized: int  # parameters stored in 4/8 bit (0 unless method=qlora)
    quantized_numels: tuple[int, ...]  # per quantized weight tensor (each carries its own constants)
    quantized_rows: int  # sum of out_features of quantized linears (LLM.int8 keeps one fp32 scale per row)
    buffer_bytes: int  # buffers (rotary inv_freq ...), in their own dtypes
    largest_module_params: int  # the largest leaf module: what ZeRO-3/FSDP must gather at once
    embedding_params: int  # input embedding (its gradient under full fine-tuning is dense)
    lm_head_params: int  # output projection (its fp32 gradient buffer in the fused loss)
    lm_head_trainable: bool
    trainable_shapes: tuple[tuple[int, ...], ...]  # per trainable tensor (Adafactor factors by rows and columns)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    block_linears: tuple[Linear, ...]  # the linears of one decoder block (every block is the same)
    attention_mask_per_head: bool  # the model builds an additive [batch, heads, s, s] mask (ALiBi)
