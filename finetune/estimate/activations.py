"""What a training step holds besides the model state: the tensors autograd saves in each decoder layer (by
half of the layer, with and without gradient checkpointing, for every attention kernel), each layer's worst moment
in forward and backward, and the loss head's buffers (TRL's chunked head or transformers' full fp32 logits); plus
the bytes per element each kind of tensor has under a recipe (`Bytes`), which the model-state terms use too.

Measured, not guessed: every formula here is held against what a real step allocates, on a CPU through the real
libraries (scripts/bench_memory.py --cpu at 7B widths, docs/memory.md; tests/unit/test_estimate_real_widths.py and
the saved-tensor hooks of tests/unit/test_estimate_memory.py). finetune.estimate.memory puts the moments together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.config import Recipe
from finetune.estimate import stages
from finetune.estimate.params import Linear, ModelFacts, facts
from finetune.models.registry import ModelSpec
from finetune.plan import model_plan
from finetune.schema import trains_weights

LOSS_TILE = (4096, 32768)  # TRL's chunked loss: tokens x vocabulary columns per projection tile (allocated whole)
FLASH_MAX_HEAD_DIM = 256  # above it SDPA falls back to kernels without native GQA


@dataclass(frozen=True)
class Bytes:
    """Bytes per element of each kind of tensor a recipe trains with."""

    weight: int  # per base weight as loaded (16/32-bit)
    kept: int  # per base weight that is not quantized (= weight, except QLoRA's fp32 upcast)
    trainable: int  # per trainable parameter (the adapters; the weights themselves for full)
    act: int  # per activation element the linears produce (the autocast dtype)
    adapter_input: int  # per element of an adapter's own copy of its input: the autocast dtype under autocast,
    #                     else lora_A's dtype (PEFT casts the input to it: bf16 adapters on an fp32 QLoRA base)

    @property
    def stream(self) -> int:
        """The residual stream's dtype: the embedding's (fp32 when its weights are fp32, under autocast too)."""
        return self.kept


ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def dtype_bytes(recipe: Recipe) -> Bytes:
    """Bytes per element, read off the model's plan (finetune.plan): the dtypes training loads, keeps, trains and
    runs forward in — the linears' outputs are in the autocast dtype, or, without autocast, in the dtype the weights
    were loaded in (QLoRA at train.precision=fp32 computes in quant.compute_dtype)."""
    p = model_plan(recipe, None)
    return Bytes(ELEMENT_BYTES[p.load_dtype], ELEMENT_BYTES[p.kept_dtype], ELEMENT_BYTES[p.trained_dtype],
                 ELEMENT_BYTES[p.autocast or p.load_dtype], ELEMENT_BYTES[p.autocast or p.trained_dtype])


@dataclass(frozen=True)
class _Layer:
    """Per token, what one decoder layer saves for backward, by the half of the layer that saves it (the MLP's half
    is freed before backward reaches the attention), and what backward frees before its attention's worst moment."""

    attention: float  # input norm, q/k/v and their inputs, the attention kernel's outputs, o_proj's input
    mlp: float  # post-attention norm, the gated activations and the linears' inputs
    probs_copy: float  # eager: the 16-bit copy of the softmax (freed when backward passes the value matmul)
    o_input: float  # what o_proj's backward frees (its input, or its adapter's copy)

    @property
    def saved(self) -> float:
        return self.attention + self.mlp


def _mlp_dtype(recipe: Recipe, b: Bytes) -> int:
    return b.stream if recipe.method == "qlora" else b.act  # bitsandbytes linears return their input's dtype


