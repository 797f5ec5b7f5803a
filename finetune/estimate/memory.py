"""Peak GPU memory of one training run, per GPU, from the recipe alone: pure arithmetic over exact parameter facts.

What training holds, as our stack (transformers 5 + PEFT + TRL's SFTTrainer + bitsandbytes) really does it:
- Weights are loaded in the recipe's precision (bf16/fp16; fp32). Full fine-tuning in fp16 keeps fp32 weights
  (fp16 autocast: GradScaler cannot unscale fp16 gradients); full bf16 is pure bf16.
- LoRA adapters are fp32 (PEFT's autocast_adapter_dtype), bf16 under QLoRA (TRL casts them; DoRA magnitudes
  stay fp32) and under ZeRO-3 (TRL). Gradients and AdamW states have the dtype of their parameter.
- QLoRA: transformers' bitsandbytes quantizer decides what is not quantized (embeddings, lm_head, norms,
  biases); those stay 16-bit (finetune/train/sft.py does not run peft.prepare_model_for_kbit_training, which
  would make them — and with them the residual stream — fp32: QLORA_UPCAST). NF4/FP4 stores
  0.5 byte per weight + an fp32 absmax per 64-block (double quant: 1 byte per block + an fp32 absmax per 256
  blocks); LLM.int8 stores 1 byte per weight + an fp32 scale per row.
- Activations: what autograd saves per decoder layer (checked against saved-tensor hooks in
  tests/unit/test_estimate_memory.py); with gradient checkpointing each layer's input plus one layer recomputed.
  SDPA/flash keep no s² matrix; eager keeps the fp32 softmax and its 16-bit copy for every head.
- Loss: TRL's fused LM head never builds the [tokens, vocab] logits; it works in [4096, 32768] tiles and, for
  full fine-tuning, accumulates the lm_head gradient in an fp32 [vocab, hidden] buffer.

The peak is the largest of five moments of a step, not the sum of every term:
  load            weights (+ quantization constants)
  loss backward   every saved activation + the loss head's backward buffers (+ states from step 2 on, + the
                  gradients while they are being accumulated)
  layer backward  the saved activations + one layer recomputed (checkpointing) + the gradients in flight
                  through it
  backward end    all gradients, the activations gone
  optimizer step  gradients + states + the optimizer's temporaries (foreach AdamW: one state-sized tensor)
Every moment also carries `overhead`: the CUDA context plus allocator fragmentation on the transient part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from finetune.config import Recipe
from finetune.estimate.params import ModelFacts, facts
from finetune.models.registry import ModelSpec

GiB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2  # CUDA context + cuBLAS handles (torch 2.x, lazy module loading)
FRAGMENTATION = 0.08  # caching-allocator excess (reserved over allocated) on the transient part
TERMS = ("weights", "trainable_weights", "gradients", "optimizer", "activations", "logits", "overhead")
DEEPSPEED = ("zero2", "zero3", "zero3_offload")
ZERO3 = ("zero3", "zero3_offload")
LOSS_TILE = (4096, 32768)  # TRL's fused LM head: tokens x vocabulary columns per projection tile
FLASH_MAX_HEAD_DIM = 256  # above it SDPA falls back to kernels without native GQA


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


QLORA_UPCAST = False
"""Whether a QLoRA model's 16-bit parts (embeddings, lm_head, norms, and so the residual stream) are fp32, as
peft.prepare_model_for_kbit_training makes them. finetune/train/sft.py does not call it (TRL keeps them 16-bit),
so plan() follows; True models trainers that do."""


def _dtype_bytes(recipe: Recipe, kbit_upcast: bool = QLORA_UPCAST) -> _Bytes:
    if recipe.train.precision == "fp32":
        return _Bytes(4, 4, 4, 4)
    if recipe.method == "full":
        weight = 4 if recipe.train.precision == "fp16" else 2  # GradScaler cannot unscale fp16 gradients
        return _Bytes(weight, weight, weight, 2)
    if recipe.method == "qlora":  # TRL casts the adapters to bf16 on a quantized base
        return _Bytes(2, 4 if kbit_upcast else 2, 2, 2)
    return _Bytes(2, 2, 2 if recipe.distributed in ZERO3 else 4, 2)  # PEFT's fp32 adapters; TRL's bf16 on ZeRO-3


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
    return 0, 0  # sgd without momentum keeps nothing


def _layer_activation_bytes(f: ModelFacts, recipe: Recipe, b: _Bytes, seq: int, padded: bool) -> float:
    """Bytes autograd saves per token in one decoder layer (the eager s² term is per token too: x seq)."""
    a, h, i = b.act, f.hidden, f.intermediate
    full = recipe.method == "full"
    eager = recipe.train.attn_implementation == "eager"
    kv = f.heads if eager or padded or f.attention_mask_per_head or f.head_dim > FLASH_MAX_HEAD_DIM else f.kv_heads
    mlp = b.stream if recipe.method == "qlora" else a  # bitsandbytes linears return their input's dtype
    total = 2 * (4 * h + (b.kept * h if full else 0))  # two RMSNorms: fp32 input (+ the copy a norm weight needs)
    total += 3 * mlp * i  # gate (or gate_up) output, its activation, the up output
    total += a * (f.heads + 2 * kv) * f.head_dim  # q, k after rotary; v (repeated for eager / masked SDPA)
    if eager:  # fp32 softmax and its 16-bit copy for the value matmul
        total += (4 + (a if a != 4 else 0)) * f.heads * seq
    else:  # the kernel's output (o_proj reads it in place) and one fp32 logsumexp per head
        total += a * f.heads * f.head_dim + 4 * f.heads
    dropout = recipe.lora.dropout > 0
    saved_groups: set[int] = set()
    for lin in f.block_linears:
        source = {"norm": b.stream, "attention": a, "mlp": mlp}[lin.reads]  # dtype of the tensor it reads
        if full or (lin.lora and not dropout and b.trainable == source):
            # the input itself, once per group of linears reading it (autocast makes one cast copy each)
            if source != a:
                total += a * lin.in_features
            elif lin.group not in saved_groups and not (lin.reads == "attention" and not eager):
                saved_groups.add(lin.group)
                total += a * lin.in_features
        elif lin.lora:  # each adapter keeps its own dropped-out / cast copy (+ dropout's boolean mask)
            total += (1 if dropout else 0) * lin.in_features + a * lin.in_features
        if lin.lora:
            total += a * recipe.lora.r  # lora_A's output, kept for lora_B's gradient
            if recipe.lora.dora:
                total += 2 * a * lin.out_features  # base and adapter results, rescaled by the magnitude
    return total


def _activations(f: ModelFacts, recipe: Recipe, b: _Bytes, seqs: int) -> tuple[int, int]:
    """(saved at the start of backward, held while backward crosses a layer)."""
    seq = recipe.train.max_length
    tokens = seqs * seq
    # rows padded to one length carry an attention mask (FlashAttention-2 unpads instead; packing has no padding)
    padded = (recipe.train.micro_batch > 1 and not recipe.data.packing
              and recipe.train.attn_implementation != "flash_attention_2")
    layer = _layer_activation_bytes(f, recipe, b, seq, padded) * tokens
    if recipe.train.gradient_checkpointing:
        saved, recompute = f.layers * b.stream * f.hidden * tokens, layer
    else:
        saved, recompute = f.layers * layer, 0
    saved += (4 + (b.kept if recipe.method == "full" else 0)) * f.hidden * tokens  # final norm
    saved += 2 * b.stream * f.head_dim * tokens  # rotary cos/sin, shared by the layers
    casts = 0
    if b.trainable != b.act:  # autocast's 16-bit copies of the fp32 trainables, saved for backward
        casts = b.act * (f.params_trainable if recipe.method == "full" else f.params_adapter)
        if recipe.train.gradient_checkpointing:  # made again with each recomputed layer
            casts, recompute = 0, recompute + casts // f.layers
    saved += casts
    if f.attention_mask_per_head:  # ALiBi: an additive [b, heads, s, s] mask in the stream's dtype
        mask = seqs * f.heads * seq * seq
        if b.stream == b.act:  # one tensor, shared by every layer
            saved += mask * b.act
        elif recipe.train.gradient_checkpointing:  # kept for recomputation; autocast casts it in the layer
            saved, recompute = saved + mask * b.stream, recompute + mask * b.act
        else:  # autocast gives every layer's attention its own 16-bit copy, and each one is saved
            saved += f.layers * mask * b.act
    elif recipe.train.attn_implementation == "eager" and recipe.train.gradient_checkpointing:
        saved += seqs * seq * seq * b.act  # additive causal mask, kept as an input of every checkpointed layer
    elif padded:
        saved += seqs * seq * seq  # boolean padding mask
    working = 3 * b.act * f.intermediate + 4 * b.act * f.hidden + 4 * f.heads * f.head_dim
    if recipe.train.attn_implementation == "eager":
        working += (8 + b.act) * f.heads * seq  # softmax backward in fp32
    in_layer = recompute + working * tokens
    if recipe.lora.dora and recipe.method != "full":  # DoRA rebuilds each adapted weight to take its norm
        in_layer += max(lin.in_features * lin.out_features for lin in f.block_linears if lin.lora) * (4 + b.weight)
    return int(saved), int(saved + in_layer)


def _loss_saved_bytes(f: ModelFacts, b: _Bytes, tokens: int) -> int:
    """What TRL's fused LM head saves for backward: the final hidden states, targets, logsumexp, entropy."""
    return tokens * (b.stream * f.hidden + 16)


