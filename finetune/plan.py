"""The model a recipe trains, decided once: which modules LoRA adapts and how, what is quantized, every dtype, what
trains, the head, the optimizer. Training (finetune.train.model), the estimator's meta-device count
(finetune.estimate.meta) and the memory benchmark (scripts/bench_memory.py) all build from this one `ModelPlan`, so
what is estimated is what trains.

Pure on purpose: no torch, no transformers (the dry run and `finetune estimate` import it and stay fast). Dtypes
are named as train.precision names them ("fp32", "fp16", "bf16"); finetune.train.model maps them to torch dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from finetune.engines import ENGINES, zero3
from finetune.models.registry import ModelSpec
from finetune.schema import LoraInit, Optimizer, Precision, QuantBits, QuantType, Recipe, trains_weights

OPTIMIZERS: dict[Optimizer, str] = {
    "adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit", "sgd": "sgd", "adafactor": "adafactor"}
"""recipe train.optimizer → transformers `optim` name (the 8-bit and paged ones are bitsandbytes')."""

ALL_LINEAR = "all-linear"
"""PEFT's own target for a model outside the registry: every nn.Linear but the output layer (peft's
tuners_utils._maybe_include_all_linear_layers leaves the lm_head out)."""

VALUE_HEAD = "score"
"""The module AutoModelForSequenceClassification adds for stage=rm (one output: the reward). It starts from nothing,
so it trains in full under every method (PEFT's SEQ_CLS task keeps it in modules_to_save)."""

Head = Literal["causal_lm", "value"]
Trains = Literal["adapter", "all", "last_layers"]
StorageDtype = Literal["uint8", "fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class Quantization:
    """The format bitsandbytes stores the frozen linears in (method=qlora). Which linears it quantizes is
    transformers' decision (its bitsandbytes quantizer skips the lm_head, tied weights and keep-in-fp32 modules)."""

    bits: QuantBits
    type: QuantType  # nf4 / fp4 (4-bit only)
    double_quant: bool  # quantize the 4-bit absmax constants too


@dataclass(frozen=True)
class Adapter:
    """The LoRA adapter PEFT injects (method=lora/qlora)."""

    targets: Union[tuple[str, ...], str]  # module names in the native model, or ALL_LINEAR
    r: int
    alpha: int
    dropout: float
    dora: bool
    rslora: bool
    init: LoraInit
    task_type: Literal["CAUSAL_LM", "SEQ_CLS"]  # SEQ_CLS: PEFT trains and saves the value head in full


@dataclass(frozen=True)
class Counted:
    """What the module tree of the trained model depends on: everything the estimator's meta-device count reads, and
    nothing else (its cache is keyed by this; dtypes and the optimizer are the memory model's, not the count's)."""

    head: Head
    trains: Trains
    freeze_layers: Optional[int]
    full_modules: tuple[str, ...]
    lora_r: Optional[int]
    lora_targets: Union[tuple[str, ...], str, None]
    dora: bool
    quant: Optional[Quantization]


@dataclass(frozen=True)
class ModelPlan:
    """Everything about the model a recipe trains, before any weight is loaded."""

    head: Head  # causal_lm: the language-model head; value: a one-label value head (stage=rm)
    trains: Trains  # adapter (lora/qlora), all (full), last_layers (freeze)
    freeze_layers: Optional[int]  # trains=last_layers: how many decoder layers, counted from the last
    full_modules: tuple[str, ...]  # modules that train in full whatever the method (the value head)
    lora: Optional[Adapter]
    quant: Optional[Quantization]
    load_dtype: Precision  # what from_pretrained loads the weights in
    kept_dtype: Precision  # frozen weights that are not quantized (embeddings, norms, lm_head)
    trained_dtype: Precision  # what the optimizer updates: the adapters (a value head beside them stays in
    #                           load_dtype), or the weights themselves
    magnitude_dtype: Optional[Precision]  # DoRA's magnitude vectors (TRL leaves them fp32 on a quantized base)
    compute_dtype: Precision  # bitsandbytes' matmul dtype (qlora), else the training precision
    autocast: Optional[Precision]  # the mixed-precision dtype the trainer runs forward in (None: fp32, none)
    quant_storage: StorageDtype  # the dtype 4-bit weights are packed into (a float dtype when sharded)
    upcast: bool  # peft.prepare_model_for_kbit_training: kept weights in fp32
    shards_weights: bool  # FSDP / ZeRO-3: each rank holds a slice; the base is not placed on one device
    optim: str  # transformers' `optim` name for train.optimizer

    def counted(self) -> Counted:
        return Counted(self.head, self.trains, self.freeze_layers, self.full_modules,
                       self.lora.r if self.lora else None, self.lora.targets if self.lora else None,
                       bool(self.lora and self.lora.dora), self.quant)


def lora_targets(recipe: Recipe, spec: Optional[ModelSpec]) -> Union[tuple[str, ...], str]:
    """The recipe's lora.targets, else the family's (registry), else PEFT's all-linear for a model outside the
    registry."""
    return tuple(recipe.lora.targets) or (spec.family.lora_targets if spec else ALL_LINEAR)


def _trained_dtype(recipe: Recipe, load: Precision) -> Precision:
    """Full / freeze train the weights as loaded. Adapters: TRL casts them to bf16 on a quantized base
    (trl/trainer/sft_trainer.py, after get_peft_model); under ZeRO-3 it passes autocast_adapter_dtype=False, so they
    keep the base's dtype; otherwise PEFT's autocast_adapter_dtype makes 16-bit adapters fp32."""
    if trains_weights(recipe.method):
        return load
    if recipe.method == "qlora":
        return "bf16"
    return load if zero3(recipe.distributed) else "fp32"


def model_plan(recipe: Recipe, spec: Optional[ModelSpec]) -> ModelPlan:
    """The plan of `recipe`'s model; `spec` is None for a model outside the registry (a hub id, a local directory)."""
    method, quantized = recipe.method, recipe.method == "qlora"
    value = recipe.stage == "rm"
    if quantized:
        load: Precision = recipe.quant.compute_dtype
    elif trains_weights(method) and recipe.train.precision == "fp16":
        load = "fp32"  # fp16 mixed precision needs fp32 master weights (its gradient scaler refuses fp16 ones)
    elif method == "full" and recipe.distributed == "fsdp" and recipe.train.precision != "fp32":
        load = "fp32"  # accelerate upcasts what FSDP2 trains to fp32 master weights before sharding (fsdp_utils)
    else:
        load = recipe.train.precision
    upcast = quantized and recipe.quant.upcast
    trained = _trained_dtype(recipe, load)
    dora = not trains_weights(method) and recipe.lora.dora
    sharded = ENGINES[recipe.distributed].shards_weights
    lora = None if trains_weights(method) else Adapter(
        targets=lora_targets(recipe, spec), r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
        dora=recipe.lora.dora, rslora=recipe.lora.rslora, init=recipe.lora.init,
        task_type="SEQ_CLS" if value else "CAUSAL_LM")
    return ModelPlan(
        head="value" if value else "causal_lm",
        trains="all" if method == "full" else "last_layers" if method == "freeze" else "adapter",
        freeze_layers=recipe.freeze.layers if method == "freeze" else None,
        full_modules=(VALUE_HEAD,) if value else (),
        lora=lora,
        quant=Quantization(recipe.quant.bits, recipe.quant.type, recipe.quant.double_quant) if quantized else None,
        load_dtype=load,
        kept_dtype="fp32" if upcast else load,
        trained_dtype=trained,
        magnitude_dtype=("fp32" if quantized else trained) if dora else None,
        compute_dtype=recipe.quant.compute_dtype if quantized else recipe.train.precision,
        autocast=None if recipe.train.precision == "fp32" else recipe.train.precision,
        quant_storage=recipe.quant.compute_dtype if quantized and sharded else "uint8",
        upcast=upcast,
        shards_weights=sharded,
        optim=OPTIMIZERS[recipe.train.optimizer],
    )
