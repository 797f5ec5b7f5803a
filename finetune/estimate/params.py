"""Exact parameter facts of a recipe's model, counted on the real (meta-device) module tree — never from formulas.

The counting itself (finetune.estimate.meta) builds the native model on the meta device and changes it as training
does (transformers' bitsandbytes quantizer, PEFT's LoRA injection). It needs torch, transformers, PEFT and
bitsandbytes, seconds of imports, so its result is cached on disk (finetune.estimate.cache), keyed by everything
it depends on: the model's config, the method, the LoRA and quantization settings, those libraries' versions and
our counting code. An estimate whose facts are cached imports none of them. The package ships the entries of every
shipped recipe and of `recommend` / `list models` (SEED), so a user's first commands count nothing either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cache as memo
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.config import Recipe
from finetune.estimate import cache
from finetune.models.registry import ModelSpec

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")
"""Whose behaviour decides the counts: the module trees, what the quantizer swaps, what PEFT injects."""
COUNTING_CODE = ("estimate/params.py", "estimate/meta.py", "models/native.py", "models/baichuan_alibi.py",
                 "models/convert/*.py")
"""Our code that shapes the counts, relative to the package: the counting, the native classes and configs."""
SEED = Path(__file__).resolve().parent / "seed"
"""Read-only entries made by scripts/make_estimate_seed.py, keyed as the user cache's: under other library versions
or other counting code the key differs and the facts are counted as without a seed, never taken from it."""


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block: its widths and what training does to it."""

    name: str  # e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    lora: bool  # a LoRA adapter is injected here
    group: int  # linears with the same group read the very same input tensor (q/k/v; gate/up)
    reads: str  # what produces that input: "norm" (the residual stream, normalised), "attention" (the
    #             attention kernel's output), or "mlp" (the gated activation)


@dataclass(frozen=True)
class ModelFacts:
    """What the memory model needs to know about one model as one recipe trains it."""

    params_total: int  # parameters of the base model (tied weights once)
    params_trainable: int  # what the optimizer updates (all for full; the last layers for freeze; adapters
    # (+ DoRA magnitudes) otherwise)
    params_adapter: int  # LoRA A/B parameters
    params_magnitude: int  # DoRA magnitude vectors (kept in fp32 by TRL under QLoRA)
    params_quantized: int  # parameters stored in 4/8 bit (0 unless method=qlora)
    quantized_numels: tuple[int, ...]  # per quantized weight tensor (each carries its own constants)
    quantized_rows: int  # sum of out_features of quantized linears (LLM.int8 keeps one fp32 scale per row)
    buffer_bytes: int  # buffers (rotary inv_freq ...), in their own dtypes
    largest_module_params: int  # the largest leaf module: what ZeRO-3/FSDP must gather at once
    embedding_params: int  # input embedding (its gradient under full fine-tuning is dense)
    lm_head_params: int  # output projection (its fp32 gradient buffer in the fused loss)
    lm_head_trainable: bool
    trainable_shapes: tuple[tuple[int, ...], ...]  # per trainable tensor (Adafactor factors by rows and columns)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    block_linears: tuple[Linear, ...]  # the linears of one decoder block (every block is the same)
    attention_mask_per_head: bool  # the model builds an additive [batch, heads, s, s] mask (ALiBi)


def lora_targets(recipe: Recipe, spec: ModelSpec) -> tuple[str, ...]:
    """The module names LoRA goes into: the recipe's, or the family default from the registry."""
    return tuple(recipe.lora.targets) or spec.family.lora_targets


def facts(recipe: Recipe, spec: ModelSpec) -> ModelFacts:
    """Exact counts and shapes for this recipe's model and method: from this process's memory, else from the disk
    cache, else from the package's seed, else counted on the meta device (and cached). The key holds what the
    count is given — the model's config and the one `settings` tuple of recipe values that shape the tree — plus
    the library versions and our code."""
    lora = (recipe.lora.r, lora_targets(recipe, spec), recipe.lora.dora) if recipe.method in ("lora", "qlora") \
        else None
    quant = (recipe.quant.bits, recipe.quant.type, recipe.quant.double_quant) if recipe.method == "qlora" else None
    freeze = (recipe.freeze.layers,) if recipe.method == "freeze" else ()  # no new key for the other methods
    settings = (recipe.method, lora, quant, *freeze)
    model = cache.key(spec.original_config, spec.family.name, _environment())
    entry = cache.key(model, *settings)
    if entry not in _MEMO:
        found = _from_json(cache.load("estimate", spec.name, entry, seed=SEED))
        if found is None:
            from finetune.estimate import meta

            found = meta.count(spec, model, *settings)
            cache.store("estimate", spec.name, entry, asdict(found))
        _MEMO[entry] = found
    return _MEMO[entry]


def versions() -> list[str]:
    """`name=version` of each of LIBRARIES, without a build's local tag: a CUDA and a CPU build of torch
    ("2.13.0+cu128", "2.13.0+cpu") build the same tree on the meta device, so they share entries (and the seed)."""
    found = []
    for name in LIBRARIES:
        try:
            found.append(f"{name}={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}=none")
    return found


@memo
def _environment() -> str:
    """The library versions and our counting code, as one hash (read once per process). Files are named relative
    to the package, so a checkout and an installed wheel of the same code share keys."""
    package = Path(__file__).resolve().parent.parent
    code = sorted(path for pattern in COUNTING_CODE for path in package.glob(pattern))
    return cache.key(versions(), cache.files_digest(code, relative_to=package))


_MEMO: dict[str, ModelFacts] = {}


_SCALARS = {"int": int, "bool": bool, "str": str}


def _typed(cls: type, data: dict[str, Any], **converted: Any) -> Any:
    """`cls(**data)` when `data` has exactly its fields and every int / bool / str field holds that type."""
    if set(data) != {f.name for f in fields(cls)}:
        raise KeyError(f"the fields of {cls.__name__} differ")
    for f in fields(cls):
        kind = _SCALARS.get(str(f.type))
        if kind is not None and type(data[f.name]) is not kind:
            raise TypeError(f"{cls.__name__}.{f.name} is not {kind.__name__}")
    return cls(**{**data, **converted})


def _from_json(data: Any) -> ModelFacts | None:
    """ModelFacts from its cached JSON form (`asdict`), or None when the entry is not exactly that form (an older
    layout, a damaged file): such an entry is counted again."""
    try:
        return _typed(ModelFacts, data,
                      quantized_numels=tuple(int(n) for n in data["quantized_numels"]),
                      trainable_shapes=tuple(tuple(int(d) for d in shape) for shape in data["trainable_shapes"]),
                      block_linears=tuple(_typed(Linear, linear) for linear in data["block_linears"]))
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
