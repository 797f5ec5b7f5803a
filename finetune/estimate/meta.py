"""Counting a recipe's model on the real (meta-device) module tree — never from formulas.

The native model is built on the meta device (no memory, no download), with the plan's head (finetune.plan: the
language-model head, or a reward model's value head), then changed the way training changes it: transformers' own
bitsandbytes quantizer swaps the linears it would quantize (so what stays 16-bit — embeddings, lm_head, norms,
biases — is decided by transformers, not by us), and PEFT injects the real LoRA modules with the plan's rank and
targets. Everything the memory model needs is read off that tree.

This is the only part of the estimator that needs torch, transformers, PEFT and bitsandbytes; importing them takes
seconds, so finetune.estimate.params imports this module only when its on-disk cache has no entry.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from finetune.errors import UserError
from finetune.estimate.model_facts import Linear, ModelFacts
from finetune.models.native import meta_model, native_config
from finetune.models.registry import ModelSpec
from finetune.plan import Counted, Head, Quantization

PER_HEAD_MASK_MODEL_TYPES = frozenset({"baichuan_alibi"})
"""Native model types whose forward materialises an additive [batch, heads, s, s] attention mask (ALiBi): a
per-sequence s² term no SDPA kernel avoids (finetune.models.baichuan_alibi.alibi_mask)."""


def _quantize(model: nn.Module, quant: Quantization) -> None:
    """Swap in bitsandbytes linears exactly where transformers' own quantizer would (it skips lm_head, tied
    weights and the model's keep-in-fp32 modules)."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    if quant.bits == 4:
        quantizer = Bnb4BitHfQuantizer(BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.type, bnb_4bit_use_double_quant=quant.double_quant))
    else:
        quantizer = Bnb8BitHfQuantizer(BitsAndBytesConfig(load_in_8bit=True))
    quantizer._process_model_before_weight_loading(model, device_map=None)


def _inject_lora(model: nn.Module, spec: ModelSpec, counted: Counted) -> nn.Module:
    """PEFT's real LoRA injection, with the task training uses (SEQ_CLS makes PEFT train a value head in full).
    DoRA is injected as plain LoRA: its init needs real weights (a norm per row), and its only extra parameter is one
    magnitude per output row of each adapted linear, counted by the caller. An unknown target is an error here, as
    PEFT would raise it at training time."""
    from peft import LoraConfig, get_peft_model

    targets = counted.lora_targets
    if not isinstance(targets, str):
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets or () if t not in present]
        if missing:
            raise UserError(f"lora.targets: {', '.join(missing)} not found in {spec.name} (its native module names "
                            f"include {', '.join(spec.family.lora_targets)})")
        targets = list(targets or ())
    config = LoraConfig(r=counted.lora_r, target_modules=targets,
                        task_type="SEQ_CLS" if counted.head == "value" else "CAUSAL_LM")
    return get_peft_model(model, config, low_cpu_mem_usage=True)


def _block_linears(block: nn.Module, inputs: dict[str, tuple[int, str]]) -> tuple[Linear, ...]:
    """Linears of one decoder block, with LoRA marked: read from PEFT's wrappers when present."""
    found = []
    for name, module in block.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            base = module.get_base_layer()
            found.append(Linear(name, base.in_features, base.out_features, True, *inputs[name]))
        elif isinstance(module, nn.Linear) and ".base_layer" not in f".{name}" and "lora_" not in name:
            found.append(Linear(name, module.in_features, module.out_features, False, *inputs[name]))
    return tuple(found)


def _block_inputs(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Which tensor each linear of the first decoder block reads, found by running the (meta) model: what
    autograd saves depends on which linears share an input and on that input's dtype."""
    blocks = _decoder_blocks(model)
    norm_outputs: list[torch.Tensor] = []
    read: dict[str, torch.Tensor] = {}  # tensors are kept alive, so identity comparisons stay valid
    hooks = []
    for name, module in blocks[0].named_modules():
        if "Norm" in type(module).__name__:
            hooks.append(module.register_forward_hook(lambda m, args, out: norm_outputs.append(out)))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: read.__setitem__(name, args[0])))
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    for hook in hooks:
        hook.remove()

    def from_norm(tensor: torch.Tensor) -> bool:
        return any(tensor is out for out in norm_outputs)

    groups: list[torch.Tensor] = []
    for tensor in read.values():
        if not any(tensor is seen for seen in groups):
            groups.append(tensor)
    attention = next(name for name, tensor in read.items() if from_norm(tensor)).rsplit(".", 1)[0]
    return {name: (next(i for i, g in enumerate(groups) if g is tensor),
                   "norm" if from_norm(tensor) else "attention" if name.rsplit(".", 1)[0] == attention else "mlp")
            for name, tensor in read.items()}