def _layer(f: ModelFacts, recipe: Recipe, b: Bytes, seq: int, padded: bool) -> _Layer:
    """Bytes autograd saves per token in one decoder layer (the eager s² term is per token too: x seq)."""
    a, h, i = b.act, f.hidden, f.intermediate
    full = trains_weights(recipe.method)  # linears save their inputs for the weight gradients, norms a copy
    eager = recipe.train.attn_implementation == "eager"
    kv = f.heads if eager or padded or f.attention_mask_per_head or f.head_dim > FLASH_MAX_HEAD_DIM else f.kv_heads
    mlp = _mlp_dtype(recipe, b)
    norm = 4 * h + (b.kept * h if full else 0)  # an RMSNorm's fp32 input (+ the copy a norm weight needs)
    attention = norm + a * (f.heads + 2 * kv) * f.head_dim  # q, k after rotary; v (repeated for eager / masks)
    probs_copy = (a if a != 4 else 0) * f.heads * seq if eager else 0
    if eager:  # fp32 softmax and its 16-bit copy for the value matmul
        attention += 4 * f.heads * seq + probs_copy
    else:  # the kernel's output (o_proj reads it in place) and one fp32 logsumexp per head
        attention += a * f.heads * f.head_dim + 4 * f.heads
    parts = {"attention": attention, "mlp": norm + 3 * mlp * i, "o_input": 0.0}  # gate (or gate_up), act, up
    dropout = recipe.lora.dropout > 0
    saved_groups: set[int] = set()
    for lin in f.block_linears:
        side = "mlp" if lin.name.startswith("mlp.") else "attention"
        source = {"norm": b.stream, "attention": a, "mlp": mlp}[lin.reads]  # dtype of the tensor it reads
        kept = 0
        if full or (lin.lora and not dropout and b.trainable == source):
            # the input itself, once per group of linears reading it (autocast makes one cast copy each)
            if source != a:
                kept = a * lin.in_features
            elif lin.group not in saved_groups and not (lin.reads == "attention" and not eager):
                saved_groups.add(lin.group)
                kept = a * lin.in_features
        elif lin.lora:  # each adapter keeps its own dropped-out / cast copy (+ dropout's boolean mask)
            kept = (1 if dropout else 0) * lin.in_features + b.adapter_input * lin.in_features
        if lin.lora:
            kept += b.adapter_input * recipe.lora.r  # lora_A's output, kept for lora_B's gradient
            if recipe.lora.dora:
                kept += 2 * a * lin.out_features  # base and adapter results, rescaled by the magnitude
        parts[side] += kept
        if lin.reads == "attention":
            parts["o_input"] += kept
    return _Layer(parts["attention"], parts["mlp"], probs_copy, parts["o_input"])


def _down(f: ModelFacts) -> Linear:
    """The linear that reads the gated activation (down_proj): the widest input of the layer."""
    return max((lin for lin in f.block_linears if lin.reads == "mlp"), key=lambda lin: lin.in_features)


def _dequantized(f: ModelFacts, recipe: Recipe) -> int:
    """down_proj's weight in 16 bits: bitsandbytes dequantizes a 4-bit weight for the input gradient, and its CUDA
    backend for the forward of a training-sized matmul too (dequantize + F.linear above 1536 rows, and below it
    on many GPUs)."""
    return 2 * _down(f).in_features * _down(f).out_features if recipe.method == "qlora" else 0


def _layer_moments(f: ModelFacts, recipe: Recipe, b: Bytes, layer: _Layer, seq: int,
                   tokens: int) -> tuple[tuple[float, int], tuple[float, int]]:
    """One layer at its worst, as (bytes per token, bytes) with its own saved tensors included: (in backward, in
    forward). Around down_proj (the widest input) the layer holds its saved tensors so far, the residual and the
    post-attention norm's output where no one saves them, and down_proj's input; then
      base matmul    bitsandbytes' 16-bit copy of that input, the 16-bit output, and the 16-bit weight it
                     dequantizes (before the adapter's copy of the input exists)
      adapter        PEFT's copy of the input in the adapters' dtype when that is wider (fp32 adapters on 16-bit
                     activations), kept to the end of the adapter: forward holds the base output, lora_B's and
                     its scaled copy; recomputation stops at lora_A (the base output cast back)
      recomputation  as forward, plus the gradients waiting for the layer (the residual's, and its scaled copy
                     for the adapter)
      down backward  the layer's saved tensors less down_proj's input (its adapter's copy), the residual's
                     gradient and the input gradients of the base linear and the adapter (in the activation's
                     dtype) with their sum — or, while bitsandbytes computes its part in 16 bits, the adapter's
                     and the dequantized weight
      attention      the attention half's saved tensors with the kernel's gradients: SDPA's q/k/v gradients and
                     FlashAttention's fp32 dq accumulator, or eager's softmax backward in fp32 (three [heads, s, s])"""
    a, s, h = b.act, b.stream, f.hidden
    mlp, down, full = _mlp_dtype(recipe, b), _down(f), trains_weights(recipe.method)
    i, dropout = down.in_features, recipe.lora.dropout > 0
    shared = full or (down.lora and b.trainable == mlp and not dropout)  # down_proj's input is itself saved
    own_copy = 0 if shared or not down.lora else a * i  # else its adapter saves a 16-bit copy
    live = (s * h if s != 4 else 0) + (0 if shared else mlp * i)  # the residual (an fp32 one is the norm's input)
    live += 0 if full or (b.trainable == s and not dropout) else s * h  # the norm's output
    base = layer.saved - own_copy + live + (a * i if recipe.method == "qlora" and mlp != a else 0) + a * h
    wider = b.trainable * i if down.lora and b.trainable > a else 0
    dequantized = _dequantized(f, recipe)
    waiting = s * h + (a * h if down.lora else 0)
    forward = max((base, dequantized), (layer.saved + live + wider + 3 * a * h, 0), key=lambda m: m[0] * tokens + m[1])
    backward: list[tuple[float, int]] = []
    if recipe.train.gradient_checkpointing:
        backward += [(base + waiting, dequantized), (layer.saved + waiting + live + mlp * h + wider, 0)]
    freed = mlp * i if shared else own_copy
    sums = max(3 * mlp, a + b.trainable if down.lora and b.trainable > a else 0) * i
    in_compute = a * i + (a * h if mlp != a else 0)  # bitsandbytes' input gradient (and its output's) in 16 bits
    backward += [(layer.saved - freed + s * h + sums, 0),
                 (layer.saved - freed + s * h + mlp * i + in_compute, dequantized)]
    attention = layer.attention - layer.o_input
    if recipe.train.attn_implementation == "eager":  # the value gradient, then softmax backward's fp32 tensors
        attention += mlp * f.heads * f.head_dim - layer.probs_copy + 2 * 4 * f.heads * seq
    else:
        attention += a * (f.heads + 2 * f.kv_heads) * f.head_dim + 4 * f.heads * f.head_dim
    backward.append((attention, 0))
    return max(backward, key=lambda m: m[0] * tokens + m[1]), forward