def saved_after_forward(recipe: Recipe, spec: ModelSpec) -> int:
    """Bytes autograd holds when one micro-batch's forward ends: the part of the activation model a CPU can
    check exactly (saved-tensor hooks; tests/unit/test_estimate_memory.py)."""
    f, b = facts(recipe, spec), _dtype_bytes(recipe)
    seqs = recipe.train.micro_batch * (2 if recipe.stage == "dpo" else 1)
    return _activations(f, recipe, b, seqs)[0] + _loss_saved_bytes(f, b, seqs * recipe.train.max_length)


def _loss_head_bytes(f: ModelFacts, b: _Bytes, tokens: int) -> int:
    """TRL's fused LM head at the start of backward: the compacted hidden states and targets it saved, one
    logits tile, the fp32 hidden-state gradient (+ its cast) and, when lm_head trains, its fp32 gradient + cast."""
    h, a, s = f.hidden, b.act, b.stream
    tile = min(tokens, LOSS_TILE[0]) * min(f.vocab, LOSS_TILE[1]) * a
    if b.kept != a:
        tile += min(f.vocab, LOSS_TILE[1]) * h * a  # the weight chunk cast to the compute dtype
    total = _loss_saved_bytes(f, b, tokens) + tile + tokens * h * (4 + (s if s != 4 else 0))
    if f.lm_head_trainable:
        total += f.vocab * h * (4 + (b.trainable if b.trainable != 4 else 0))
    return total


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
    elif dist in DEEPSPEED:  # a 16-bit engine module; the fp32 master copy and the states live in the optimizer
        if recipe.method == "full":
            parts["weights"] = f.params_total * 2 + f.buffer_bytes
        adapters = 0 if recipe.method == "full" else 2 * (f.params_adapter + f.params_magnitude)
        stage3 = n if dist in ZERO3 else 1  # stage 3 partitions the parameters themselves
        bucket = 2 * 2 * f.hidden * f.hidden  # reduce bucket (HF "auto": hidden² elements), double-buffered
        if recipe.train.optimizer == "adamw_torch":
            parts["optimizer"] = 8 * f.params_trainable
        parts.update(trainable_weights=adapters // stage3 + 4 * f.params_trainable // n,
                     gradients=2 * f.params_trainable // n + bucket, optimizer=parts["optimizer"] // n, step=0)
        if dist in ZERO3:
            parts["weights"] = parts["weights"] // n + gathered
        if dist == "zero3_offload":  # parameters, master weights, states and gradient partitions: CPU memory
            parts.update(weights=gathered, trainable_weights=0, optimizer=0, gradients=bucket)


def plan(recipe: Recipe, spec: ModelSpec, *, num_gpus: int | None = None,
         kbit_upcast: bool = QLORA_UPCAST) -> MemoryPlan:
    """Per-GPU peak memory of training `recipe` on `spec` across `num_gpus` GPUs (default: the recipe's, else 1).
    `kbit_upcast=False` plans QLoRA as trainers that keep the non-quantized weights in 16-bit do (TRL alone,
    torchtune)."""
    f = facts(recipe, spec)
    b = _dtype_bytes(recipe, kbit_upcast)
    n = max(1, num_gpus or recipe.num_gpus or 1)
    dist = "ddp" if recipe.distributed == "none" and n > 1 else recipe.distributed

    magnitude_bytes = 4 if recipe.method == "qlora" else b.trainable  # TRL leaves DoRA magnitudes in fp32
    states, step = _optimizer_bytes(f, b, recipe.train.optimizer, magnitude_bytes)
    adapters = f.params_adapter * b.trainable + f.params_magnitude * magnitude_bytes
    full = recipe.method == "full"
    parts = {
        "weights": _weight_bytes(f, recipe, b),
        "trainable_weights": 0 if full else adapters,  # full: the weights are the trainables
        "gradients": f.params_trainable * b.trainable if full else adapters,
        "optimizer": states,
        "step": step,
    }
    if recipe.stage == "dpo" and recipe.method == "full":
        parts["weights"] += f.params_total * b.weight  # frozen reference copy (PEFT runs disable the adapters)
    _distribute(parts, f, recipe, b, dist, n)

    seqs = recipe.train.micro_batch * (2 if recipe.stage == "dpo" else 1)  # DPO: chosen + rejected
    at_loss, in_layers = _activations(f, recipe, b, seqs)
    loss_head = _loss_head_bytes(f, b, seqs * recipe.train.max_length)
    grads_held = parts["gradients"] if recipe.train.grad_accum > 1 else 0
    steady = {"weights": parts["weights"], "trainable_weights": parts["trainable_weights"],
              "optimizer": parts["optimizer"]}
    phases = {
        "load": {"weights": parts["weights"]},
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
    return MemoryPlan(f.params_total, f.params_trainable, n, dist, breakdown, phases, peak)


def model_state_bytes(p: MemoryPlan) -> int:
    """Weights + trainable weights + gradients + optimizer states once a step is done (no temporaries)."""
    end = p.phases["backward end"]
    return end["weights"] + end["trainable_weights"] + end["gradients"] + end["optimizer"]
