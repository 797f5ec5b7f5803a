"""Measure the real peak GPU memory of a few training steps and set it against `finetune estimate`.

Weights of the real shapes filled with a constant (memory does not depend on weight values), built from the registry's
shipped configs through `native_config` — no download. The model is prepared the way our trainer prepares it
(weights in the recipe's precision; bitsandbytes' quantizer on the linears transformers would quantize, the
16-bit parts left 16-bit as finetune/train/sft.py leaves them; PEFT LoRA;
TRL's fused LM head; gradient checkpointing; the trainer's optimizer class), then a few optimizer steps run on
random tokens of full length. One process runs every cell; each cell frees its memory, and an OOM or any other
failure is recorded for that cell instead of ending the run.

    python scripts/bench_memory.py --models qwen2_5_0_5b,qwen2_5_7b --methods lora,qlora --seqs 512,2048 \
        --ckpt on,off --out docs/bench_memory.md
    python scripts/bench_memory.py --published docs/memory.md   # no GPU needed: estimates vs published tables

Measured = torch.cuda.max_memory_reserved + the CUDA context (device memory in use before the first tensor).
Paged optimizers (paged_adamw_*) allocate their states in CUDA unified memory, which torch does not count:
their cells compare max_memory_reserved against the estimate without the optimizer states.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dataclasses

import torch

from finetune import config
from finetune.config import Recipe
from finetune.estimate.memory import CUDA_CONTEXT_BYTES, GiB, plan
from finetune.models import registry
from finetune.models.native import native_config
from finetune.models.registry import ModelSpec

STD = 0.02
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(recipe: Recipe, spec: ModelSpec, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A random-init model prepared as training prepares it, and the optimizer the trainer would create."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from trl.trainer.utils import add_fused_lm_head

    cfg = native_config(spec)
    cfg._attn_implementation = recipe.train.attn_implementation
    full_fp16 = recipe.method == "full" and recipe.train.precision == "fp16"
    dtype = torch.float32 if full_fp16 else DTYPES[recipe.train.precision]
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.tie_weights()  # skipped with the initialisation
    for param in model.parameters():
        param.data.fill_(STD)  # memory does not depend on the values: a constant is fast and keeps the loss finite
    if recipe.method == "qlora":
        _quantize(model, recipe, dtype, device)  # 16-bit parts stay 16-bit, as finetune/train/sft.py leaves them
    model.config.use_cache = False
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    if recipe.method != "full":
        model = _add_lora(model, recipe, spec)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if recipe.method != "full":
            model.enable_input_require_grads()
    model.train()
    return model, _optimizer(model, recipe)


def _quantize(model: torch.nn.Module, recipe: Recipe, dtype: torch.dtype, device: str) -> None:
    """bitsandbytes linears where transformers' quantizer puts them, filled with random values, quantized."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    qcfg = BitsAndBytesConfig(load_in_4bit=recipe.quant.bits == 4, load_in_8bit=recipe.quant.bits == 8,
                              bnb_4bit_quant_type=recipe.quant.type, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=recipe.quant.double_quant)
    skip = Bnb4BitHfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qcfg)
    for module in model.modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        data = torch.full((module.out_features, module.in_features), STD, dtype=dtype, device=device)
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = bnb.nn.Params4bit(data, requires_grad=False,
                                              quant_type=recipe.quant.type,
                                              compress_statistics=recipe.quant.double_quant).to(device)
        else:
            module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False).to(device)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=device),
                                             requires_grad=False)
        del data
    model.is_loaded_in_4bit = recipe.quant.bits == 4
    model.is_loaded_in_8bit = recipe.quant.bits == 8


def _add_lora(model: torch.nn.Module, recipe: Recipe, spec: ModelSpec) -> torch.nn.Module:
    """PEFT LoRA as TRL's SFTTrainer applies it (adapters bf16 on a quantized base, DoRA magnitudes fp32)."""
    from peft import LoraConfig, get_peft_model

    targets = list(recipe.lora.targets) or list(spec.family.lora_targets)
    lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=targets, use_dora=recipe.lora.dora, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, autocast_adapter_dtype=recipe.distributed not in ("zero3", "zero3_offload"))
    if recipe.method == "qlora":
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    return model


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The optimizer class and arguments transformers' Trainer builds for `optim=<recipe.train.optimizer>`."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.gettempdir(), optim=recipe.train.optimizer,
                             learning_rate=recipe.train.lr, weight_decay=recipe.train.weight_decay,
                             report_to=[], use_cpu=not torch.cuda.is_available())
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def micro_step(model: torch.nn.Module, recipe: Recipe, device: str, gen: torch.Generator,
               scaler: torch.amp.GradScaler) -> None:
    """Forward and backward of one micro-batch of full-length random tokens, under the trainer's autocast."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (recipe.train.micro_batch, recipe.train.max_length), generator=gen).to(device)
    with torch.autocast(device, dtype=DTYPES[recipe.train.precision], enabled=recipe.train.precision != "fp32"):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True).loss
    scaler.scale(loss / recipe.train.grad_accum).backward()


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


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """Storage pointer -> bytes of everything a trained model holds between steps: parameters, buffers,
    gradients, optimizer states and bitsandbytes quantization constants (each storage once)."""
    found: dict[int, int] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif hasattr(t, "absmax"):  # a bitsandbytes QuantState
            for value in vars(t).values():
                add(value)

    for p in itertools.chain(model.parameters(), model.buffers()):
        add(p)
        add(p.grad)
        add(getattr(p, "quant_state", None))
        add(getattr(p, "SCB", None))
    for state in optimizer.state.values():
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
    """Our estimates next to the published figures of reference/memory.md (measured: within 15%; estimated
    tables of others: shown as ranges only)."""
    spec = llama_3_1_8b()
    lines = ["# Memory estimates against published figures", "",
             "Generated by `python scripts/bench_memory.py --published docs/memory.md` (no GPU needed). The "
             "estimator's own measured check is `scripts/bench_memory.py` on a GPU.", "",
             "## torchtune, MEASURED (Llama 3.1 8B, batch 2, packed to 2048, bf16)", "",
             "Their peak is torch's allocator figure, so ours is shown without the CUDA context "
             f"({CUDA_CONTEXT_BYTES / GiB:.2f} GiB).", "",
             "| row | measured | estimate | error | comparable | setting |", "|---|---|---|---|---|---|"]
    for row, measured, overrides, comparable, note in TORCHTUNE_ROWS:
        est = (plan(torchtune_setting(*overrides), spec).peak_bytes - CUDA_CONTEXT_BYTES) / GiB
        lines.append(f"| {row} | {measured} GiB | {est:.1f} GiB | {100 * (est - measured) / measured:+.0f}% | "
                     f"{'yes' if comparable else 'no'} | {note} |")
    lines += ["",
              "## Others' *estimated* tables (sanity ranges, not targets)", "",
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
    args = parser.parse_args(argv)
    if args.published:
        write_atomically(args.published, published_markdown())
        print(args.published.read_text())
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