def _layers_saving(f: ModelFacts, recipe: Recipe) -> int:
    """Decoder layers whose tensors autograd saves: all of them, but only the trained ones under freeze — the
    frozen layers before them compute from inputs that need no gradient, so autograd records nothing there.
    (Under gradient checkpointing every layer's checkpoint still keeps its input, frozen or not: measured by
    scripts/bench_memory.py --cpu.)"""
    return min(recipe.freeze.layers, f.layers) if recipe.method == "freeze" else f.layers


def activation_moments(f: ModelFacts, recipe: Recipe, b: Bytes, seqs: int) -> tuple[int, int, int]:
    """(saved when backward starts, held at the worst moment of backward — the final norm's, or a layer's — and at
    the worst moment of forward, 0 under checkpointing, whose recomputation in backward holds more)."""
    seq = recipe.train.max_length
    tokens = seqs * seq
    # rows padded to one length carry an attention mask (FlashAttention-2 unpads instead; packing has no padding)
    padded = (recipe.train.micro_batch > 1 and not recipe.data.packing
              and recipe.train.attn_implementation != "flash_attention_2")
    layer = _layer(f, recipe, b, seq, padded)
    full, ckpt = trains_weights(recipe.method), recipe.train.gradient_checkpointing
    layers = _layers_saving(f, recipe)
    if ckpt:  # each layer's input, frozen ones too (with an fp32 stream, also what the recomputed layer's first
        #       norm saves)
        saved = f.layers * b.stream * f.hidden * tokens
        recompute = -4 * f.hidden * tokens if b.stream == 4 else 0
    else:  # the first saving layer's input needs no gradient (frozen embeddings or layers before it, adapters'
        #    frozen base): its first norm keeps no fp32 copy of that input
        first_input = 0 if recipe.method == "full" else 4 * f.hidden * tokens
        saved, recompute = layers * layer.saved * tokens - first_input, 0
    final_norm = (4 + (b.kept if recipe.method == "full" else 0)) * f.hidden * tokens  # freeze: its weight is frozen
    saved += final_norm + 2 * b.stream * f.head_dim * tokens  # + rotary cos/sin, shared by the layers
    casts = 0
    if b.trainable != b.adapter_input:  # autocast's 16-bit copies of the fp32 trainables, saved for backward
        casts = b.adapter_input * (f.params_trainable if full else f.params_adapter)
        if ckpt:  # made again with each recomputed layer
            casts, recompute = 0, recompute + casts // layers
    saved += casts
    if f.attention_mask_per_head:  # ALiBi: an additive [b, heads, s, s] mask in the stream's dtype
        mask = seqs * f.heads * seq * seq
        if b.stream == b.act:  # one tensor, shared by every layer
            saved += mask * b.act
        elif ckpt:  # kept for recomputation; autocast casts it in the layer
            saved, recompute = saved + mask * b.stream, recompute + mask * b.act
        else:  # autocast gives every layer's attention its own 16-bit copy, and each one is saved
            saved += layers * mask * b.act
    elif recipe.train.attn_implementation == "eager" and ckpt:
        saved += seqs * seq * seq * b.stream  # additive causal mask (the stream's dtype), an input of every layer
    elif padded:
        saved += seqs * seq * seq  # boolean padding mask
    (worst, fixed), (ahead, ahead_fixed) = _layer_moments(f, recipe, b, layer, seq, tokens)
    # at the last layer: everything saved but the final norm's, with that layer's moment in place of its own saved
    # tensors (recomputed under checkpointing) and what recomputing adds
    others = saved - final_norm + recompute - (0 if ckpt else layer.saved * tokens)
    in_layer = others + worst * tokens + fixed
    if recipe.lora.dora and not full:  # DoRA rebuilds each adapted weight to take its norm
        in_layer += max(lin.in_features * lin.out_features for lin in f.block_linears if lin.lora) * (4 + b.weight)
    final_norm_backward = saved + 5 * 4 * f.hidden * tokens  # RMSNorm's backward: five fp32 [tokens, hidden]
    # forward also keeps the embeddings and the layer's input alive (the model's variables)
    forward = 0 if ckpt else others + (ahead + b.stream * f.hidden * (1 + (b.stream != 4))) * tokens + ahead_fixed
    return int(saved), int(max(in_layer, final_norm_backward)), int(forward)


