"""The base model as a method trains it: full (weights in train.precision), lora (16-bit frozen base), qlora
(bitsandbytes 4-/8-bit: nf4/fp4, double quant, compute dtype; 16-bit parts stay 16-bit, fp32 with quant.upcast) or
freeze (full weights, only the last freeze.layers decoder layers train), and the LoRA adapter TRL attaches to it
(rsLoRA scaling, PiSSA / OLoRA / Gaussian init). Every stage loads its model through here; stage=rm loads it with
a one-output value head (AutoModelForSequenceClassification) instead of the language-model head.

What to build is decided by finetune.plan (the estimator and the memory benchmark build from the same plan); this
module turns the plan into transformers' and PEFT's objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

import finetune.models.native  # noqa: F401  (registers our native classes, e.g. Baichuan2-13B's ALiBi model)
from finetune.config import Recipe
from finetune.errors import UserError
from finetune.models.registry import ModelSpec
from finetune.plan import ModelPlan, StorageDtype, model_plan
from finetune.schema import LoraInit, Precision, trains_weights

if TYPE_CHECKING:
    from finetune.train.session import Session

DTYPES: dict[Precision, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""train.precision and quant.compute_dtype (and the plan's dtypes, named the same) → torch dtype."""
STORAGE: dict[StorageDtype, torch.dtype] = {"uint8": torch.uint8, **DTYPES}
"""The plan's quant_storage → torch dtype."""

CPU_4BIT_BLOCK = 32
"""bitsandbytes' CPU 4-bit kernels (used on CPUs with AVX512-bf16/AMX) repack each weight in blocks of 32 output
rows (`bitsandbytes.functional._convert_weight_packed_for_cpu`, block_n=32) and assert when a width is not a
multiple: on such a CPU the first sample generation would die with "N must be divisible by block_n"."""


