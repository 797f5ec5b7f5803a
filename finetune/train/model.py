"""The base model as a method trains it: full (weights in train.precision), lora (16-bit frozen base) or qlora
(bitsandbytes 4-/8-bit: nf4/fp4, double quant, compute dtype; 16-bit parts stay 16-bit, fp32 with quant.upcast),
and the LoRA adapter TRL attaches to it. Every stage loads its model through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import finetune.models.native  # noqa: F401  (registers our native classes, e.g. Baichuan2-13B's ALiBi model)
from finetune.config import Precision, Recipe
from finetune.engines import ENGINES
from finetune.errors import UserError
from finetune.models.registry import ModelSpec

if TYPE_CHECKING:
    from finetune.train.session import Session

DTYPES: dict[Precision, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""train.precision and quant.compute_dtype → torch dtype."""

CPU_4BIT_BLOCK = 32
"""bitsandbytes' CPU 4-bit kernels (used on CPUs with AVX512-bf16/AMX) repack each weight in blocks of 32 output
rows (`bitsandbytes.functional._convert_weight_packed_for_cpu`, block_n=32) and assert when a width is not a
multiple: on such a CPU the first sample generation would die with "N must be divisible by block_n"."""


def load_model(session: Session, path: Optional[Path] = None) -> torch.nn.Module:
    """The base weights as the method trains them (`path` overrides the resolved model, e.g. an SFT run's model)."""
    recipe, where = session.recipe, session.launch
    if recipe.train.attn_implementation == "flash_attention_2" and where.use_cpu:
        raise UserError("train.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
    kwargs: dict[str, Any] = {"attn_implementation": recipe.train.attn_implementation,
                              "trust_remote_code": recipe.trust_remote_code}
    if recipe.method == "qlora":
        compute = DTYPES[recipe.quant.compute_dtype]
        sharded = ENGINES[recipe.distributed].shards_weights  # FSDP/ZeRO-3 shard the 4-bit storage as this dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=recipe.quant.bits == 4, load_in_8bit=recipe.quant.bits == 8,
            bnb_4bit_quant_type=recipe.quant.type, bnb_4bit_use_double_quant=recipe.quant.double_quant,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute if sharded else torch.uint8)
        kwargs.update(dtype=compute, device_map=None if sharded else {"": where.device})
    else:
        # fp16 mixed precision needs fp32 master weights (its gradient scaler refuses fp16 ones)
        kwargs["dtype"] = torch.float32 if recipe.train.precision == "fp16" and recipe.method == "full" \
            else DTYPES[recipe.train.precision]
    model = AutoModelForCausalLM.from_pretrained(path or session.model.path, **kwargs)
    if recipe.method == "qlora" and recipe.quant.bits == 4 and where.use_cpu:
        check_cpu_4bit_widths(model)
    if recipe.method == "qlora" and recipe.quant.upcast:
        # What LLaMA-Factory and the Qwen / ChatGLM QLoRA scripts do: embeddings, lm_head and norms (and with them the
        # residual stream) in fp32, ~4 GiB more for a 7B with a 152k vocabulary. Off by default: TRL already enables
        # input gradients for checkpointing and keeps the adapters in bf16, as the QLoRA paper and torchtune do. The
        # trainer enables checkpointing itself, with the recipe's setting.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def check_cpu_4bit_widths(model: torch.nn.Module) -> None:
    """One clear message instead of bitsandbytes' assertion, on every CPU (not only the ones that would fail)."""
    odd = [(name, module.out_features) for name, module in model.named_modules()
           if type(module).__name__ == "Linear4bit" and module.out_features % CPU_4BIT_BLOCK]
    if odd:
        name, width = odd[0]
        raise UserError(f"QLoRA on CPU: layer {name} is {width} wide, and bitsandbytes' CPU 4-bit kernels need "
                        f"widths that are multiples of {CPU_4BIT_BLOCK} ({len(odd)} layer(s) are not); train this "
                        f"model with method=lora on CPU, or QLoRA on a GPU")


def lora_config(recipe: Recipe, spec: Optional[ModelSpec]) -> Optional[LoraConfig]:
    """The adapter TRL attaches (None for full fine-tuning); empty targets mean the family's default list."""
    if recipe.method == "full":
        return None
    targets = list(recipe.lora.targets) or (list(spec.family.lora_targets) if spec else "all-linear")
    return LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=targets, use_dora=recipe.lora.dora, task_type="CAUSAL_LM")
