"""What a recipe may hold: every key, its type, its default and — for closed sets — its choices.

finetune.config composes recipe files and overrides against this schema and validates the result; every module
receives the resolved `Recipe`. A closed set of choices is a `Literal` on its field, declared once: OmegaConf
refuses any other value, and `choices(key)` tells the modules that act on it (tests/unit/test_choices.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

Hub = Literal["hf", "modelscope"]
Method = Literal["full", "lora", "qlora", "freeze"]
Stage = Literal["sft", "dpo", "kto", "orpo", "simpo", "rm", "grpo"]
Distributed = Literal["none", "ddp", "zero2", "zero3", "zero3_offload", "fsdp"]
ReportTo = Literal["none", "wandb", "tensorboard"]
DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "text", "preference", "sharegpt_preference",
                     "messages_preference", "alpaca_preference", "kto"]
OnBadRecord = Literal["error", "skip"]
Precision = Literal["fp32", "fp16", "bf16"]
TrainPrecision = Literal["auto", "fp32", "fp16", "bf16"]  # auto: finetune.precision, resolved when a recipe loads
Optimizer = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
Attention = Literal["eager", "sdpa", "flash_attention_2"]
Logits = Literal["chunked", "full"]
Kernels = Literal["none", "liger"]
QuantBits = Literal[4, 8]
QuantType = Literal["nf4", "fp4"]
DpoLoss = Literal["sigmoid", "ipo", "hinge"]
LoraInit = Literal["default", "gaussian", "pissa", "olora"]
"""Every closed set of choices, declared once on its schema field: OmegaConf refuses any other value, and each
module that acts on a choice handles all of them (tests/unit/test_choices.py fails when one is missed)."""


@dataclass
class DataSource:
    """One extra dataset mixed into training with a sampling weight."""

    path: str = "???"
    weight: float = 1.0
    format: DataFormat = "auto"


@dataclass
class DataConfig:
    path: Optional[str] = None  # file, directory, glob or hub dataset id
    name: Optional[str] = None  # entries of data.dir's dataset_info.json ("a,b"); replaces data.path when set
    dir: Optional[str] = None  # a LLaMA-Factory-style data folder holding dataset_info.json
    format: DataFormat = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # data.columns.<field>=<column in the file>
    mix: list[DataSource] = field(default_factory=list)
    eval_path: Optional[str] = None
    val_size: float = 0.0  # fraction (<1) or count (>=1) held out when eval_path is not given
    max_samples: Optional[int] = None
    on_bad_record: OnBadRecord = "error"
    system_prompt: Optional[str] = None  # used when a conversation has no system message
    packing: bool = False
    num_proc: Optional[int] = None


@dataclass
class TrainConfig:
    lr: float = 2e-4
    scheduler: Scheduler = "cosine"
    warmup_ratio: float = 0.03
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    micro_batch: int = 1
    grad_accum: int = 8
    max_length: int = 2048
    gradient_checkpointing: bool = True
    precision: TrainPrecision = "bf16"  # auto: the machine's fastest (bf16 / fp16 on GPUs; bf16 or fp32 on a CPU)
    optimizer: Optimizer = "adamw_torch"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    attn_implementation: Attention = "sdpa"
    logits: Logits = "chunked"  # chunked: TRL's loss on [4096, 32768] tiles | full: fp32 [tokens, vocab] logits (SFT)
    kernels: Kernels = "none"  # liger: Liger's Triton kernels through TRL (a CUDA GPU and the liger-kernel package)
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    save_steps: int = 200
    save_total_limit: int = 2
    sample_prompts: int = 3  # held-out prompts generated before/after training for the report
    neftune_alpha: Optional[float] = None  # NEFTune: noise on the input embeddings while training (5 is common)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=list)  # empty: the family's default from the registry
    dora: bool = False
    rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r) instead of alpha/r
    init: LoraInit = "default"  # pissa / olora start from the base's principal directions (export converts back)
    plus_ratio: Optional[float] = None  # LoRA+: B's learning rate = plus_ratio × A's (16 in the paper)


@dataclass
class FreezeConfig:
    """method=freeze: the last `layers` decoder layers train in full, everything else stays frozen."""

    layers: int = 2


@dataclass
class QuantConfig:
    """bitsandbytes settings used by method=qlora (4-bit) or to load an 8-bit base."""

    bits: QuantBits = 4
    type: QuantType = "nf4"
    double_quant: bool = True
    compute_dtype: Precision = "bf16"
    upcast: bool = False  # true: peft.prepare_model_for_kbit_training (fp32 embeddings, lm_head, norms)


@dataclass
class DpoConfig:
    beta: float = 0.1
    loss: DpoLoss = "sigmoid"
    sft_run: Optional[str] = None  # run directory of the SFT stage whose adapter DPO starts from


@dataclass
class PrefConfig:
    """stage=kto / orpo / simpo: the preference objective's strength (TRL's defaults per stage when unset)."""

    beta: Optional[float] = None  # kto 0.1, orpo 0.1 (lambda), simpo 2.0
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    desirable_weight: float = 1.0  # KTO: weight of the losses on desirable / undesirable answers
    undesirable_weight: float = 1.0


@dataclass
class RewardConfig:
    """stage=grpo: how a sampled answer is scored. `fn` is a comma-separated list of built-ins (exact_match,
    format, length) or `module:function` of your own (called as TRL calls reward functions)."""

    fn: str = "exact_match"
    pattern: str = r"^\S.*$"  # format: the regex a good answer matches in full
    target_length: int = 32  # length: answers near this many tokens score highest


@dataclass
class GrpoConfig:
    num_generations: int = 4  # answers sampled per prompt (the group the advantage is relative to)
    max_completion_length: int = 64
    beta: float = 0.0  # KL penalty against a reference model (0: no reference model is kept)
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling of the answers (1: off)
    top_k: int = 0  # sample among the k likeliest tokens (0: off); a tiny random model needs it to learn at all


@dataclass
class Recipe:
    name: str = "custom"
    model: str = "???"  # registry name, hub id, ModelScope id or local directory
    variant: Optional[str] = None  # base | chat | instruct | 32k | zh ... (registry)
    hub: Hub = "hf"
    revision: Optional[str] = None
    method: Method = "lora"
    stage: Stage = "sft"
    output_dir: Optional[str] = None
    gpu_mem: Optional[float] = None  # GiB per GPU, to ask "would it fit?" without that GPU
    num_gpus: Optional[int] = None  # planned GPUs; default: detected, else 1
    distributed: Distributed = "none"
    report_to: ReportTo = "none"
    resume: Optional[str] = None  # run directory, or auto
    overwrite: bool = False
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)


def choices(key: str) -> tuple[Any, ...]:
    """The values a dotted schema key accepts (`choices("train.optimizer")`); () for an open one."""
    node: Any = Recipe
    for part in key.split("."):
        node = get_type_hints(node)[part]
        if get_origin(node) is Union:  # Optional[X]
            node = next(arg for arg in get_args(node) if arg is not type(None))
    return get_args(node) if get_origin(node) is Literal else ()


def trains_weights(method: Method) -> bool:
    """full and freeze train the model's own weights (all, or the last layers); lora and qlora train adapters on a
    frozen base. What is saved, loaded, estimated and exported follows from this one split."""
    return method in ("full", "freeze")
