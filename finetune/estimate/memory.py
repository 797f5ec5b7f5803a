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

import functools
import json
import math
from dataclasses import dataclass, field

from finetune import shipped
from finetune.config import Recipe
from finetune.engines import ENGINES, zero3
from finetune.estimate import stages
from finetune.estimate.activations import (
    Bytes,
    activation_moments,
    dtype_bytes,
    full_logits_bytes,
    loss_head_bytes,
)
from finetune.estimate.params import ModelFacts, facts
from finetune.models.registry import ModelSpec
from finetune.schema import trains_weights
from finetune.stages import keeps_reference_copy

GiB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2  # CUDA context + cuBLAS handles (torch 2.x, lazy module loading)
FRAGMENTATION = 0.08  # caching-allocator excess (reserved over allocated) on the transient part
TERMS = ("weights", "trainable_weights", "gradients", "optimizer", "activations", "logits", "overhead")
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


def _weight_bytes(f: ModelFacts, recipe: Recipe, b: Bytes) -> int:
    if recipe.method != "qlora":
        return f.params_total * b.weight + f.buffer_bytes
    kept = (f.params_total - f.params_quantized) * b.kept
    quantized = _quantized_weight_bytes(f.quantized_numels, recipe.quant.bits, recipe.quant.double_quant,
                                       f.quantized_rows)
    return kept + quantized + f.buffer_bytes


def _optimizer_bytes(f: ModelFacts, b: Bytes, optimizer: str, magnitude_bytes: int) -> tuple[int, int]:
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


@functools.cache
def _zero3_limits(dist: str) -> tuple[float, float]:
    """(stage3_max_reuse_distance, stage3_max_live_parameters) of the engine's shipped DeepSpeed JSON."""
    path = shipped.RECIPES / "deepspeed" / str(ENGINES[dist].deepspeed_config)
    zero = json.loads(path.read_text())["zero_optimization"]
    return float(zero.get("stage3_max_reuse_distance", 1e9)), float(zero.get("stage3_max_live_parameters", 1e9))


def gathered_bytes(f: ModelFacts, b: Bytes, dist: str) -> int:
    """Whole (gathered) parameters a rank holds besides its shards while a unit runs, under ZeRO-3 or FSDP.

    FSDP: the unit in use and the one prefetched (the larger of the largest module and a decoder layer, twice).
    ZeRO-3 keeps more: after a module runs, DeepSpeed releases its gathered parameters only when the step's trace
    does not use them again within stage3_max_reuse_distance parameters fetched (deepspeed
    partitioned_param_coordinator.py `__params_to_release`). A module used in the forward comes back in the backward
    once the parameters behind it were fetched twice (forward on, backward back), so at the loss head the lm_head is
    held with every decoder layer, and the embedding, whose way back fits the distance: the whole model for models
    up to half the distance (the shipped 1e9: up to 500M parameters, as measured on 2 CPU ranks), no more than
    FSDP's two units for Qwen2.5-7B, whose lm_head alone is 545M. At most stage3_max_live_parameters."""
    layer, unit = _layer_and_unit(f)
    units = 2 * unit
    if not zero3(dist):
        return units * b.weight
    reuse, live = _zero3_limits(dist)
    head = f.lm_head_params or f.embedding_params  # tied: the embedding is the head
    held = behind = head
    for _ in range(f.layers):
        if 2 * behind > reuse:
            break
        held, behind = held + layer, behind + layer
    if f.lm_head_params and 2 * behind <= reuse:
        held += f.embedding_params
    return int(max(min(held, live), units)) * b.weight


def _layer_and_unit(f: ModelFacts) -> tuple[int, int]:
    """(a decoder layer's parameters, the larger of that and the largest module): the unit a sharding engine
    gathers at once."""
    layer = (f.params_total - f.embedding_params - f.lm_head_params) // f.layers
    return layer, max(f.largest_module_params, layer)


