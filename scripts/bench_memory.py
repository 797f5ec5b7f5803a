"""Measure the real peak memory of training and set it against `finetune estimate`: on a GPU, or on a CPU at real
widths.

Weights of the real shapes filled with a constant (memory does not depend on weight values), built from the registry's
shipped configs through `native_config` — no download. The model is prepared the way our trainer prepares it
(weights in the recipe's precision; bitsandbytes' quantizer on the linears transformers would quantize, the
16-bit parts left 16-bit as finetune/train/sft.py leaves them, or fp32 with quant.upcast; PEFT LoRA; TRL's
chunked loss, or the model's own loss on full logits with train.logits=full; gradient checkpointing; the
trainer's optimizer class), then a few optimizer steps run on random tokens of full length. One process runs
every cell; each cell frees its memory, and an OOM or any other failure is recorded for that cell instead of
ending the run.

    python scripts/bench_memory.py --models qwen2_5_0_5b,qwen2_5_7b --methods lora,qlora --seqs 512,2048 \
        --ckpt on,off --out docs/bench_memory.md
    python scripts/bench_memory.py --cpu --out docs/memory.md        # no GPU: every term at real widths, on CPU
    python scripts/bench_memory.py --published docs/memory.md   # no GPU needed: estimates vs published tables

On a GPU, measured = torch.cuda.max_memory_reserved + the CUDA context (device memory in use before the first
tensor). Paged optimizers (paged_adamw_*) allocate their states in CUDA unified memory, which torch does not count:
their cells compare max_memory_reserved against the estimate without the optimizer states. The CPU mode is
described in its own section below.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import gc
import io
import itertools
import os
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from finetune import config
from finetune.config import Recipe
from finetune.estimate.memory import CUDA_CONTEXT_BYTES, GiB, plan
from finetune.models import registry
from finetune.models.native import native_config
from finetune.models.registry import ModelSpec
from finetune.plan import ModelPlan, model_plan
from finetune.schema import trains_weights
from finetune.train.model import DTYPES, STORAGE, bnb_config, freeze_all_but_last, peft_config

STD = 0.02


def build(recipe: Recipe, spec: ModelSpec, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A random-init model prepared as training prepares it, and the optimizer the trainer would create."""
    model = prepare(recipe, spec, device)
    return model, _optimizer(model, recipe, spec)


def prepare(recipe: Recipe, spec: ModelSpec, device: str) -> torch.nn.Module:
    """A random-init model built from the recipe's plan (finetune.plan), as training builds it
    (finetune/train/model.py, then TRL's trainer): its head, dtypes, quantization, what trains and the adapter."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights
    from trl.trainer.utils import add_fused_lm_head

    planned = model_plan(recipe, spec)
    cfg = native_config(spec)
    cfg._attn_implementation = recipe.train.attn_implementation
    auto = AutoModelForCausalLM
    if planned.head == "value":
        cfg.num_labels, auto = 1, AutoModelForSequenceClassification
    with torch.device(device), no_init_weights():
        model = auto.from_config(cfg, dtype=DTYPES[planned.load_dtype])
    model.tie_weights()  # skipped with the initialisation
    for param in model.parameters():
        param.data.fill_(STD)  # memory does not depend on the values: a constant is fast and keeps the loss finite
    if planned.quant:
        _quantize(model, planned, device)  # 16-bit parts stay 16-bit, as load_model leaves them
        if planned.upcast:  # ... unless the recipe asks for the fp32 upcast, as load_model then does
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    if planned.head == "causal_lm":
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    if planned.trains == "last_layers":
        freeze_all_but_last(model, planned.freeze_layers or 0, keep=planned.full_modules)
    elif planned.lora:
        model = _add_lora(model, planned)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if planned.lora:  # adapters on a frozen base: the inputs carry the gradient
            model.enable_input_require_grads()
    model.train()
    return model


def _quantize(model: torch.nn.Module, planned: ModelPlan, device: str) -> None:
    """bitsandbytes linears where transformers' quantizer puts them, filled with random values, quantized."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    quant, dtype = planned.quant, DTYPES[planned.load_dtype]
    assert quant is not None
    skip = Bnb4BitHfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_config(planned))
    for module in model.modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        data = torch.full((module.out_features, module.in_features), STD, dtype=dtype, device=device)
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type=quant.type,
                                              compress_statistics=quant.double_quant,
                                              quant_storage=STORAGE[planned.quant_storage]).to(device)
        else:
            module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False).to(device)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=device),
                                             requires_grad=False)
        del data
    model.is_loaded_in_4bit = quant.bits == 4
    model.is_loaded_in_8bit = quant.bits == 8


def _add_lora(model: torch.nn.Module, planned: ModelPlan) -> torch.nn.Module:
    """PEFT LoRA as TRL's trainer leaves it: the plan's adapter (finetune.train.model.peft_config) in the plan's
    dtypes (finetune.plan: bf16 on a quantized base with DoRA magnitudes in fp32, else PEFT's fp32 unless ZeRO-3)."""
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(planned), autocast_adapter_dtype=False)  # the plan names the dtype
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" in name:  # a value head beside them keeps the base's dtype
            magnitude = "lora_magnitude_vector" in name
            param.data = param.data.to(DTYPES[planned.magnitude_dtype if magnitude else planned.trained_dtype])
    return model