def load_model(session: Session, path: Optional[Path] = None) -> torch.nn.Module:
    """The base weights as the method trains them (`path` overrides the resolved model, e.g. an SFT run's model)."""
    recipe, where = session.recipe, session.launch
    if recipe.train.attn_implementation == "flash_attention_2" and where.use_cpu:
        raise UserError("train.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
    plan = model_plan(recipe, session.spec)
    kwargs: dict[str, Any] = {"attn_implementation": recipe.train.attn_implementation,
                              "trust_remote_code": session.trust_remote_code, "dtype": DTYPES[plan.load_dtype]}
    if plan.head == "value":
        kwargs["num_labels"] = 1  # the value head: one scalar reward per sequence
    if plan.quant:
        kwargs.update(quantization_config=bnb_config(plan),
                      device_map=None if plan.shards_weights else {"": where.device})
    auto = AutoModelForSequenceClassification if plan.head == "value" else AutoModelForCausalLM
    model = auto.from_pretrained(path or session.model.path, **kwargs)
    if plan.trains == "last_layers":
        freeze_all_but_last(model, plan.freeze_layers or 0, keep=plan.full_modules)
    if plan.quant and plan.quant.bits == 4 and where.use_cpu:
        check_cpu_4bit_widths(model)
    if plan.upcast:
        # What LLaMA-Factory and the Qwen / ChatGLM QLoRA scripts do: embeddings, lm_head and norms (and with them the
        # residual stream) in fp32, ~4 GiB more for a 7B with a 152k vocabulary. Off by default: TRL already enables
        # input gradients for checkpointing and keeps the adapters in bf16, as the QLoRA paper and torchtune do. The
        # trainer enables checkpointing itself, with the recipe's setting.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def bnb_config(plan: ModelPlan) -> BitsAndBytesConfig:
    """The plan's quantization as transformers' bitsandbytes config: 4-bit weights packed into uint8, or into the
    compute dtype when FSDP / ZeRO-3 shard them (they shard float storage only)."""
    quant = plan.quant
    assert quant is not None, "bnb_config is for method=qlora"
    return BitsAndBytesConfig(
        load_in_4bit=quant.bits == 4, load_in_8bit=quant.bits == 8, bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=DTYPES[plan.compute_dtype],
        bnb_4bit_quant_storage=STORAGE[plan.quant_storage])


def check_cpu_4bit_widths(model: torch.nn.Module) -> None:
    """One clear message instead of bitsandbytes' assertion, on every CPU (not only the ones that would fail)."""
    odd = [(name, module.out_features) for name, module in model.named_modules()
           if type(module).__name__ == "Linear4bit" and module.out_features % CPU_4BIT_BLOCK]
    if odd:
        name, width = odd[0]
        raise UserError(f"QLoRA on CPU: layer {name} is {width} wide, and bitsandbytes' CPU 4-bit kernels need "
                        f"widths that are multiples of {CPU_4BIT_BLOCK} ({len(odd)} layer(s) are not); train this "
                        f"model with method=lora on CPU, or QLoRA on a GPU")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder layers: the longest ModuleList (model.layers, transformer.h, encoder.layers, ...)."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not stacks:
        raise UserError(f"method=freeze: {type(model).__name__} has no list of decoder layers to unfreeze")
    return max(stacks, key=len)


def freeze_all_but_last(model: torch.nn.Module, layers: int, keep: tuple[str, ...] = ()) -> None:
    """method=freeze: everything frozen but the last `layers` decoder layers (and modules named in `keep`, e.g. the
    reward model's new head, which has nothing to start from)."""
    stack = decoder_layers(model)
    if layers > len(stack):
        raise UserError(f"freeze.layers={layers}, but the model has {len(stack)} decoder layers")
    model.requires_grad_(False)
    for layer in stack[len(stack) - layers:]:
        layer.requires_grad_(True)
    for name, module in model.named_modules():
        if name.split(".")[-1] in keep:
            module.requires_grad_(True)


INIT: dict[LoraInit, bool | str] = {"default": True, "gaussian": "gaussian", "pissa": "pissa",
                                          "olora": "olora"}
"""lora.init → PEFT's init_lora_weights. PiSSA and OLoRA move the base's principal part into the adapter (the base
changes in memory); session.save_weights converts the adapter back so that it applies to the original base."""


def lora_config(recipe: Recipe, spec: Optional[ModelSpec]) -> Optional[LoraConfig]:
    """The adapter TRL attaches (None for full and freeze fine-tuning)."""
    return peft_config(model_plan(recipe, spec))


def peft_config(plan: ModelPlan) -> Optional[LoraConfig]:
    """The plan's adapter as PEFT's config. A reward model's adapter is a SEQ_CLS one: PEFT then trains and saves
    the new value head (`score`) in full."""
    lora = plan.lora
    if lora is None:
        return None
    targets = lora.targets if isinstance(lora.targets, str) else list(lora.targets)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      use_dora=lora.dora, use_rslora=lora.rslora, init_lora_weights=INIT[lora.init],
                      task_type=lora.task_type)


LORA_INIT = "lora-init"
"""<run>/lora-init/: a PiSSA / OLoRA adapter as initialised (what converting the trained one back needs)."""


def converts_init(recipe: Recipe) -> bool:
    return not trains_weights(recipe.method) and recipe.lora.init in ("pissa", "olora")


def lora_plus(session: Session, trainer: Any) -> None:
    """lora.plus_ratio: LoRA+ (B matrices learn plus_ratio × faster), built with PEFT's create_loraplus_optimizer
    from the optimizer class and settings train.optimizer gives; Trainer keeps an optimizer it is handed."""
    ratio = session.recipe.lora.plus_ratio
    if ratio is None:
        return
    if trains_weights(session.recipe.method):
        raise UserError(f"lora.plus_ratio is for method=lora/qlora (it scales the adapters' B matrices), "
                        f"not method={session.recipe.method}")
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs.pop("lr", None)
    trainer.optimizer = create_loraplus_optimizer(trainer.model, optimizer_cls, lr=trainer.args.learning_rate,
                                                  loraplus_lr_ratio=ratio, **kwargs)