def _distribute(parts: dict[str, int], f: ModelFacts, recipe: Recipe, b: Bytes, dist: str, n: int) -> None:
    """Shard `parts` (weights, trainable_weights, gradients, optimizer, step) the way the strategy does; where the
    optimizer step holds other gradients than the backward's end, `step_gradients` says how many."""
    if dist == "ddp":
        parts["gradients"] *= 2  # DDP's flat gradient buckets are a second copy (gradient_as_bucket_view=False)
    elif dist == "fsdp":
        for term in ("weights", "trainable_weights", "gradients", "optimizer", "step"):
            parts[term] //= n
        parts["weights"] += gathered_bytes(f, b, dist)
        # one unit's unsharded buffer in the weights' dtype stays alive as the optimizer steps (measured on 2 CPU
        # ranks, bench_memory_ranks.py: for full fine-tuning the gradients of that unit before reduce-scatter; with
        # LoRA, where no frozen weight has a gradient, a buffer of the same size)
        parts["gradients"] += _layer_and_unit(f)[1] * b.weight
    elif ENGINES[dist].launcher == "deepspeed":
        # a 16-bit engine module; the fp32 master copy and the states live in the optimizer
        if recipe.method == "full":
            parts["weights"] = f.params_total * 2 + f.buffer_bytes
        adapters = 0 if recipe.method == "full" else 2 * (f.params_adapter + f.params_magnitude)
        stage3 = n if zero3(dist) else 1  # stage 3 partitions the parameters themselves
        bucket = 2 * 2 * f.hidden * f.hidden  # reduce bucket (HF "auto": hidden² elements), double-buffered
        partition = f.params_trainable // n
        if recipe.train.optimizer == "adamw_torch":
            parts["optimizer"] = 8 * f.params_trainable
        # As the optimizer steps: the 16-bit gradient partition and its fp32 copy that the optimizer steps with
        # (stage_1_and_2.py `single_grad_partition`, stage3.py `_prepare_fp32_grad_for_sub_group`); ZeRO-3 keeps
        # its reduce bucket (IPGBucketZ3). torch's foreach AdamW then makes one temporary the size of the fp32
        # partition (sqrt of exp_avg_sq).
        step = 4 * partition if recipe.train.optimizer == "adamw_torch" else 0
        parts.update(trainable_weights=adapters // stage3 + 4 * partition,
                     gradients=2 * partition + bucket, optimizer=parts["optimizer"] // n, step=step,
                     step_gradients=6 * partition + (bucket if zero3(dist) else 0))
        gathered = gathered_bytes(f, b, dist) if zero3(dist) else 0
        if zero3(dist):
            parts["weights"] = parts["weights"] // n + gathered
        if ENGINES[dist].offload:  # parameters, master weights, states and gradient partitions: CPU memory
            parts.update(weights=gathered, trainable_weights=0, optimizer=0, gradients=bucket, step_gradients=bucket,
                         step=0)


def plan(recipe: Recipe, spec: ModelSpec, *, num_gpus: int | None = None) -> MemoryPlan:
    """Per-GPU peak memory of training `recipe` on `spec` across `num_gpus` GPUs (default: the recipe's, else 1)."""
    f = facts(recipe, spec)
    b = dtype_bytes(recipe)
    n = max(1, num_gpus or recipe.num_gpus or 1)
    dist = "ddp" if recipe.distributed == "none" and n > 1 else recipe.distributed

    magnitude_bytes = 4 if recipe.method == "qlora" else b.trainable  # TRL leaves DoRA magnitudes in fp32
    states, step = _optimizer_bytes(f, b, recipe.train.optimizer, magnitude_bytes)
    adapters = f.params_adapter * b.trainable + f.params_magnitude * magnitude_bytes
    full = trains_weights(recipe.method)  # the trainables are (some of) the weights themselves
    parts = {
        "weights": _weight_bytes(f, recipe, b),
        "trainable_weights": 0 if full else adapters,  # full: the weights are the trainables
        "gradients": f.params_trainable * b.trainable if full else adapters,
        "optimizer": states,
        "step": step,
    }
    if keeps_reference_copy(recipe):
        parts["weights"] += f.params_total * b.weight  # frozen reference copy (PEFT runs disable the adapters)
    _distribute(parts, f, recipe, b, dist, n)
    step_gradients = parts.pop("step_gradients", parts["gradients"])

    seqs = stages.sequences(recipe)  # chosen + rejected, KTO's KL sequences (stages.py)
    at_loss, in_layers, forward = activation_moments(f, recipe, b, seqs)
    tokens = seqs * stages.tokens(recipe)
    loss_head = loss_head_bytes(f, b, tokens) if recipe.train.logits == "chunked" else full_logits_bytes(f, b, tokens)
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
        "optimizer step": {**steady, "gradients": step_gradients,
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