def _loss_saved_bytes(f: ModelFacts, b: Bytes, tokens: int, logits: str = "chunked") -> int:
    """What the loss head saves for backward. TRL's chunked head: the final hidden states, targets, logsumexp,
    entropy. Full logits: the fp32 log-probabilities, the 16-bit copy autocast makes of an fp32 lm_head (its
    matmul keeps it for the input gradient) and, when lm_head trains, its input."""
    if logits == "chunked":
        return tokens * (b.stream * f.hidden + 16)
    total = 4 * tokens * f.vocab + (f.vocab * f.hidden * b.act if b.kept != b.act else 0)
    return total + (tokens * f.hidden * b.act if f.lm_head_trainable else 0)


def saved_after_forward(recipe: Recipe, spec: ModelSpec) -> int:
    """Bytes autograd holds when one micro-batch's forward ends: the part of the activation model a CPU can
    check exactly (saved-tensor hooks; tests/unit/test_estimate_memory.py)."""
    f, b = facts(recipe, spec), dtype_bytes(recipe)
    seqs = stages.sequences(recipe)
    tokens = seqs * stages.tokens(recipe)
    return activation_moments(f, recipe, b, seqs)[0] + _loss_saved_bytes(f, b, tokens, recipe.train.logits)


def full_logits_bytes(f: ModelFacts, b: Bytes, tokens: int) -> int:
    """transformers' ForCausalLMLoss at its peak, log_softmax's backward: the fp32 log-probabilities it saved, their
    gradient and its own gradient — three fp32 [tokens, vocab] — with the rest of what the head saved. (Forward
    holds less: the 16-bit logits, their fp32 copy and the log-probabilities.)"""
    return 2 * 4 * tokens * f.vocab + _loss_saved_bytes(f, b, tokens, "full")


def loss_head_bytes(f: ModelFacts, b: Bytes, tokens: int) -> int:
    """TRL's chunked head at its worst moment, in backward: what it saved; its [4096, 32768] logits tile in the
    compute dtype; 16-bit copies of the hidden-state chunk and of the weight chunk where those are wider (two
    weight chunks while one replaces the other); the fp32 hidden-state gradient (+ its cast back) and, when
    lm_head trains, its fp32 gradient (+ cast)."""
    h, a, s = f.hidden, b.act, b.stream
    rows = min(tokens, LOSS_TILE[0])
    total = _loss_saved_bytes(f, b, tokens) + rows * LOSS_TILE[1] * a + tokens * h * (4 + (s if s != 4 else 0))
    if b.kept != a:
        tiles = math.ceil(tokens / LOSS_TILE[0]) * math.ceil(f.vocab / LOSS_TILE[1])
        total += min(tiles, 2) * min(f.vocab, LOSS_TILE[1]) * h * a
    if s != a:
        total += rows * h * a
    if f.lm_head_trainable:
        total += f.vocab * h * (4 + (b.trainable if b.trainable != 4 else 0))
    return total