def _optimizer(model: torch.nn.Module, recipe: Recipe, spec: ModelSpec) -> torch.optim.Optimizer:
    """The optimizer class and arguments transformers' Trainer builds for the plan's `optim` (the name training
    passes for recipe.train.optimizer)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.gettempdir(), optim=model_plan(recipe, spec).optim,
                             learning_rate=recipe.train.lr, weight_decay=recipe.train.weight_decay,
                             report_to=[], use_cpu=not torch.cuda.is_available())
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def micro_step(model: torch.nn.Module, recipe: Recipe, device: str, gen: torch.Generator,
               scaler: torch.amp.GradScaler) -> None:
    """Forward and backward of one micro-batch of full-length random tokens, under the trainer's autocast."""
    scaler.scale(forward_loss(model, recipe, device, gen) / recipe.train.grad_accum).backward()


def forward_loss(model: torch.nn.Module, recipe: Recipe, device: str, gen: torch.Generator, *,
                 mask: bool = True) -> torch.Tensor:
    """The loss of one micro-batch, computed as the trainer computes it: TRL's chunked head, or the model's own
    loss on materialized logits for train.logits=full (finetune/train/sft.py). `mask=False` passes no attention
    mask: what transformers makes of an all-ones one, when fake tensors hide that it is all ones."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (recipe.train.micro_batch, recipe.train.max_length), generator=gen).to(device)
    fused = recipe.train.logits == "chunked"
    ones = {"attention_mask": torch.ones_like(ids)} if mask else {}
    autocast = model_plan(recipe, None).autocast  # the trainer's mixed precision: the recipe's alone
    with torch.autocast(device, dtype=DTYPES[autocast or "fp32"], enabled=autocast is not None):
        return model(input_ids=ids, labels=ids, fused_lm_head=fused, **ones).loss


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe, steps: int,
                device: str) -> None:
    """`steps` optimizer steps of grad_accum micro-batches each, clipped, as the trainer runs them."""
    scaler = torch.amp.GradScaler(device, enabled=recipe.train.precision == "fp16")
    gen = torch.Generator(device="cpu").manual_seed(recipe.seed)
    for _ in range(steps):
        for _ in range(recipe.train.grad_accum):
            micro_step(model, recipe, device, gen, scaler)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       recipe.train.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[int, int]:
    """Storage -> bytes of everything a trained model holds between steps: parameters, buffers, gradients,
    optimizer states and bitsandbytes quantization constants (each storage once; fake tensors too)."""
    found: dict[int, int] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            found[storage._cdata] = storage.nbytes()
        elif hasattr(t, "absmax"):  # a bitsandbytes QuantState
            for value in vars(t).values():
                add(value)

    for p in itertools.chain(model.parameters(), model.buffers()):
        add(p)
        add(p.grad)
        add(getattr(p, "quant_state", None))
        add(getattr(p, "SCB", None))
    for state in (optimizer.state.values() if optimizer else ()):
        for value in state.values():
            add(value)
    return found


@dataclass
class Cell:
    model: str
    method: str
    seq: int
    ckpt: bool
    micro_batch: int
    overrides: tuple[str, ...] = ()

    def recipe(self) -> Recipe:
        base = {"full": "base/full", "lora": "base/lora", "qlora": "base/qlora"}[self.method]
        return config.load(base, [f"model={self.model}", f"train.max_length={self.seq}",
                                  f"train.gradient_checkpointing={self.ckpt}",
                                  f"train.micro_batch={self.micro_batch}", "train.grad_accum=1",
                                  "distributed=none", "num_gpus=1", *self.overrides])


def measure(cell: Cell, steps: int, context_bytes: int) -> dict:
    recipe = cell.recipe()
    spec = registry.spec(recipe.model, recipe.variant)
    estimate = plan(recipe, spec, num_gpus=1)
    row = {"model": cell.model, "method": cell.method, "seq": cell.seq, "ckpt": cell.ckpt,
           "micro_batch": cell.micro_batch, "overrides": " ".join(cell.overrides),
           "estimate_gib": round(estimate.peak_bytes / GiB, 2), "peak_phase": estimate.peak_phase}
    paged = recipe.train.optimizer.startswith("paged")
    model = optimizer = None
    try:
        model, optimizer = build(recipe, spec, "cuda")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train_steps(model, optimizer, recipe, steps, "cuda")
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        compared = estimate.peak_bytes - (estimate.breakdown["optimizer"] if paged else 0)
        measured = reserved + context_bytes
        row.update(status="ok", allocated_gib=round(allocated / GiB, 2), reserved_gib=round(reserved / GiB, 2),
                   measured_gib=round(measured / GiB, 2), error_pct=round(100 * (compared - measured) / measured, 1),
                   seconds=round(time.perf_counter() - start, 1))
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM")
    except Exception as exc:  # one broken cell must not lose the others' results
        row.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    finally:
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()
    return row


COLUMNS = ("model", "method", "seq", "ckpt", "micro_batch", "overrides", "estimate_gib", "peak_phase",
           "allocated_gib", "reserved_gib", "measured_gib", "error_pct", "seconds", "status")


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Measured on {device}, torch {torch.__version__}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ CPU mode: real widths, no GPU
# What a step allocates depends on shapes, dtypes and lifetimes, never on the values computed. So the model is
# built for real at its real widths (1-2 decoder layers, the real embedding and head; quantized, upcast and
# adapted as training does), every tensor is then swapped for a fake one of the same device, shape and dtype
# (torch's FakeTensorMode), and one forward + backward runs through the real transformers, PEFT, bitsandbytes,
# TRL and autograd code: the same ops make and free the same tensors, minus the arithmetic (bf16 matmuls at 7B
# widths take hours on a CPU without bf16 units). A dispatch-level tracker records every storage an op creates
# and the moment it is freed: the allocator's view of the step. Kernels' private workspaces are not outputs of an
# op, so they are not seen (on a GPU: cuBLAS workspaces, FlashAttention's fp32 dq accumulator) — they belong to the
# CUDA-side terms that only the GPU benchmark measures.

CPU_MODELS = ("qwen2_5_7b", "llama2_7b")
CPU_SEQS = (512, 2048, 8192)
CPU_LAYERS = 2
CPU_SETTINGS = {  # name -> overrides; every one with train.logits=chunked and =full
    "lora": ["method=lora"],
    "qlora": ["method=qlora"],
    "qlora upcast": ["method=qlora", "quant.upcast=true"],
    "freeze": ["method=freeze", "freeze.layers=1"],  # the last of CPU_LAYERS=2 trains, the first is frozen
}
CPU_COLUMNS = ("weights", "activations", "logits", "layer backward", "step peak")
"""What the CPU mode compares: the frozen weights, what autograd saves for backward (the backbone's), the loss
head's own bytes on top of them, the peak while backward crosses the decoder layers, and the step's peak."""


def with_layers(name: str, layers: int, **config: int) -> ModelSpec:
    """A registry model cut to `layers` decoder layers (and any other config change): real widths and vocabulary,
    counted by the estimator from the same config."""
    base = registry.spec(name)
    return ModelSpec(base.family, base.model, dataclasses.replace(
        base.variant, name=f"{layers}_layers", config_overrides={**base.variant.config_overrides,
                                                                   "num_hidden_layers": layers, **config}))


def to_fake(model: torch.nn.Module) -> FakeTensorMode:
    """Swap every parameter, buffer and quantization constant of `model` for a fake tensor of the same device,
    shape and dtype; the real ones are freed. Run the model under the returned mode."""
    mode = FakeTensorMode()
    swapped: dict[int, torch.nn.Parameter] = {}  # tied weights stay one tensor
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) not in swapped:
                fake = torch.nn.Parameter(mode.from_tensor(param.data), requires_grad=param.requires_grad)
                if getattr(param, "quant_state", None) is not None:
                    fake.quant_state = _fake_state(param.quant_state, mode)
                swapped[id(param)] = fake
            if param is not None:
                module._parameters[name] = swapped[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = mode.from_tensor(buffer)
    return mode


def _fake_state(state: object, mode: FakeTensorMode) -> object:
    """A bitsandbytes QuantState whose tensors (absmax, code, the nested state of double quantization) are fake."""
    fake = copy.copy(state)
    for key, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            setattr(fake, key, mode.from_tensor(value))
        elif hasattr(value, "absmax"):
            setattr(fake, key, _fake_state(value, mode))
    return fake


class Timeline(TorchDispatchMode):
    """Every storage the ops of a step create, in order, and when each is freed (a view or an in-place result is no
    new memory). Phases are marked as the step reaches them; allocations inside `cpu_only()` are kept apart."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes when made, -bytes when freed)
        self.marks: dict[str, int] = {}  # phase -> index of its first event
        self.cpu_only: set[int] = set()
        self._live: dict[int, int] = {}  # StorageImpl address -> allocation id, while alive
        self._quiet = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # a view or an in-place result shares its input's storage: no new memory
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._made(t.untyped_storage())
        return out

    def _made(self, storage: torch.UntypedStorage) -> None:
        address = storage._cdata
        if address in self._live:
            return
        uid, nbytes = len(self.events), storage.nbytes()
        self._live[address] = uid
        self.events.append((uid, nbytes))
        if self._quiet:
            self.cpu_only.add(uid)
        weakref.finalize(storage, self._freed, address, uid, nbytes)

    def _freed(self, address: int, uid: int, nbytes: int) -> None:
        if self._live.get(address) == uid:
            del self._live[address]
        self.events.append((uid, -nbytes))

    def uid(self, t: torch.Tensor) -> int | None:
        """The allocation holding `t`, if this step made it."""
        return self._live.get(t.untyped_storage()._cdata)

    def mark(self, phase: str) -> None:
        self.marks.setdefault(phase, len(self.events))

    @contextlib.contextmanager
    def quiet(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def live_at(self, index: int) -> dict[int, int]:
        """Allocation id -> bytes of what is alive when event `index` happens."""
        live: dict[int, int] = {}
        for uid, delta in self.events[:index]:
            if delta > 0:
                live[uid] = delta
            else:
                live.pop(uid, None)
        return live

    def phases(self, without: set[int]) -> dict[str, tuple[int, int]]:
        """(live bytes at its mark, peak live bytes) of every phase, leaving out `without` and CPU-only storages."""
        skip = without | self.cpu_only
        order = sorted(self.marks.items(), key=lambda kv: kv[1])
        bounds = {name: (start, order[i + 1][1] if i + 1 < len(order) else len(self.events))
                  for i, (name, start) in enumerate(order)}
        live, totals = 0, []
        for uid, delta in self.events:
            totals.append(live)
            live += 0 if uid in skip else delta
        totals.append(live)
        return {name: (totals[start], max(totals[start:end + 1])) for name, (start, end) in bounds.items()}


CPU_ONLY_TILE_CODE = ("_forward_tile", "_backward_tile", "_addmm_fp32")
"""TRL's chunked loss folds each logits tile in a Triton kernel on a GPU (registers only, and an fp32-output
addmm); without Triton, as on a CPU, torch ops do it and make fp32 copies of every [4096, 32768] tile. Those
copies exist on a CPU only, so the timeline keeps them apart."""


@contextlib.contextmanager
def _tiles_cpu_only(timeline: Timeline):
    from trl.kernels import chunked_logprob

    originals = {name: getattr(chunked_logprob, name) for name in CPU_ONLY_TILE_CODE}

    def quiet(fn):
        def run(*args, **kwargs):
            with timeline.quiet():
                return fn(*args, **kwargs)
        return run

    for name, fn in originals.items():
        setattr(chunked_logprob, name, quiet(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(chunked_logprob, name, fn)


@contextlib.contextmanager
def _one_sequence():
    """Tell transformers' mask code what a real run finds in the position ids' values (which fake tensors do not
    have): one unpacked sequence. Then SDPA runs causal without a mask, as on a GPU; eager still builds its own."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@contextlib.contextmanager
def _cuda_4bit_matmul():
    """bitsandbytes' 4-bit forward as its CUDA backend runs a training-sized matmul (above 1536 rows always, below
    it on many GPUs): dequantize the weight to 16 bits, then F.linear — the dequantized weight exists while the
    output is made. Its CPU backend fuses the two, so the CPU would not show that weight; this puts it back."""
    from bitsandbytes import functional
    from bitsandbytes.autograd._functions import MatMul4Bit

    original = MatMul4Bit.forward

    def forward(ctx, A, B, out=None, bias=None, quant_state=None):
        weight = functional.dequantize_4bit(B, quant_state).to(A.dtype) if A.numel() else None
        result = original(ctx, A, B, out, bias, quant_state)
        del weight
        return result

    MatMul4Bit.forward = staticmethod(forward)
    try:
        yield
    finally:
        MatMul4Bit.forward = original


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm the decoder ends with: where the backbone hands over to the loss head (and back, in backward)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder().norm


def step_timeline(model: torch.nn.Module, recipe: Recipe) -> dict[str, int]:
    """One forward + backward (micro_step, as the trainer runs it) on the timeline. Returns bytes, each without the
    parameters' gradients (the gradients term) and CPU-only tile copies:
      saved          what autograd holds when backward starts (the loss scalar aside)
      loss_saved     the part of it the loss head saved
      forward        peak while the decoder layers run forward
      loss           peak from the final norm's output until its gradient (loss forward and backward)
      backward       peak while backward crosses the decoder layers"""
    timeline, loss_saved = Timeline(), set()
    norm = _final_norm(model)

    def handed_over(module, args, output):
        timeline.mark("loss")
        if output.requires_grad:
            output.register_hook(lambda grad: timeline.mark("backward"))

    def pack(t: torch.Tensor) -> torch.Tensor:
        uid = timeline.uid(t)
        if uid is not None and "loss" in timeline.marks:
            loss_saved.add(uid)
        return t

    hook = norm.register_forward_hook(handed_over)
    try:
        with _one_sequence(), _cuda_4bit_matmul(), timeline, _tiles_cpu_only(timeline):
            timeline.mark("forward")
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = forward_loss(model, recipe, "cpu", torch.Generator().manual_seed(recipe.seed), mask=False)
            timeline.mark("saved")
            loss.backward()
            timeline.mark("end")
    finally:
        hook.remove()
    grads = {timeline.uid(p.grad) for p in model.parameters() if p.grad is not None} - {None}
    phases = timeline.phases(grads)
    saved_live = timeline.live_at(timeline.marks["saved"])
    in_loss = sum(size for uid, size in saved_live.items() if uid in loss_saved)
    return {"saved": phases["saved"][0], "loss_saved": in_loss, "forward": phases["forward"][1],
            "loss": max(phases["loss"][1], phases["saved"][1]), "backward": phases["backward"][1]}


@dataclass(frozen=True)
class CpuCell:
    model: str
    setting: str  # a key of CPU_SETTINGS
    logits: str
    seq: int
    ckpt: bool = True
    attn: str = "sdpa"

    def recipe(self) -> Recipe:
        """The shipped base recipe of the method (LoRA r=16; QLoRA r=64 on every linear), one sequence, no
        accumulation. LoRA dropout off: on a CPU dropout keeps a mask in the input's dtype, on a GPU a boolean."""
        method = CPU_SETTINGS[self.setting][0].split("=")[1]
        return config.load(f"base/{'full' if method == 'freeze' else method}", [
            f"model={self.model}", *CPU_SETTINGS[self.setting], f"train.logits={self.logits}",
            f"train.max_length={self.seq}", f"train.gradient_checkpointing={str(self.ckpt).lower()}",
            f"train.attn_implementation={self.attn}", "train.micro_batch=1", "train.grad_accum=1",
            "train.precision=bf16", "quant.compute_dtype=bf16", "lora.dropout=0", "distributed=none", "num_gpus=1"])

    def build_key(self) -> tuple:
        """What the model is built with; cells that share it share one build."""
        return self.model, self.setting, self.ckpt, self.attn


def state_split(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen weights with buffers and quantization constants, trainable parameters) in bytes, each storage once."""
    trainable = {p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in model.parameters()
                 if p.requires_grad}
    everything = state_tensors(model, None)
    return sum(n for k, n in everything.items() if k not in trainable), sum(trainable.values())


def estimated_terms(recipe: Recipe, spec: ModelSpec) -> dict[str, int]:
    """The estimator's figures for what the CPU mode measures (a first step: no optimizer states, no gradients)."""
    p = plan(recipe, spec, num_gpus=1)
    at_loss, in_layer = p.phases["loss backward"], p.phases["layer backward"]
    static = p.phases["load"]["weights"] + at_loss["trainable_weights"]
    moments = [p.phases[name].get("activations", 0) + p.phases[name].get("logits", 0)
               for name in ("forward", "loss backward", "layer backward") if name in p.phases]
    return {"weights": p.phases["load"]["weights"], "activations": at_loss["activations"],
            "logits": at_loss["logits"], "layer backward": in_layer["activations"], "step peak": static + max(moments)}


def measured_terms(model: torch.nn.Module, recipe: Recipe) -> dict[str, int]:
    """The same figures, measured on the fake model's timeline."""
    weights, trainable = state_split(model)
    if trains_weights(recipe.method):  # the estimator's weights term holds the trained weights too
        weights, trainable = weights + trainable, 0
    step = step_timeline(model, recipe)
    model.zero_grad(set_to_none=True)
    activations = step["saved"] - step["loss_saved"]
    return {"weights": weights, "activations": activations, "logits": step["loss"] - activations,
            "layer backward": step["backward"],
            "step peak": weights + trainable + max(step["forward"], step["loss"], step["backward"])}


ADAPTER_SETTINGS = tuple(s for s in CPU_SETTINGS if s != "freeze")


def cpu_cells(models: tuple[str, ...] = CPU_MODELS, seqs: tuple[int, ...] = CPU_SEQS,
              settings: tuple[str, ...] = ADAPTER_SETTINGS) -> list[CpuCell]:
    """Every setting x loss x length with checkpointing (the shipped default), the same without it, and eager
    attention for LoRA and the upcast QLoRA; freeze (which layers save) with the chunked loss only."""
    cells = [CpuCell(m, s, logits, seq, ckpt) for m in models for ckpt in (True, False) for s in settings
             for logits in (("chunked",) if s == "freeze" else ("chunked", "full")) for seq in seqs]
    cells += [CpuCell(m, s, logits, seq, True, "eager") for m in models for s in ("lora", "qlora upcast")
              if s in settings for logits in ("chunked", "full") for seq in seqs]
    return cells


def run_cpu(cells: list[CpuCell], layers: int = CPU_LAYERS, **config: int) -> list[dict]:
    """Measure every cell, building each model once per build key; rows of estimated and measured bytes."""
    rows = []
    for key in dict.fromkeys(cell.build_key() for cell in cells):
        group = [cell for cell in cells if cell.build_key() == key]
        spec = with_layers(group[0].model, layers, **config)
        estimates = [estimated_terms(cell.recipe(), spec) for cell in group]  # outside the fake mode
        model = prepare(group[0].recipe(), spec, "cpu")
        with to_fake(model):
            gc.collect()  # the real weights
            for cell, estimated in zip(group, estimates, strict=True):
                start = time.perf_counter()
                rows.append({"cell": cell, "estimated": estimated, "measured": measured_terms(model, cell.recipe()),
                             "seconds": round(time.perf_counter() - start, 1)})
                print(cpu_row(rows[-1]), flush=True)
        del model
        gc.collect()
    return rows


def error_pct(row: dict, term: str) -> float:
    measured = row["measured"][term]
    return 100 * (row["estimated"][term] - measured) / measured if measured else 0.0


def cpu_row(row: dict) -> str:
    c = row["cell"]
    cells = [f"{row['measured'][t] / GiB:.3f} ({error_pct(row, t):+.1f}%)" for t in CPU_COLUMNS]
    return (f"| {c.model} | {c.setting} | {c.logits} | {c.attn} | {'on' if c.ckpt else 'off'} | {c.seq} | "
            + " | ".join(cells) + " |")


CPU_NOT_MEASURED = (
    "flash_attention_2 (needs a GPU; planned as SDPA, whose kernel saves the same)",
    "LoRA dropout > 0 (a CPU keeps a mask in the input's dtype, a GPU a boolean one)",
    ("micro_batch > 1 with padding, packing, DPO, DoRA and full fine-tuning at real widths (checked at tiny "
     "widths in tests/unit/test_estimate_memory.py; freeze is measured here)"),
    "the CUDA context, allocator fragmentation, cuBLAS and FlashAttention workspaces (GPU only)",
)


def table(header: tuple[str, ...], lines) -> list[str]:
    """A Markdown table: the header row, its rule, then the rows already rendered (cpu_row, recipe_row)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines]


def cpu_markdown(rows: list[dict], layers: int = CPU_LAYERS, settings: tuple[str, ...] = ADAPTER_SETTINGS) -> str:
    """The CPU-mode table, with what it measures and what it does not."""
    worst = max(abs(error_pct(r, t)) for r in rows for t in CPU_COLUMNS)
    title, only = "## Measured on CPU at real widths", ""
    if settings != ADAPTER_SETTINGS:
        title, only = f"{title}: {', '.join(settings)}", f" --settings {','.join(settings)}"
    return "\n".join([
        title, "",
        f"Generated by `python scripts/bench_memory.py --cpu{only} --out docs/memory.md` (no GPU; about an hour on 2 "
        "cores for the adapter settings, at most 6 GiB of RAM). Each model is built as training builds it, at its "
        f"real hidden size, heads and vocabulary with {layers} decoder layers and random weights; then its tensors are swapped for fake ones "
        "and one forward + backward runs through the real transformers, PEFT, bitsandbytes, TRL and autograd code "
        "while a dispatch-level tracker records every storage made and freed (what autograd saves, and the peak "
        "allocated). The estimator plans the same two-layer model. Shipped base recipes (LoRA r=16; QLoRA r=64 "
        "nf4 on every linear; freeze: the full recipe training the last of the two layers), micro_batch 1, bf16, "
        "LoRA dropout 0.", "",
        "Columns: the frozen weights; what the decoder saves for backward; the loss head's own bytes on top of "
        "them; the peak while backward crosses the layers (or the final norm); the step's peak with the weights. "
        f"Each cell is the measured GiB and the estimate's error. Largest error: {worst:.1f}%.", "",
        *table(("model", "setting", "logits", "attention", "checkpointing", "tokens", *CPU_COLUMNS),
               map(cpu_row, rows)), "",
        "Two things follow the GPU rather than the CPU, as the GPU runs them: TRL's chunked loss folds each tile in "
        "a Triton kernel (its CPU fallback's fp32 tile copies are left out) and bitsandbytes' CUDA backend runs a "
        "training-sized 4-bit matmul as dequantize + F.linear (the CPU fuses them; the dequantized weight is put "
        "back). Not measured here: " + "; ".join(CPU_NOT_MEASURED) + "."]) + "\n"


RECIPE_METHODS = ("lora", "qlora", "full")
RECIPE_SEQS = (256, 1024)
RECIPE_COLUMNS = ("weights", "gradients", "optimizer", "activations", "logits", "step peak", "training peak")
"""What the shipped-recipe mode compares: the first step's terms (as CPU_COLUMNS), the trained parameters'
gradients and optimizer states, and the peak over whole optimizer steps with everything the run holds."""


def shipped_recipe(name: str, method: str, seq: int, extra: tuple[str, ...] = ()) -> Recipe:
    """A shipped recipe (`<name>_<method>`, e.g. qwen2_5_0_5b_lora) as it runs, at `seq` tokens, one sequence a
    step (no accumulation), LoRA dropout 0 (a CPU keeps its mask in the input's dtype, a GPU a boolean one), and
    `extra` overrides."""
    return config.load(f"{name}_{method}", [f"train.max_length={seq}", "train.micro_batch=1", "train.grad_accum=1",
                                            "lora.dropout=0", *extra])


def whole_steps(model: torch.nn.Module, recipe: Recipe, spec: ModelSpec, steps: int = 2) -> dict[str, int]:
    """`steps` optimizer steps as the trainer runs them, on the timeline, from a model holding only its weights.
    Returns the gradients' and the optimizer states' bytes (at their largest) and the peak of everything alive
    (weights included), without CPU-only tile copies of TRL's chunked loss (a GPU folds them in registers)."""
    static = sum(state_tensors(model, None).values())
    timeline = Timeline()
    gen = torch.Generator().manual_seed(recipe.seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    gradients = states = 0
    with _one_sequence(), _cuda_4bit_matmul(), timeline, _tiles_cpu_only(timeline):
        optimizer = _optimizer(model, recipe, spec)
        for _ in range(steps):
            forward_loss(model, recipe, "cpu", gen, mask=False).backward()
            gradients = max(gradients, sum(p.grad.untyped_storage().nbytes() for p in trained if p.grad is not None))
            torch.nn.utils.clip_grad_norm_(trained, recipe.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            states = sum(v.untyped_storage().nbytes() for s in optimizer.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
        timeline.mark("end")
    timeline.marks.setdefault("start", 0)
    return {"gradients": gradients, "optimizer": states,
            "training peak": static + max(peak for _, peak in timeline.phases(set()).values())}


def estimated_recipe_terms(recipe: Recipe, spec: ModelSpec) -> dict[str, int]:
    """The estimator's figures for the shipped-recipe mode: the first step's terms, the gradients and optimizer
    states held once backward ends, and its peak without `overhead` (the CUDA context and fragmentation: no CPU has
    them)."""
    p = plan(recipe, spec, num_gpus=1)
    held = p.phases["backward end"]  # states held between steps (the step's own temporaries come on top)
    peak = max(sum(v for k, v in moment.items() if k != "overhead") for moment in p.phases.values())
    return {**estimated_terms(recipe, spec), "gradients": held["gradients"], "optimizer": held["optimizer"],
            "training peak": peak}


def run_recipes(name: str, methods: tuple[str, ...] = RECIPE_METHODS, seqs: tuple[int, ...] = RECIPE_SEQS,
                extra: tuple[str, ...] = ()) -> list[dict]:
    """Each shipped recipe of `name` at each length: the whole model (every layer), built as training builds it,
    then faked; rows of estimated and measured bytes."""
    rows = []
    for method, seq in itertools.product(methods, seqs):
        recipe = shipped_recipe(name, method, seq, extra)
        spec = registry.spec(recipe.model, recipe.variant)
        estimated = estimated_recipe_terms(recipe, spec)  # outside the fake mode
        model = prepare(recipe, spec, "cpu")
        start = time.perf_counter()
        with to_fake(model):
            gc.collect()  # the real weights
            measured = measured_terms(model, recipe)
            measured.update(whole_steps(model, recipe, spec))
        del model
        gc.collect()
        rows.append({"cell": CpuCell(name, method, recipe.train.logits, seq, recipe.train.gradient_checkpointing,
                                     recipe.train.attn_implementation),
                     "precision": recipe.train.precision, "estimated": estimated, "measured": measured,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(recipe_row(rows[-1]), flush=True)
    return rows


def recipe_row(row: dict) -> str:
    c = row["cell"]
    cells = [f"{row['measured'][t] / GiB:.3f} ({error_pct(row, t):+.1f}%)" for t in RECIPE_COLUMNS]
    return (f"| {c.setting} | {row['precision']} | {'on' if c.ckpt else 'off'} | {c.seq} | " + " | ".join(cells)
            + " |")


def recipes_markdown(name: str, rows: list[dict], extra: tuple[str, ...] = ()) -> str:
    worst = max(abs(error_pct(r, t)) for r in rows for t in RECIPE_COLUMNS)
    settings = "".join(f" --set {o}" for o in extra)
    return "\n".join([
        f"## Measured on CPU: the shipped {name} recipes, every layer{settings.replace(' --set', ',')}", "",
        f"Generated by `python scripts/bench_memory.py --recipes {name}{settings} --out docs/memory.md` (no GPU; "
        f"minutes). The recipes `{name}_lora|qlora|full` as they ship (their precision — train.precision=auto "
        f"resolved on this machine —, checkpointing and optimizer){' with ' + ', '.join(extra) if extra else ''}, one "
        "sequence a step, LoRA dropout 0: the whole model is built as training builds it, its tensors swapped for "
        "fake ones, and one forward + backward, then two whole optimizer steps (clipping, the optimizer's states "
        "made), run through the real transformers, PEFT, bitsandbytes, TRL and torch code while the allocation "
        "tracker records every storage made and freed. The columns of the two-layer table above, plus the "
        "gradients and optimizer states at their largest and the training peak: everything alive at the worst "
        "moment of whole steps, set against the estimate's peak without its CUDA context and fragmentation. "
        f"Each cell is the measured GiB and the estimate's error. Largest error: {worst:.1f}%.", "",
        *table(("method", "precision", "checkpointing", "tokens", *RECIPE_COLUMNS), map(recipe_row, rows)), "",
        "As in the table above, TRL's chunked loss tiles are left out (a GPU folds them in registers) and QLoRA's "
        "4-bit matmul dequantizes its weight as bitsandbytes' CUDA backend does. " + OPTIMIZER_STEP_NOTE]) + "\n"


OPTIMIZER_STEP_NOTE = (
    "Where the training peak is the optimizer step (full fine-tuning at short lengths), the estimate plans torch's "
    "foreach AdamW, a GPU's default, whose temporaries are the size of all trained parameters; on a CPU torch steps "
    "one parameter at a time, so only the largest one's (the embedding) exist at once, and the estimate is above.")


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the section `name` of a generated document (appended when missing), keeping the rest: --published
    and --cpu each write their own part of docs/memory.md."""
    begin, end = f"<!-- {name}: scripts/bench_memory.py -->", f"<!-- /{name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.is_file() else f"{DOC_TITLE}\n\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    write_atomically(path, new)


DOC_TITLE = "# Memory estimates: measured on CPU at real widths, and against published figures"


LLAMA_3_1_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                "rope_theta": 500000.0, "max_position_embeddings": 131072}
"""Llama 3.1 8B's shape (8,030,261,248 parameters), on the registry's Llama family: torchtune measured it."""


def llama_3_1_8b() -> ModelSpec:
    base = registry.spec("llama2_7b", "base")
    return ModelSpec(base.family, dataclasses.replace(base.model, name="llama3_1_8b"),
                     dataclasses.replace(base.variant, name="llama3_1", config_overrides=LLAMA_3_1_8B))


def torchtune_setting(*overrides: str) -> Recipe:
    """torchtune's README setting: batch 2, packed to 2048 tokens, bf16, no accumulation; their LoRA/QLoRA
    configs (llama3_1/8B_{lora,qlora}_single_device.yaml): rank 8, alpha 16, dropout 0."""
    return config.load(None, ["model=llama2_7b", "train.micro_batch=2", "train.max_length=2048",
                              "data.packing=true", "lora.r=8", "lora.alpha=16", "lora.dropout=0",
                              "train.grad_accum=1", "train.optimizer=adamw_torch", *overrides])


LORA_ATTN_MLP = "lora.targets=[q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
QLORA_ALL = "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
TORCHTUNE_ROWS = [  # (row, measured GiB, our settings, comparable?, note)
    ("LoRA, 1x 4090", 16.2, ["method=lora", LORA_ATTN_MLP, "train.gradient_checkpointing=true"], True,
     "activation checkpointing on (the config's default)"),
    ("QLoRA, 1x 4090", 7.4, ["method=qlora", QLORA_ALL, "train.gradient_checkpointing=true"], True,
     "checkpointing on; embeddings/output stay bf16, as in torchtune and our trainer"),
    ("LoRA, 1x A6000", 30.3, ["method=lora", LORA_ATTN_MLP, "train.gradient_checkpointing=false"], False,
     "no checkpointing, so torch.compile's fused kernels (fewer saved tensors than eager PyTorch + PEFT) decide"),
    ("Full, 1x 4090", 18.9, ["method=full", "train.gradient_checkpointing=true",
                             "train.optimizer=paged_adamw_8bit"], False,
     "optimizer step in backward (gradients never all held) and paged 8-bit states: not in our trainer"),
]
SANITY = [  # (model, method, others' figures for it; "estimated" tables, ranges only)
    ("llama2_7b", "qlora", "LLaMA-Factory 6 GB; Axolotl 10-14 GB; Unsloth min 5 GB; guides 5-6 GB"),
    ("llama2_7b", "lora", "LLaMA-Factory 16 GB; Axolotl 16-24 GB; Unsloth min 19 GB"),
    ("llama2_7b", "full", "LLaMA-Factory 60 GB (pure bf16) / 120 GB (mixed); Axolotl 60-80 GB"),
    ("llama2_13b", "qlora", "LLaMA-Factory ~12 GB (14B); Axolotl 16-20 GB; Unsloth min 8.5 GB (14B); guides ~10 GB"),
    ("llama2_13b", "lora", "LLaMA-Factory 32 GB (14B); Axolotl 28-40 GB; Unsloth min 33 GB (14B)"),
    ("llama2_13b", "full", "LLaMA-Factory 120 GB (pure bf16, 14B); Axolotl 120+ GB"),
]


def published_markdown() -> str:
    """Our estimates next to published figures: torchtune's measured peaks (its README's memory table for Llama 3.1
    8B; held within 15%) and the estimated tables of LLaMA-Factory, Axolotl, Unsloth and fine-tuning guides (shown
    as ranges only, SANITY)."""
    spec = llama_3_1_8b()
    lines = ["## Against published figures", "",
             "Generated by `python scripts/bench_memory.py --published docs/memory.md` (no GPU needed). The "
             "estimator's own measured check on a GPU is `scripts/bench_memory.py`, still to be run.", "",
             "### torchtune, MEASURED (Llama 3.1 8B, batch 2, packed to 2048, bf16)", "",
             "Their peak is torch's allocator figure, so ours is shown without the CUDA context "
             f"({CUDA_CONTEXT_BYTES / GiB:.2f} GiB).", "",
             "| row | measured | estimate | error | comparable | setting |", "|---|---|---|---|---|---|"]
    for row, measured, overrides, comparable, note in TORCHTUNE_ROWS:
        est = (plan(torchtune_setting(*overrides), spec).peak_bytes - CUDA_CONTEXT_BYTES) / GiB
        lines.append(f"| {row} | {measured} GiB | {est:.1f} GiB | {100 * (est - measured) / measured:+.0f}% | "
                     f"{'yes' if comparable else 'no'} | {note} |")
    lines += ["",
              "### Others' *estimated* tables (sanity ranges, not targets)", "",
              "Ours: one GPU, micro_batch 1, 2048 tokens, gradient checkpointing, the shipped base recipe of "
              "each method (QLoRA: r=64, paged 8-bit AdamW; LoRA: r=16, AdamW), CUDA context included.", "",
              "| model | method | weights alone | training peak | published |", "|---|---|---|---|---|"]
    for model, method, theirs in SANITY:
        recipe = config.load(f"base/{method}", [f"model={model}", "distributed=none", "num_gpus=1",
                                                "train.micro_batch=1", "train.max_length=2048",
                                                "train.gradient_checkpointing=true"])
        p = plan(recipe, registry.spec(model))
        lines.append(f"| {model} | {method} | {sum(p.phases['load'].values()) / GiB:.1f} GiB | "
                     f"{p.peak_bytes / GiB:.1f} GiB | {theirs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2_5_0_5b,qwen2_5_7b", help="registry names, comma-separated")
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--seqs", default="512,2048", help="max_length values")
    parser.add_argument("--ckpt", default="on,off", help="gradient checkpointing: on, off or on,off")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per cell (states exist from step 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every cell (e.g. train.optimizer=adamw_8bit)")
    parser.add_argument("--out", type=Path, help="write a markdown table here, and a CSV beside it")
    parser.add_argument("--published", type=Path, metavar="MD",
                        help="write the estimates-vs-published-tables comparison here and stop (no GPU needed)")
    parser.add_argument("--cpu", action="store_true",
                        help="no GPU: measure every term on CPU at real widths (fake tensors, 2 decoder layers) for "
                             f"{', '.join(CPU_MODELS)} at {', '.join(map(str, CPU_SEQS))} tokens (--models, --seqs "
                             "narrow it) and write the table to --out")
    parser.add_argument("--settings", help=f"--cpu: which of {', '.join(CPU_SETTINGS)} (default: all but freeze, "
                                           "whose table is its own section)")
    parser.add_argument("--recipes", metavar="NAME",
                        help="no GPU: measure the shipped recipes NAME_lora|qlora|full (whole model, fake tensors) at "
                             f"{', '.join(map(str, RECIPE_SEQS))} tokens (--seqs narrows it; --methods) and write "
                             "the table to --out")
    args = parser.parse_args(argv)
    if args.recipes:
        seqs = tuple(map(int, args.seqs.split(","))) if args.seqs != parser.get_default("seqs") else RECIPE_SEQS
        methods = tuple(args.methods.split(","))
        extra = tuple(args.set)
        table = recipes_markdown(args.recipes, run_recipes(args.recipes, methods, seqs, extra), extra)
        print(table)
        if args.out:
            write_section(args.out, " ".join([f"recipes {args.recipes}", *extra]), table)
        return 0
    if args.published:
        write_section(args.published, "published", published_markdown())
        print(args.published.read_text())
        return 0
    if args.cpu:
        models = tuple(args.models.split(",")) if args.models != parser.get_default("models") else CPU_MODELS
        seqs = tuple(map(int, args.seqs.split(","))) if args.seqs != parser.get_default("seqs") else CPU_SEQS
        settings = tuple(args.settings.split(",")) if args.settings else ADAPTER_SETTINGS
        if unknown := set(settings) - set(CPU_SETTINGS):
            parser.error(f"--settings: unknown {', '.join(sorted(unknown))} (known: {', '.join(CPU_SETTINGS)})")
        table = cpu_markdown(run_cpu(cpu_cells(models, seqs, settings)), settings=settings)
        print(table)
        if args.out:  # each set of settings keeps its own section of the document
            write_section(args.out, "cpu" if settings == ADAPTER_SETTINGS else f"cpu {'+'.join(settings)}", table)
        return 0
    if not torch.cuda.is_available():
        print("bench_memory: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a "
              "machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        return 2
    cells = [Cell(m, method, seq, ck == "on", args.micro_batch, tuple(args.set))
             for m in args.models.split(",") for method in args.methods.split(",")
             for seq in map(int, args.seqs.split(",")) for ck in args.ckpt.split(",")]
    torch.cuda.init()
    torch.ones(1, device="cuda") @ torch.ones(1, 1, device="cuda")  # create the context and cuBLAS handle
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    device = f"{torch.cuda.get_device_name()} ({total / GiB:.0f} GiB), CUDA context {context / GiB:.2f} GiB"
    print(device, flush=True)
    rows = []
    for cell in cells:
        rows.append(measure(cell, args.steps, context))
        print({k: rows[-1].get(k) for k in COLUMNS if k in rows[-1]}, flush=True)
    table = markdown(rows, device)
    print(table)
    if args.out:
        write_atomically(args.out, table)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_atomically(args.out.with_suffix(".csv"), buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