def _decoder_blocks(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and "DecoderLayer" in type(module[0]).__name__:
            return module
    raise TypeError(f"{type(model).__name__}: no decoder layers found")


@dataclass
class _Base:
    """What a model is before training changes it: totals of the whole model, and a one-layer copy to change."""

    params_total: int
    buffer_bytes: int
    largest_module_params: int
    embedding_params: int
    lm_head_params: int
    layers: int
    one_layer: nn.Module  # never changed: each count works on a deep copy
    inputs: dict[str, tuple[int, str]]


_BASES: dict[tuple[str, Head], _Base] = {}


def _meta_model(spec: ModelSpec, head: Head) -> nn.Module:
    """The native model on the meta device with the head training loads: a reward model is the family's
    *ForSequenceClassification with one label (finetune.train.model.load_model)."""
    if head == "causal_lm":
        return meta_model(spec)
    from transformers import AutoModelForSequenceClassification

    cfg = native_config(spec)
    if type(cfg) not in AutoModelForSequenceClassification._model_mapping:
        raise UserError(f"stage=rm: {spec.name} ({type(cfg).__name__}) has no sequence-classification class in "
                        f"transformers, so it cannot get a value head")
    cfg.num_labels = 1  # what from_pretrained(num_labels=1) sets
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(cfg)


def _base(spec: ModelSpec, key: str, head: Head) -> _Base:
    """Built once per model, head and process: `finetune recommend` counts three methods of every model."""
    if (key, head) not in _BASES:
        model = _meta_model(spec, head)
        blocks = _decoder_blocks(model)
        embedding = model.get_input_embeddings().weight
        output = model.get_output_embeddings()  # None for a value head: a reward model has no lm_head
        base = dict(
            params_total=sum(p.numel() for p in model.parameters()),
            buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
            largest_module_params=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
            embedding_params=embedding.numel(),
            lm_head_params=0 if output is None or output.weight is embedding else output.weight.numel(),
            layers=len(blocks),
        )
        del blocks[1:]  # every layer is the same: the rest is counted on one
        _BASES[key, head] = _Base(**base, one_layer=model, inputs=_block_inputs(model))
    return _BASES[key, head]


def count(spec: ModelSpec, model_key: str, counted: Counted) -> ModelFacts:
    """Totals come from the whole meta model; quantization and LoRA are applied to a copy cut to one decoder
    layer, whose per-layer counts are multiplied by the number of layers. `model_key` names the model's config;
    `counted` is the plan's part that shapes the tree (finetune.plan.ModelPlan.counted). Freezing trains the last
    `freeze_layers` whole decoder layers and the plan's full modules (a value head), nothing else."""
    base = _base(spec, model_key, counted.head)
    cfg = native_config(spec)
    layers = base.layers
    one = copy.deepcopy(base.one_layer)
    if counted.quant:
        _quantize(one, counted.quant)
    if counted.trains == "adapter":
        one = _inject_lora(one, spec, counted)
    block = _decoder_blocks(one)[0]
    in_block = {id(x) for x in (*block.parameters(), *block.modules())}

    def every_layer(items: list) -> list:
        """(object, value) pairs of the one-layer model -> values for the whole model."""
        return [v for obj, v in items for _ in range(layers if id(obj) in in_block else 1)]

    quantized = every_layer([(m, (m.in_features * m.out_features, m.out_features)) for m in one.modules()
                             if type(m).__name__ in ("Linear4bit", "Linear8bitLt")])
    adapted = every_layer([(m, m.get_base_layer().out_features) for m in one.modules() if hasattr(m, "lora_A")])
    trainable = every_layer([(p, tuple(p.shape)) for p in one.parameters() if p.requires_grad])
    if counted.trains == "last_layers":
        heads = [tuple(p.shape) for name, module in one.named_modules() if name.split(".")[-1] in counted.full_modules
                 for p in module.parameters()]
        trainable = [tuple(p.shape) for p in block.parameters()] * (counted.freeze_layers or 0) + heads
    magnitudes = [(out,) for out in adapted] if counted.dora else []  # DoRA: one per output row
    adapter = every_layer([(p, p.numel()) for n, p in one.named_parameters() if ".lora_A." in n or ".lora_B." in n])
    return ModelFacts(
        params_total=base.params_total,
        params_trainable=sum(math.prod(shape) for shape in trainable + magnitudes),
        params_adapter=sum(adapter),
        params_magnitude=sum(out for (out,) in magnitudes),
        params_quantized=sum(n for n, _ in quantized),
        quantized_numels=tuple(n for n, _ in quantized),
        quantized_rows=sum(rows for _, rows in quantized),
        buffer_bytes=base.buffer_bytes,
        largest_module_params=base.largest_module_params,
        embedding_params=base.embedding_params,
        lm_head_params=base.lm_head_params,
        lm_head_trainable=counted.trains == "all" and counted.head == "causal_lm",
        trainable_shapes=tuple(trainable + magnitudes),
        layers=layers,
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        vocab=cfg.vocab_size,
        block_linears=_block_linears(block, base.inputs),
        attention_mask_per_head=cfg.model_type in PER_HEAD_MASK_MODEL_TYPES,
    )
