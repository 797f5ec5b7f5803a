"""Peak GPU memory of one training run, per GPU, from the recipe alone: pure arithmetic over exact parameter facts.

What training holds, as our stack (transformers 5 + PEFT + TRL's SFTTrainer + bitsandbytes) really does it, and as
the plain stack most scripts run does it (train.logits=full, quant.upcast=true; `finetune estimate --compare`):
- Weights are loaded in the recipe's precision (bf16/fp16; fp32). Full fine-tuning in fp16 keeps fp32 weights
  (fp16 autocast: GradScaler cannot unscale fp16 gradients); full bf16 is pure bf16.
- LoRA adapters are fp32 (PEFT's autocast_adapter_dtype), bf16 under QLoRA (TRL casts them; DoRA magnitudes
  stay fp32) and under ZeRO-3 (TRL). Gradients and AdamW states have the dtype of their parameter.
- QLoRA: transformers' bitsandbytes quantizer decides what is not quantized (embeddings, lm_head, norms,
  biases); those stay 16-bit, or become fp32 — and with them the residual stream and bitsandbytes' outputs — with
  quant.upcast=true (peft.prepare_model_for_kbit_training). NF4/FP4 stores 0.5 byte per weight + an fp32 absmax
  per 64-block (double quant: 1 byte per block + an fp32 absmax per 256 blocks); LLM.int8 stores 1 byte per
  weight + an fp32 scale per row. Each 4-bit matmul dequantizes its weight to 16 bits for the moment.
- Activations: what autograd saves per decoder layer, split into its attention and MLP halves; with gradient
  checkpointing each layer's input, plus one layer recomputed. SDPA/flash keep no s² matrix; eager keeps the
  fp32 softmax and its 16-bit copy for every head.
- Loss: train.logits=chunked is TRL's head, which never builds the [tokens, vocab] logits (it works in [4096,
  32768] tiles and, for full fine-tuning, accumulates the lm_head gradient in fp32); train.logits=full is
  transformers' ForCausalLMLoss on the materialized logits upcast to fp32.

The peak is the largest of these moments of a step, not the sum of every term:
  load            weights (+ quantization constants)
  forward         (without checkpointing) every layer's saved tensors as the last one reaches down_proj
  loss backward   every saved activation + the loss head's backward buffers (+ states from step 2 on, + the
                  gradients while they are being accumulated)
  layer backward  the final norm's backward, or the worst moment of the last layer's recomputation and backward
                  (_layer_moments), on top of what the other layers still hold
  backward end    all gradients, the activations gone
  optimizer step  gradients + states + the optimizer's temporaries (foreach AdamW: one state-sized tensor)
Every moment also carries `overhead`: the CUDA context plus allocator fragmentation on the transient part.

Every term but `overhead` is measured on a CPU (TERM_BASIS says where); the CUDA-side constants are assumptions
until the GPU benchmark (scripts/bench_memory.py on a GPU) measures them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from finetune.config import Recipe
from finetune.engines import ENGINES
from finetune.estimate import stages
from finetune.estimate.params import Linear, ModelFacts, facts
from finetune.models.registry import ModelSpec

GiB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2  # CUDA context + cuBLAS handles (torch 2.x, lazy module loading)
FRAGMENTATION = 0.08  # caching-allocator excess (reserved over allocated) on the transient part
TERMS = ("weights", "trainable_weights", "gradients", "optimizer", "activations", "logits", "overhead")
LOSS_TILE = (4096, 32768)  # TRL's chunked loss: tokens x vocabulary columns per projection tile (allocated whole)
FLASH_MAX_HEAD_DIM = 256  # above it SDPA falls back to kernels without native GQA
TERM_BASIS = {
    "weights": "exact count, CPU-checked",
    "trainable_weights": "exact count, CPU-checked",
    "gradients": "exact count, CPU-checked",
    "optimizer": "exact count, CPU-checked",
    "activations": "CPU-measured at real widths",
    "logits": "CPU-measured at real widths",
    "overhead": "assumed: CUDA context + 8% fragmentation",
}
"""What each term rests on: counts checked against the bytes PyTorch holds after a step
(tests/unit/test_estimate_state_bytes.py), activations and loss measured on a CPU at 7B widths (docs/memory.md,
tests/unit/test_estimate_real_widths.py), and the CUDA-side constants, not measured yet."""


@dataclass
class MemoryPlan:
    """Per-GPU memory of a training run. `breakdown` is the peak moment's composition (its terms sum to
    `peak_bytes`); `phases` holds every moment, so a user sees what else comes close."""

    params_total: int
    params_trainable: int
    num_gpus: int
    distributed: str
    breakdown: dict[str, int]
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_phase: str = ""
    stage_terms: dict[str, int] = field(default_factory=dict)  # what the stage adds (stages.py)

    @property
    def peak_bytes(self) -> int:
        return sum(self.breakdown.values())


@dataclass(frozen=True)
class _Bytes:
    weight: int  # per base weight as loaded (16/32-bit)
    kept: int  # per base weight that is not quantized (= weight, except QLoRA's fp32 upcast)
    trainable: int  # per trainable parameter (the adapters; the weights themselves for full)
    act: int  # per activation element the linears produce (the autocast dtype)

    @property
    def stream(self) -> int:
        """The residual stream's dtype: the embedding's (fp32 when its weights are fp32, under autocast too)."""
        return self.kept


def _dtype_bytes(recipe: Recipe) -> _Bytes:
    if recipe.train.precision == "fp32":
        return _Bytes(4, 4, 4, 4)
    if recipe.method in ("full", "freeze"):  # freeze: full weights, some of them trained
        weight = 4 if recipe.train.precision == "fp16" else 2  # GradScaler cannot unscale fp16 gradients
        return _Bytes(weight, weight, weight, 2)
    if recipe.method == "qlora":  # TRL casts the adapters to bf16 on a quantized base
        return _Bytes(2, 4 if recipe.quant.upcast else 2, 2, 2)
    return _Bytes(2, 2, 2 if _zero3(recipe.distributed) else 4, 2)  # PEFT's fp32 adapters; TRL's bf16 on ZeRO-3


def _quantized_weight_bytes(numels: tuple[int, ...], bits: int, double_quant: bool, rows: int) -> int:
    """bitsandbytes storage of the quantized linears, constants included (per tensor, as Params4bit holds them)."""
    if bits == 8:
        return sum(numels) + 4 * rows
    total = 0
    for n in numels:
        blocks = math.ceil(n / 64)
        total += math.ceil(n / 2) + 64  # packed nibbles + the 16-entry code
        total += blocks + 4 * math.ceil(blocks / 256) + 1024 + 4 if double_quant else 4 * blocks
    return total


def _weight_bytes(f: ModelFacts, recipe: Recipe, b: _Bytes) -> int:
    if recipe.method != "qlora":
        return f.params_total * b.weight + f.buffer_bytes
    kept = (f.params_total - f.params_quantized) * b.kept
    quantized = _quantized_weight_bytes(f.quantized_numels, recipe.quant.bits, recipe.quant.double_quant,
                                       f.quantized_rows)
    return kept + quantized + f.buffer_bytes


def _optimizer_bytes(f: ModelFacts, b: _Bytes, optimizer: str, magnitude_bytes: int) -> tuple[int, int]:
    """(persistent states, step temporaries) for the trainable tensors."""
    numels = [math.prod(s) for s in f.trainable_shapes]
    if optimizer == "adamw_torch":
        states = 2 * (sum(numels) - f.params_magnitude) * b.trainable + 2 * f.params_magnitude * magnitude_bytes
        return states, states // 2  # foreach: sqrt(exp_avg_sq) of every tensor at once
    if optimizer == "paged_adamw_32bit":
        return 8 * sum(numels), 0
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):  # bnb: fp32 states below 4096 elements
        return sum(2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in numels), 0
    if optimizer == "adafactor":  # factored second moment, no first moment; fp32 work copies of one tensor
        states = sum(sum(s[:-1]) + s[-1] if len(s) > 1 else s[0] for s in f.trainable_shapes) * b.trainable
        return states, 3 * 4 * max(numels)
    if optimizer == "sgd":  # without momentum: nothing kept
        return 0, 0
    raise ValueError(f"no memory model for train.optimizer={optimizer}")


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


def _mlp_dtype(recipe: Recipe, b: _Bytes) -> int:
    return b.stream if recipe.method == "qlora" else b.act  # bitsandbytes linears return their input's dtype


def _layer(f: ModelFacts, recipe: Recipe, b: _Bytes, seq: int, padded: bool) -> _Layer:
    """Bytes autograd saves per token in one decoder layer (the eager s² term is per token too: x seq)."""
    a, h, i = b.act, f.hidden, f.intermediate
    full = _weights_train(recipe)
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
            kept = (1 if dropout else 0) * lin.in_features + a * lin.in_features
        if lin.lora:
            kept += a * recipe.lora.r  # lora_A's output, kept for lora_B's gradient
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


def _layer_moments(f: ModelFacts, recipe: Recipe, b: _Bytes, layer: _Layer, seq: int,
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
    mlp, down, full = _mlp_dtype(recipe, b), _down(f), _weights_train(recipe)
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


def _weights_train(recipe: Recipe) -> bool:
    """The trained tensors are the weights themselves (full, and freeze's last layers): linears save their inputs
    for the weight gradients, norms a copy for theirs."""
    return recipe.method in ("full", "freeze")


def _layers_saving(f: ModelFacts, recipe: Recipe) -> int:
    """Decoder layers whose tensors autograd saves: all of them, but only the trained ones under freeze — the
    frozen layers before them compute from inputs that need no gradient, so autograd records nothing there.
    (Under gradient checkpointing every layer's checkpoint still keeps its input, frozen or not: measured by
    scripts/bench_memory.py --cpu.)"""
    return min(recipe.freeze.layers, f.layers) if recipe.method == "freeze" else f.layers


def _activations(f: ModelFacts, recipe: Recipe, b: _Bytes, seqs: int) -> tuple[int, int, int]:
    """(saved when backward starts, held at the worst moment of backward — the final norm's, or a layer's — and at
    the worst moment of forward, 0 under checkpointing, whose recomputation in backward holds more)."""
    seq = recipe.train.max_length
    tokens = seqs * seq
    # rows padded to one length carry an attention mask (FlashAttention-2 unpads instead; packing has no padding)
    padded = (recipe.train.micro_batch > 1 and not recipe.data.packing
              and recipe.train.attn_implementation != "flash_attention_2")
    layer = _layer(f, recipe, b, seq, padded)
    full, ckpt = _weights_train(recipe), recipe.train.gradient_checkpointing
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
    if b.trainable != b.act:  # autocast's 16-bit copies of the fp32 trainables, saved for backward
        casts = b.act * (f.params_trainable if full else f.params_adapter)
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


def _loss_saved_bytes(f: ModelFacts, b: _Bytes, tokens: int, logits: str = "chunked") -> int:
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
    f, b = facts(recipe, spec), _dtype_bytes(recipe)
    seqs = stages.sequences(recipe)
    tokens = seqs * stages.tokens(recipe)
    return _activations(f, recipe, b, seqs)[0] + _loss_saved_bytes(f, b, tokens, recipe.train.logits)


def _full_logits_bytes(f: ModelFacts, b: _Bytes, tokens: int) -> int:
    """transformers' ForCausalLMLoss at its peak, log_softmax's backward: the fp32 log-probabilities it saved, their
    gradient and its own gradient — three fp32 [tokens, vocab] — with the rest of what the head saved. (Forward
    holds less: the 16-bit logits, their fp32 copy and the log-probabilities.)"""
    return 2 * 4 * tokens * f.vocab + _loss_saved_bytes(f, b, tokens, "full")


def _loss_head_bytes(f: ModelFacts, b: _Bytes, tokens: int) -> int:
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


def _zero3(dist: str) -> bool:
    """DeepSpeed ZeRO stage 3: the engine partitions the parameters themselves."""
    engine = ENGINES[dist]  # type: ignore[index]
    return engine.launcher == "deepspeed" and engine.shards_weights


def _distribute(parts: dict[str, int], f: ModelFacts, recipe: Recipe, b: _Bytes, dist: str, n: int) -> None:
    """Shard `parts` (weights, trainable_weights, gradients, optimizer, step) the way the strategy does."""
    layer = (f.params_total - f.embedding_params - f.lm_head_params) // f.layers
    gathered = 2 * max(f.largest_module_params, layer) * b.weight  # the unit in use + the one prefetched
    if dist == "ddp":
        parts["gradients"] *= 2  # DDP's flat gradient buckets are a second copy (gradient_as_bucket_view=False)
    elif dist == "fsdp":
        for term in ("weights", "trainable_weights", "gradients", "optimizer", "step"):
            parts[term] //= n
        parts["weights"] += gathered
        parts["gradients"] += gathered  # a unit's unsharded gradients before reduce-scatter
    elif ENGINES[dist].launcher == "deepspeed":  # a 16-bit engine module; the fp32 master copy and the states live in the optimizer
        if recipe.method == "full":
            parts["weights"] = f.params_total * 2 + f.buffer_bytes
        adapters = 0 if recipe.method == "full" else 2 * (f.params_adapter + f.params_magnitude)
        stage3 = n if _zero3(dist) else 1  # stage 3 partitions the parameters themselves
        bucket = 2 * 2 * f.hidden * f.hidden  # reduce bucket (HF "auto": hidden² elements), double-buffered
        if recipe.train.optimizer == "adamw_torch":
            parts["optimizer"] = 8 * f.params_trainable
        parts.update(trainable_weights=adapters // stage3 + 4 * f.params_trainable // n,
                     gradients=2 * f.params_trainable // n + bucket, optimizer=parts["optimizer"] // n, step=0)
        if _zero3(dist):
            parts["weights"] = parts["weights"] // n + gathered
        if ENGINES[dist].offload:  # parameters, master weights, states and gradient partitions: CPU memory
            parts.update(weights=gathered, trainable_weights=0, optimizer=0, gradients=bucket)


def plan(recipe: Recipe, spec: ModelSpec, *, num_gpus: int | None = None) -> MemoryPlan:
    """Per-GPU peak memory of training `recipe` on `spec` across `num_gpus` GPUs (default: the recipe's, else 1)."""
    f = facts(recipe, spec)
    b = _dtype_bytes(recipe)
    n = max(1, num_gpus or recipe.num_gpus or 1)
    dist = "ddp" if recipe.distributed == "none" and n > 1 else recipe.distributed

    magnitude_bytes = 4 if recipe.method == "qlora" else b.trainable  # TRL leaves DoRA magnitudes in fp32
    states, step = _optimizer_bytes(f, b, recipe.train.optimizer, magnitude_bytes)
    adapters = f.params_adapter * b.trainable + f.params_magnitude * magnitude_bytes
    full = recipe.method in ("full", "freeze")  # the trainables are (some of) the weights themselves
    parts = {
        "weights": _weight_bytes(f, recipe, b),
        "trainable_weights": 0 if full else adapters,  # full: the weights are the trainables
        "gradients": f.params_trainable * b.trainable if full else adapters,
        "optimizer": states,
        "step": step,
    }
    if stages.reference_copy(recipe):
        parts["weights"] += f.params_total * b.weight  # frozen reference copy (PEFT runs disable the adapters)
    _distribute(parts, f, recipe, b, dist, n)

    seqs = stages.sequences(recipe)  # chosen + rejected, KTO's KL sequences (stages.py)
    at_loss, in_layers, forward = _activations(f, recipe, b, seqs)
    tokens = seqs * stages.tokens(recipe)
    loss_head = _loss_head_bytes(f, b, tokens) if recipe.train.logits == "chunked" else _full_logits_bytes(f, b, tokens)
    generation = stages.generation_bytes(recipe, f, b.weight)  # GRPO's sampling, before its policy step
    grads_held = parts["gradients"] if recipe.train.grad_accum > 1 else 0
    steady = {"weights": parts["weights"], "trainable_weights": parts["trainable_weights"],
              "optimizer": parts["optimizer"]}
    phases = {
        "load": {"weights": parts["weights"]},
        **({"generation": {**steady, "activations": generation}} if generation else {}),
        **({"forward": {**steady, "gradients": grads_held, "activations": forward}} if forward else {}),
        "loss backward": {**steady, "gradients": grads_held, "activations": at_loss, "logits": loss_head},
        "layer backward": {**steady, "gradients": grads_held, "activations": in_layers},
        "backward end": {**steady, "gradients": parts["gradients"]},
        "optimizer step": {**steady, "gradients": parts["gradients"],
                           "optimizer": parts["optimizer"] + parts["step"]},
    }
    for moment in phases.values():
        transient = moment.get("activations", 0) + moment.get("logits", 0)
        moment["overhead"] = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * transient)
    peak = max(phases, key=lambda name: sum(phases[name].values()))
    breakdown = {term: int(phases[peak].get(term, 0)) for term in TERMS}
    return MemoryPlan(f.params_total, f.params_trainable, n, dist, breakdown, phases, peak,
                      stages.stage_terms(recipe, f, b.weight))


def term_basis(recipe: Recipe) -> dict[str, str]:
    """TERM_BASIS for this recipe: the CPU measurements at real widths cover LoRA and QLoRA, not full fine-tuning
    (checked at tiny widths only)."""
    if recipe.method != "full":
        return dict(TERM_BASIS)
    return {**TERM_BASIS, "activations": "CPU-checked at tiny widths", "logits": "CPU-checked at tiny widths"}


def model_state_bytes(p: MemoryPlan) -> int:
    """Weights + trainable weights + gradients + optimizer states once a step is done (no temporaries)."""
    end = p.phases["backward end"]
    return end["weights"] + end["trainable_weights"] + end["gradients"] + end["optimizer"]
